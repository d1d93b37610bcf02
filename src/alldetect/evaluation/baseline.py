"""A classical baseline: logistic regression on a few hand-made cell features.

It is the yardstick for how hard a dataset is (paper Table 1 lists such feature-plus-classifier methods):
on the synthetic set it must land well above chance and well below perfect, or the synthetic cells are
either unlearnable or trivial.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..data.images import read_rgb
from ..formats.labels import is_all
from ..formats.manifest import ManifestRow

FEATURES = ("diameter", "mean_r", "mean_g", "mean_b", "intensity_std", "fine_texture", "outline_irregularity")


def hand_features(image: np.ndarray) -> np.ndarray:
    """Seven features of one cell on black: size, colour, texture and outline (see ``FEATURES``)."""
    gray = image.astype(np.float64).mean(axis=2)
    mask = gray > 10
    area = max(int(mask.sum()), 1)
    interior = mask.copy()
    for axis in (0, 1):
        for step in (1, -1):
            interior &= np.roll(mask, step, axis=axis)
    laplacian = 4 * gray - sum(np.roll(gray, s, axis=a) for a in (0, 1) for s in (1, -1))
    inside = image[mask].astype(np.float64)
    return np.array([
        np.sqrt(4 * area / np.pi) / image.shape[0],
        *inside.mean(axis=0),
        gray[mask].std(),
        laplacian[interior].std() if interior.any() else 0.0,
        (mask & ~interior).sum() / np.sqrt(area),
    ])


def evaluate_baseline(rows: list[ManifestRow], *, train_split: str = "train",
                      test_split: str = "test") -> dict[str, float]:
    """Fit on one split of a subject-split manifest, score another: balanced accuracy and AUC."""
    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        chosen = [r for r in rows if r.split == split and r.label]
        return np.stack([hand_features(read_rgb(r.path)[0]) for r in chosen]), np.array([r.y for r in chosen])

    x_train, y_train = load(train_split)
    x_test, y_test = load(test_split)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced"))
    model.fit(x_train, y_train)
    prob = model.predict_proba(x_test)[:, 1]
    return {"ba": float(balanced_accuracy_score(y_test, is_all(prob))), "auc": float(roc_auc_score(y_test, prob)),
            "n_train": len(y_train), "n_test": len(y_test)}
