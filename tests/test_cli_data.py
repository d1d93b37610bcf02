from typer.testing import CliRunner

from alldetect.cli import app
from alldetect.data.split import check_subject_disjoint
from alldetect.formats.manifest import read_manifest

runner = CliRunner()


def test_synth_index_split_paper_from_the_command_line(tmp_path):
    data, manifest = tmp_path / "data", tmp_path / "manifest.csv"
    r = runner.invoke(app, ["synth", str(data), "--size", "64", "--cells-per-subject", "3", "--format", "png"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["index", str(data), "--out", str(manifest)])
    assert r.exit_code == 0, r.output
    assert "SYNTHETIC" in r.output
    r = runner.invoke(app, ["split", str(manifest), "--protocol", "paper", "--seed", "1"])
    assert r.exit_code == 0, r.output
    rows = read_manifest(manifest)
    check_subject_disjoint(rows)
    assert {r.split for r in rows if r.source == "prelim"} == {"test"}
    assert {"train", "val"} <= {r.split for r in rows}


def test_synth_rejects_a_tiny_size(tmp_path):
    r = runner.invoke(app, ["synth", str(tmp_path), "--size", "10"])
    assert r.exit_code == 1 and "too small" in r.output
