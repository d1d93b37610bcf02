"""Taking an ensemble to a site: ``adapt`` (BatchNorm statistics of the site's unlabelled cells) and ``calibrate``
(the operating point on a few labelled donors), each a new portable folder."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import alldetect
from alldetect.cli import app
from alldetect.ensemble.calibrate import calibrate, calibrate_point
from alldetect.ensemble.folder import EnsembleFolder
from alldetect.errors import AlldetectError
from alldetect.formats.operating_point import OperatingPoint
from alldetect.models.batchnorm import adapt_batchnorm, batchnorm_layers


class _Net(nn.Module):
    """uint8 NCHW in, as a member takes it; three BatchNorm layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                                  nn.BatchNorm2d(4))

    def forward(self, x):
        return self.body(x.float())


def _crops(n=40, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (n, 6, 6, 3), dtype=np.uint8)


def test_every_layer_takes_the_sites_statistics_and_the_early_ones_only_the_first_third():
    crops = _crops()
    site_mean = crops.reshape(-1, 3).mean(0)
    net = _Net().eval()
    assert adapt_batchnorm(net, crops, layers="all", site_weight=1.0) == 3
    first = net.body[0]
    assert first.running_mean.numpy() == pytest.approx(site_mean, rel=1e-5)
    assert first.momentum == 0.1 and not first.training  # put back as it was

    early = _Net().eval()
    assert adapt_batchnorm(early, crops, layers="early", site_weight=1.0) == 1
    assert early.body[2].running_mean.tolist() == [0.0] * 4  # untouched: only the first of three is early
    assert [len(batchnorm_layers(_Net(), kind)) for kind in ("all", "early")] == [3, 1]


