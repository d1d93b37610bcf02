"""The predictions contract: bad files are one clear error."""


import pytest
from typer.testing import CliRunner

from alldetect.cli import app

runner = CliRunner()


@pytest.mark.parametrize("content, message", [
    ("path,prob_all\na.png,0.5\n", "missing column"),
    ("path,label,prob_all\na.png,all,1.5\n", "not a probability"),
    ("path,label,prob_all\na.png,all,nan\n", "not a probability"),
    ("path,label,prob_all\na.png,all,x\n", "not a number"),
    ("path,label,prob_all\na.png,blast,0.5\n", "label 'blast'"),
])
def test_bad_prediction_files_are_clear_errors(tmp_path, content, message):
    (tmp_path / "p.csv").write_text(content)
    r = runner.invoke(app, ["evaluate", str(tmp_path / "p.csv")])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output
