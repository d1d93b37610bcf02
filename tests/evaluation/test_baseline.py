"""The synthetic task must be learnable but not trivial: a hand-feature baseline on a subject-disjoint split
lands well above chance and well below perfect."""

from alldetect.data.index import index_folder
from alldetect.data.split import subject_split
from alldetect.data.synth import SynthConfig, generate
from alldetect.evaluation.baseline import evaluate_baseline


def test_hand_feature_baseline_is_above_chance_and_below_perfect(tmp_path):
    generate(tmp_path, SynthConfig(size=150, all_subjects=20, hem_subjects=10, cells_per_subject=12,
                                   final_subjects=0, seed=1), workers=2)
    rows = subject_split(index_folder(tmp_path).rows, val_fraction=0.0, test_fraction=0.4, seed=1)
    scores = evaluate_baseline(rows)
    assert 0.60 <= scores["ba"] <= 0.92, scores
    assert 0.65 <= scores["auc"] <= 0.97, scores