def test_a_mix_lies_halfway_and_the_same_cells_give_the_same_weights():
    crops = _crops()
    half, whole, again = _Net().eval(), _Net().eval(), _Net().eval()
    adapt_batchnorm(half, crops, layers="all", site_weight=0.5)
    adapt_batchnorm(whole, crops, layers="all", site_weight=1.0)
    adapt_batchnorm(again, crops, layers="all", site_weight=1.0)
    assert half.body[0].running_mean.numpy() == pytest.approx(whole.body[0].running_mean.numpy() / 2, rel=1e-5)
    for a, b in zip(whole.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_calibrating_shrinks_the_sites_own_fit_toward_the_shipped_point():
    rng = np.random.default_rng(0)
    donors = ["a1", "a2", "h1", "h2"]
    subjects = [d for d in donors for _ in range(10)]
    y = np.array([int(s.startswith("a")) for s in subjects])
    prob = np.clip(np.where(y == 1, 0.9, 0.7) + rng.normal(0, 0.03, len(y)), 0, 1)  # healthy cells score high
    shipped = OperatingPoint(0.5, 0.5, 1, "balanced_accuracy")
    alone = calibrate_point(shipped, y, prob, subjects, prior_donors=0)
    assert 0.7 < alone.cell_threshold < 0.9  # the site's own fit separates its donors
    assert calibrate_point(shipped, y, prob, subjects, prior_donors=1e9).cell_threshold == pytest.approx(0.5)
    shrunk = calibrate_point(shipped, y, prob, subjects, prior_donors=4)
    assert 0.5 < shrunk.cell_threshold < alone.cell_threshold
    result = calibrate(shipped, y, prob, subjects, prior_donors=4)
    assert result.site_weight == pytest.approx(0.5) and result.leave_one_out["donors"] == 4
    low, high = result.cell_threshold_interval
    assert low <= result.point.cell_threshold <= high


def test_calibrating_on_fewer_than_two_donors_of_a_class_is_refused():
    subjects = ["a1"] * 3 + ["a2"] * 3 + ["h1"] * 3
    y = np.array([1] * 6 + [0] * 3)
    with pytest.raises(AlldetectError, match="1 healthy donor"):
        calibrate_point(OperatingPoint(), y, np.linspace(0.1, 0.9, 9), subjects)


@pytest.fixture(scope="module")
def site_cells(tiny_synth):
    """The synthetic tree's test cells: several donors of both classes, as a site's batch."""
    return tiny_synth


def test_adapt_writes_a_new_folder_with_new_weights_that_says_what_was_done(ensemble_dir, site_cells, tmp_path):
    source = EnsembleFolder(ensemble_dir)
    before = json.loads((ensemble_dir / "ensemble.json").read_text())
    ensemble = alldetect.load(ensemble_dir, engine="torch", device="cpu")
    adapted = ensemble.adapt(site_cells, layers="early", min_cells=4)
    saved = adapted.save(tmp_path / "site")

    spec = saved.folder.spec
    assert [m.sha256 for m in spec.members] != [m.sha256 for m in source.spec.members]
    assert json.loads((ensemble_dir / "ensemble.json").read_text()) == before  # the source is never changed
    step = spec.site[-1]
    assert step["step"] == "adapt" and step["layers"] == "early" and step["from"] == source.model_id
    assert spec.domain == source.spec.domain  # the domain check keeps its training reference
    card = (tmp_path / "site" / "MODEL_CARD.md").read_text()
    assert "**Adapted** on" in card and "keeps its training reference" in card
    table = alldetect.load(tmp_path / "site", engine="torch", device="cpu", precision="fp32").predict(site_cells)
    assert table.scored == len(table) and np.isfinite(table["prob_all"]).all()
    scored = adapted.predict(site_cells)["prob_all"]  # in memory, before saving: the same weights
    assert np.asarray(table["prob_all"]) == pytest.approx(np.asarray(scored), abs=1e-6)

    again = ensemble.adapt(site_cells, layers="early", min_cells=4).save(tmp_path / "again")
    assert [m.sha256 for m in again.folder.spec.members] == [m.sha256 for m in spec.members]  # deterministic


def test_adapt_refuses_too_few_cells_one_donor_and_cells_unlike_the_training_ones(ensemble_dir, site_cells,
                                                                                  tmp_path):
    ensemble = alldetect.load(ensemble_dir, engine="torch", device="cpu")
    with pytest.raises(AlldetectError, match="at least 1000 cells"):
        ensemble.adapt(site_cells, min_cells=1000)
    one_donor = sorted(site_cells.rglob("UID_*.bmp"))[:1] * 6
    with pytest.raises(AlldetectError, match="one donor"):
        ensemble.adapt(one_donor, min_cells=4)
    grey = [np.full((80, 80, 3), 200, np.uint8)] * 8
    with pytest.raises(AlldetectError, match="unlike the cells"):
        ensemble.adapt(grey, min_cells=4)


def test_calibrate_through_the_command_line_writes_a_folder_at_the_new_point(ensemble_dir, site_cells, tmp_path):
    out = tmp_path / "calibrated"
    done = CliRunner().invoke(app, ["calibrate", str(ensemble_dir), str(site_cells / "training_data"),
                                    "-o", str(out), "--device", "cpu"])
    assert done.exit_code == 0, done.output
    assert "leaving one of the" in done.output
    saved = alldetect.load(out, engine="torch", device="cpu")
    step = saved.folder.spec.site[-1]
    assert step["step"] == "calibrate" and len(step["donors"]) >= 4
    assert saved.operating_point.cell_threshold == pytest.approx(step["point"]["cell_threshold"])
    assert "**Calibrated** on" in (out / "MODEL_CARD.md").read_text()

    again = CliRunner().invoke(app, ["calibrate", str(ensemble_dir), str(site_cells), "-o", str(out)])
    assert again.exit_code == 1 and "not an empty folder" in again.output


def test_adapt_on_one_donor_is_one_line_on_the_command_line(ensemble_dir, site_cells, tmp_path):
    one = sorted(site_cells.rglob("UID_*.bmp"))[0]
    done = CliRunner().invoke(app, ["adapt", str(ensemble_dir), str(one), "-o", str(tmp_path / "x"),
                                    "--min-cells", "2", "--device", "cpu"])
    assert done.exit_code == 1
    assert done.output.count("\n") == 1 and "error:" in done.output
