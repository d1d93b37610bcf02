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

from ..data.cell_measures import hand_features
from ..data.images import read_rgb
from ..formats.labels import is_all
from ..formats.manifest import ManifestRow

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
