"""Building an ensemble folder from member runs."""

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from alldetect.ensemble.build import build_ensemble
from alldetect.errors import DataError
from alldetect.formats.predictions import read_predictions, write_predictions

runner = CliRunner()


def test_members_covering_different_images_are_refused(member_runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(member_runs[1], other)
    preds = read_predictions(other / "predictions_val.csv")["efficientnet_lite0"]
    write_predictions(other / "predictions_val.csv", preds.path[1:], ["all" if y else "hem" for y in preds.y[1:]],
                      preds.prob_all[1:], model="efficientnet_lite0")
    with pytest.raises(DataError, match="cover different images: 1 only in"):
        build_ensemble([member_runs[0], other], tmp_path / "ens")
    labels = ["hem" if y else "all" for y in preds.y]  # every label flipped
    write_predictions(other / "predictions_val.csv", preds.path, labels, preds.prob_all, model="efficientnet_lite0")
    with pytest.raises(DataError, match="disagree on the label"):
        build_ensemble([member_runs[0], other], tmp_path / "ens")


def test_bf16_check_keeps_a_member_that_bf16_moves_in_fp32(ensemble_dir, tmp_path):
    from alldetect.ensemble.folder import EnsembleFolder
    from alldetect.ensemble.build import check_bf16
    from alldetect.inference.torch_engine import TorchEngine

    ens = tmp_path / "ens"
    shutil.copytree(ensemble_dir, ens)
    verdict = check_bf16(EnsembleFolder(ens), tolerance=1.0)
    assert verdict["fp32_members"] == [] and set(verdict["mean_change"]) == {"mobilenet", "efficientnet_lite0"}
    assert all(0 < d < 1.0 for d in verdict["mean_change"].values())
    verdict = check_bf16(EnsembleFolder(ens), tolerance=0.0)
    assert verdict["fp32_members"] == ["mobilenet", "efficientnet_lite0"]
    model = TorchEngine.from_folder(ens, device="cpu", precision="bf16")
    assert model.fp32_members == {"mobilenet", "efficientnet_lite0"}
    crops = EnsembleFolder(ens).calibration()[0][:8]
    fp32 = TorchEngine.from_folder(ens, device="cpu", precision="fp32").member_probs(crops)
    np.testing.assert_array_equal(model.member_probs(crops), fp32)  # bf16 asked, fp32 run
    model.fp32_members = frozenset()
    assert not np.array_equal(model.member_probs(crops), fp32)  # without the verdict: bf16


def test_rebuilding_a_folder_removes_graphs_of_the_ensemble_it_held(member_runs, tmp_path):
    out = tmp_path / "ens"
    out.mkdir()
    for name in ("ensemble.onnx", "ensemble.int8.onnx"):
        (out / name).write_bytes(b"a graph of other members")
    build_ensemble(member_runs, out)
    assert not list(out.glob("*.onnx"))
    assert (out / "ensemble.json").is_file()
