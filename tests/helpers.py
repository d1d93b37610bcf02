"""Helpers the tests share: small cell images, a seconds-long training config, a server on a free port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_cell(path: Path, *, size: int = 64, value: int = 90, mode: str = "RGB") -> Path:
    """A small bright disc on black, saved in whatever format the suffix says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[disc] = (value, value // 3, value)
    Image.fromarray(rgb).convert(mode).save(path)
    return path


def tiny_config(manifest: Path, out: Path, **overrides):
    """A seconds-long CPU training config: MobileNet, 64 px crops, random init."""
    from alldetect.training import TrainConfig

    base = dict(member="mobilenet", manifest=str(manifest), out=str(out), crop=64, epochs=2, batch_size=8,
                clr_step_epochs=1, pretrained=False, device="cpu", workers=0, seed=0)
    return TrainConfig(**{**base, **overrides})


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1", limits=None):
    """Serve ``app`` as `alldetect serve` does (``serve.server.make_server``, connection rules included) in a
    thread on a free port; yields its base URL and the server."""
    from alldetect.serve.connections import ConnectionLimits
    from alldetect.serve.server import make_server

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server, sockets = make_server(app, host, port, limits or ConnectionLimits(), log_level="warning")
    with serving(server, sockets):
        yield f"http://{'[' + host + ']' if ':' in host else host}:{port}", server


@contextlib.contextmanager
def serving(server, sockets=None):
    """Run a uvicorn ``server`` in a thread until the block ends."""
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def run_command(synth, crop: int, args: list[str], out: Path) -> list[str]:
    """A command line that runs ``alldetect ARGS --out OUT`` in a fresh interpreter on the synthetic set
    ``synth`` (a SynthConfig) with ``crop`` px crops, for tests that kill and rerun a real process."""
    import sys

    script = (
        "import sys\n"
        "from alldetect import pipeline\n"
        "from alldetect.data.synth import SynthConfig\n"
        f"pipeline.DEMO_SYNTH = SynthConfig(**{synth.__dict__!r})\n"
        f"pipeline.DEMO_CROP = {crop}\n"
        "from alldetect.cli import app\n"
        f"sys.argv = ['alldetect', *{args!r}, '--out', sys.argv[1]]\n"
        "app()\n")
    return [sys.executable, "-c", script, str(out)]


def kill_when_written(command: list[str], marker: Path, *, timeout: float = 180) -> None:
    """Start ``command``, SIGKILL it as soon as ``marker`` exists, and check that the kill landed then."""
    import os
    import signal
    import subprocess

    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), f"the kill must land once {marker} is written"


def history_steps(run_dir: Path) -> list[int]:
    """The optimizer steps a run's history.csv records, in order."""
    return [int(line.split(",")[0]) for line in (run_dir / "history.csv").read_text().splitlines()[1:]]
