"""Every command's --help prints its texts as written (brackets included) and its defaults; profiles' defaults
hold unless an option is given."""

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from alldetect.cli import app

COMMANDS = typer.main.get_command(app).commands


def _squeeze(text: str) -> str:
    return "".join(text.split())  # the help formatter wraps lines anywhere, hyphens included


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_prints_every_option_text_whole(name):
    result = CliRunner().invoke(app, [name, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    shown = _squeeze(result.output)
    for param in COMMANDS[name].params:
        if getattr(param, "help", None):
            assert _squeeze(param.help) in shown, f"{name} {param.name}: help text lost"


def test_help_shows_defaults_and_bracketed_notes():
    run = _squeeze(CliRunner().invoke(app, ["run", "--help"], terminal_width=100).output)
    assert _squeeze("[default: built-in synthetic cells]") in run
    index = _squeeze(CliRunner().invoke(app, ["index", "--help"], terminal_width=100).output)
    assert _squeeze("[default: manifest.csv]") in index
    train = _squeeze(CliRunner().invoke(app, ["train", "--help"], terminal_width=100).output)
    assert _squeeze("[paper: 12 = one triangular2 cycle; plus: 12]") in train and "[default:paper]" in train


@pytest.mark.parametrize("args, pretrained", [(["--profile", "demo"], False), (["--profile", "plus"], True),
                                              (["--profile", "demo", "--pretrained"], True),
                                              (["--profile", "paper", "--no-pretrained"], False)])
def test_train_keeps_the_profile_default_unless_asked(split_manifest, tmp_path, monkeypatch, args, pretrained):
    import alldetect.training

    seen = {}
    monkeypatch.setattr(alldetect.training, "fit", lambda cfg, resume=False: seen.setdefault("cfg", cfg) and tmp_path)
    result = CliRunner().invoke(app, ["train", str(split_manifest), "--member", "mobilenet", *args])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].pretrained is pretrained


def test_the_command_line_starts_without_torch():
    """Help, and every error found while parsing, come without the seconds torch takes to import."""
    probe = "import sys, alldetect.cli; print(sorted(m for m in ('torch', 'timm', 'onnx') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
