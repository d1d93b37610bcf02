"""The domain check on real C-NMC cells (the shipped fixtures) and on out-of-domain cells made from them: each
check flags its own case with its own reason, and the real cells pass."""

import json

import numpy as np
import pytest

from alldetect.data.cell_measures import cell_measures
from alldetect.data.domain import DomainReference, fit_domain
from alldetect.data.images import read_rgb
from alldetect.data.index import index_folder
from alldetect.data.out_of_domain import CASES, blank, natural_photo, noise
from alldetect.data.geometry import center_crop

CROP = 300


@pytest.fixture(scope="module")
def reference_and_frames(tmp_path_factory):
    from conftest import FIXTURES

    rows = [r for r in index_folder(FIXTURES / "cnmc").rows if r.label]
    frames = [read_rgb(r.path)[0] for r in rows]
    reference = fit_domain(_measures(frames), [r.subject for r in rows], CROP)
    return reference, frames


def _measures(frames) -> np.ndarray:
    return cell_measures(np.stack([center_crop(f, CROP) for f in frames]))


def _flagged(reference, frames, reason: str) -> float:
    verdict = reference.check(_measures(frames))
    return float(np.mean([not ok and reason in note for ok, note in zip(verdict.in_domain, verdict.notes)]))


def test_the_real_cells_are_in_domain_and_the_out_of_fold_share_is_about_the_target(reference_and_frames):
    reference, frames = reference_and_frames
    verdict = reference.check(_measures(frames))
    assert verdict.in_domain.mean() >= 0.9
    assert all(note == "" for ok, note in zip(verdict.in_domain, verdict.notes) if ok)
    assert 0.0 < reference.flagged_out_of_fold <= 0.1  # a few dozen cells: the 2% target is coarse here


@pytest.mark.parametrize("case, reason", [
    ("smear background", "background is not black"),
    ("rescaled 0.5x", "smaller than training cells"),
    ("rescaled 2x", "larger than training cells"),
    ("hue rotated 120 degrees", "colours far from the training stain"),
    ("grey-scale", "colours far from the training stain"),
    ("natural photograph", "background is not black"),
])
def test_each_constructed_case_is_flagged_with_its_reason(reference_and_frames, case, reason):
    reference, frames = reference_and_frames
    rng = np.random.default_rng(0)
    assert _flagged(reference, [CASES[case](f, rng) for f in frames], reason) >= 0.95


def test_synthetic_cells_blank_and_noise_frames_are_flagged(reference_and_frames):
    reference, frames = reference_and_frames
    rng = np.random.default_rng(1)
    synthetic = [CASES["synthetic cell (alldetect synth)"](f, rng) for f in frames]
    assert _flagged(reference, synthetic, "") >= 0.95
    assert _flagged(reference, synthetic, "features far from every training cell") >= 0.9
    assert _flagged(reference, [np.zeros((450, 450, 3), np.uint8)] * 3, "no cell: the frame is (nearly) empty") == 1
    assert _flagged(reference, [noise(450, rng) for _ in range(5)], "background is not black") == 1
    assert _flagged(reference, [blank(450, rng) for _ in range(5)] + [natural_photo(450, rng) for _ in range(5)],
                    "") == 1


def test_the_reference_travels_as_json_and_refuses_another_version(reference_and_frames):
    reference, frames = reference_and_frames
    again = DomainReference.from_json(json.loads(json.dumps(reference.to_json())))
    measures = _measures(frames[:5])
    assert again.check(measures).notes == reference.check(measures).notes
    with pytest.raises(ValueError, match="version"):
        DomainReference.from_json({**reference.to_json(), "version": 99})
    with pytest.raises(ValueError, match="finite"):
        DomainReference.from_json({**reference.to_json(), "colour_limit": float("nan")})
