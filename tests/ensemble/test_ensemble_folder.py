"""The ensemble folder is the whole model (that it works moved, with its training runs gone: tests/export);
damaged or hand-edited folders are one-line errors naming the file and the field."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from alldetect.cli import app
from alldetect.ensemble.folder import EnsembleFolder
from alldetect.ensemble.spec import SpecError
from alldetect.errors import AlldetectError
from alldetect.formats.operating_point import PAPER_POINT
from alldetect.inference.torch_engine import TorchEngine


runner = CliRunner()


@pytest.fixture
def copied(ensemble_dir, tmp_path):
    target = tmp_path / "ens"
    shutil.copytree(ensemble_dir, target)
    return target


def _edit_spec(ens, change):
    spec = json.loads((ens / "ensemble.json").read_text())
    change(spec)
    (ens / "ensemble.json").write_text(json.dumps(spec))


def test_damaged_or_replaced_weights_are_refused(copied):
    weights = copied / "members" / "mobilenet" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SpecError, match="weights.safetensors: the weights do not match the hash"):
        TorchEngine.from_folder(copied, device="cpu")
    weights.write_bytes(bytes(data[:1000]))
    r = runner.invoke(app, ["predict", str(copied), str(copied), "-o", str(copied / "p.csv")])
    assert r.exit_code == 1 and "do not match the hash" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("change, message", [
    (lambda s: s["methods"]["wen_kappa"].update(weights=[float("nan"), 1.0]), "methods.wen_kappa.weights must be"),
    (lambda s: s["methods"]["sap"].update(weights=[-1.0, 1.0]), "non-negative"),
    (lambda s: s["methods"]["sap"].update(weights=["1", 1.0]), "methods.sap.weights must be 2 finite"),
    (lambda s: s["methods"]["sap"].update(weights=[1.0]), "methods.sap.weights must be 2 finite"),
    (lambda s: s["methods"]["wen_acc"].update(weights=[1e308, 1e308]), "methods.wen_acc.weights .*finite sum"),
    (lambda s: s["members"][0].update(sha256=["a", "b"]), "members\\[0\\].weights/sha256 must be as many"),
    (lambda s: s["methods"]["stacking"].update(intercept=float("inf")), "methods.stacking.intercept"),
    (lambda s: s["members"][0].update(crop=0), "members\\[0\\].crop/input_size"),
    (lambda s: s["members"][1].update(name="resnet9"), "members\\[1\\].name: unknown member"),
    (lambda s: s["members"][0].update(weights="/etc/passwd"), "must be a path inside the folder"),
    (lambda s: s["members"][0].pop("sha256"), "missing field members\\[0\\].sha256"),
    (lambda s: s.pop("methods"), "missing field methods"),
    (lambda s: s.update(default_method="median"), "default_method 'median' is not one of its methods"),
    (lambda s: s["methods"].update(magic={"method": "magic"}), "methods.magic: unknown ensemble method 'magic'"),
    (lambda s: s.update(version=1), "earlier alldetect.*rebuild it"),
    (lambda s: s["members"][0].update(colour="grey"), "members\\[0\\].colour 'grey' is not one of imagenet"),
    (lambda s: s["members"][0].update(colour="centre"), "members disagree on crop/input_size/colour"),
    (lambda s: s.update(preprocess={"crop": 80, "input_size": 80, "colour": "centre"}),
     "field preprocess .* disagrees"),
    (lambda s: s.update(preprocess=[80]), "field preprocess \\[80\\] is not a crop/input_size/colour object"),
])
def test_a_bad_spec_is_one_line_naming_the_field(copied, change, message):
    _edit_spec(copied, change)
    with pytest.raises(SpecError, match=message) as caught:
        _ = EnsembleFolder(copied).spec
    assert "\n" not in str(caught.value) and "ensemble.json" in str(caught.value)
    r = runner.invoke(app, ["predict", str(copied), str(copied), "-o", str(copied / "p.csv")])
    assert r.exit_code == 1 and "Traceback" not in r.output and r.output.startswith("error: ")


def test_invalid_json_is_one_line(copied):
    (copied / "ensemble.json").write_text('{"format": "alldetect-ensemble", ')
    with pytest.raises(AlldetectError, match="ensemble.json: not valid JSON"):
        _ = EnsembleFolder(copied).spec


def test_a_version_2_folder_still_loads_and_calls_at_the_paper_threshold(ensemble_dir, tmp_path):
    old = tmp_path / "v2"
    shutil.copytree(ensemble_dir, old)
    spec = json.loads((old / "ensemble.json").read_text())
    spec["version"] = 2
    for m in spec["members"]:
        m["weights"], m["sha256"] = m["weights"][0], m["sha256"][0]
    del spec["operating_points"], spec["cross_fitted"], spec["preprocess"]["colour"]
    for m in spec["members"]:
        del m["colour"]
    (old / "ensemble.json").write_text(json.dumps(spec))
    loaded = EnsembleFolder(old).spec
    assert loaded.preprocess.colour == "imagenet"
    assert loaded.operating_point() == PAPER_POINT and [m.folds for m in loaded.members] == [1, 1]
    assert TorchEngine.from_folder(old, device="cpu").names == ["mobilenet", "efficientnet_lite0"]



@pytest.mark.parametrize("which", ["weights", "domain", "spec"])
@pytest.mark.parametrize("special", ["device", "fifo"])
def test_a_folder_file_that_is_no_regular_file_is_refused_before_it_is_read(copied, which, special):
    """A symlink to /dev/zero would be read until memory runs out, a named pipe waited on for ever."""
    import os

    path = {"weights": copied / json.loads((copied / "ensemble.json").read_text())["members"][0]["weights"][0],
            "domain": copied / EnsembleFolder.DOMAIN, "spec": copied / EnsembleFolder.SPEC}[which]
    path.unlink()
    if special == "device":
        path.symlink_to("/dev/zero")
    else:
        os.mkfifo(path)
    with pytest.raises(SpecError, match=f"{path.name}: .*refused: not a regular file") as caught:
        TorchEngine.from_folder(copied, device="cpu")
    assert "\n" not in str(caught.value)


def test_a_folder_file_beyond_its_size_bound_is_refused(copied, monkeypatch):
    from alldetect.ensemble import folder

    monkeypatch.setitem(folder.SIZE_LIMITS, "member weights", 1000)
    with pytest.raises(SpecError, match=r"weights.safetensors: member weights refused: [\d,]+ bytes, more than any "
                                        r"member weights \(at most 1,000\)"):
        TorchEngine.from_folder(copied, device="cpu")


def test_weights_too_small_to_divide_by_and_json_too_deep_are_one_line(copied):
    _edit_spec(copied, lambda s: s["methods"]["sap"].update(weights=[5e-324, 5e-324]))
    with pytest.raises(SpecError, match="methods.sap.weights .*reciprocal is finite"):
        _ = EnsembleFolder(copied).spec
    (copied / "ensemble.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(SpecError, match="nested too deeply"):
        _ = EnsembleFolder(copied).spec


def test_a_weights_path_with_a_nul_byte_is_one_line():
    from alldetect.models import create_member
    from alldetect.models._registry import WeightsUnavailable

    with pytest.raises(WeightsUnavailable, match="holds a NUL byte"):
        create_member("mobilenet", weights="weights\0.pth")
