"""One label encoding everywhere: ALL is the positive class, unlabelled is -1, and a call is P(ALL) >= 0.5."""

import numpy as np
import pytest

from alldetect.formats.labels import THRESHOLD, Label, call, is_all
from alldetect.formats.manifest import ManifestRow
from alldetect.formats.predictions import read_predictions


def test_all_is_positive_hem_is_zero_unlabelled_is_minus_one():
    assert [Label.from_text(t) for t in ("all", " HEM ", "1", "0", "")] == [1, 0, 1, 0, -1]
    assert [Label(v).text for v in (1, 0, -1)] == ["all", "hem", ""]
    with pytest.raises(ValueError, match="label 'blast' is not all, hem"):
        Label.from_text("blast")


def test_manifests_and_predictions_mean_the_same_by_a_label(tmp_path):
    rows = [ManifestRow("a.bmp", "all"), ManifestRow("b.bmp", "hem"), ManifestRow("c.bmp")]
    assert [r.y for r in rows] == [1, 0, -1]
    path = tmp_path / "p.csv"
    path.write_text("path,label,prob_all\na.bmp,all,0.9\nb.bmp,hem,0.1\nc.bmp,,0.5\n")
    assert read_predictions(path)["p"].y.tolist() == [r.y for r in rows]


def test_the_call_is_at_or_above_the_threshold():
    assert THRESHOLD == 0.5
    assert is_all(np.array([0.4999, 0.5, 0.9])).tolist() == [False, True, True]
    assert (call(0.5), call(0.49)) == ("ALL", "HEM")
