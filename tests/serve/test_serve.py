"""The web app: API, safety rules, concurrency, and the page in a real browser."""

import concurrent.futures
import io
import os
import shutil
import socket
import sqlite3
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from alldetect.serve import ServeSettings, create_app
from alldetect.serve.uploads import Limits

from helpers import running_server, serving


def _png(value=90, size=80, mode="RGB") -> bytes:
    yy, xx = np.mgrid[0:size, 0:size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[disc] = (value, value // 3, value)
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(ensemble_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("serve") / "predictions.sqlite"
    settings = ServeSettings(db_path=str(db), device="cpu",
                             limits=Limits(max_request_bytes=2_000_000, max_files=20, max_unzipped_bytes=3_000_000),
                             domain_check=False)  # discs on black are not cells: test_domain_check checks that
    return TestClient(create_app(ensemble_dir, settings)), db


def test_health_model_and_openapi(served):
    client, _ = served
    assert client.get("/api/health").json()["status"] == "ok"
    info = client.get("/api/model").json()
    assert [m["name"] for m in info["members"]] == ["mobilenet", "efficientnet_lite0"]
    assert info["method"] == "wen_kappa" and info["data"]["synthetic"] is True
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/predict", "/api/health", "/api/model"} <= set(paths)


def test_predict_cells_members_cam_patients_csv_and_record(served):
    client, db = served
    files = [("files", ("UID_7_1_1_all.png", _png(90))), ("files", ("UID_7_1_2_all.png", _png(120))),
             ("files", ("UID_H3_1_1_hem.png", _png(60)))]
    r = client.post("/api/predict?cam=true", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["name"] for c in body["cells"]] == ["UID_7_1_1_all.png", "UID_7_1_2_all.png", "UID_H3_1_1_hem.png"]
    for c in body["cells"]:
        assert 0 <= c["prob_all"] <= 1 and set(c["members"]) == {"mobilenet", "efficientnet_lite0"}
        assert c["cam_png"].startswith("data:image/png;base64,")
    patients = {p["subject"]: p for p in body["patients"]}
    assert patients["7"]["cells"] == 2 and patients["H3"]["cells"] == 1
    assert patients["7"]["mean_prob_all"] == pytest.approx(np.mean([c["prob_all"] for c in body["cells"][:2]]))
    csv_text = client.get(body["csv_url"]).text
    assert csv_text.splitlines()[0].startswith("path,label,prob_all,model,subject,prob_mobilenet")
    assert len(csv_text.splitlines()) == 4
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT file_name, sha256, prob_all, model_id FROM predictions WHERE request_id = ?",
                            (body["request_id"],)).fetchall()
    assert len(rows) == 3 and rows[0][3] == body["model_id"] and len(rows[0][1]) == 64
    assert "UID_7_1_1_all.png" in client.get("/history").text


def test_same_cells_as_the_predict_command(served, ensemble_dir, tmp_path):
    from alldetect.inference.load import load_engine
    from alldetect.inference.predict import collect_inputs, predict_rows
    from alldetect.formats.predictions import read_predictions

    client, _ = served
    cells = {"UID_9_1_1_all.png": _png(100), "UID_9_1_2_all.png": _png(60), "UID_H4_1_1_hem.png": _png(140)}
    for name, data in cells.items():
        (tmp_path / "cells" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "cells" / name).write_bytes(data)
    summary = predict_rows(load_engine(ensemble_dir, device="cpu"), collect_inputs([tmp_path / "cells"]),
                           tmp_path / "p.csv", domain_check=False)  # as the server of this file
    expected = read_predictions(tmp_path / "p.csv")["wen_kappa"]
    got = client.post("/api/predict", files=[("files", item) for item in cells.items()]).json()
    served_probs = {c["name"]: c["prob_all"] for c in got["cells"]}
    assert [served_probs[Path(p).name] for p in expected.path] == pytest.approx(expected.prob_all.tolist(), abs=1e-6)
    keys = ("subject", "cells", "flagged_all", "call")
    assert [{k: p[k] for k in keys} for p in got["patients"]] == [{k: p[k] for k in keys} for p in summary.patients]
    assert [p["mean_prob_all"] for p in got["patients"]] == \
        pytest.approx([p["mean_prob_all"] for p in summary.patients], abs=1e-6)


def test_a_zip_is_one_patient(served):
    client, _ = served
    archive = _zip({"cells/a.png": _png(90), "cells/b.png": _png(100), "__MACOSX/._a.png": b"junk"})
    body = client.post("/api/predict", files=[("files", ("patient42.zip", archive))]).json()
    assert [c["name"] for c in body["cells"]] == ["cells/a.png", "cells/b.png"]
    assert [p["subject"] for p in body["patients"]] == ["patient42"]


@pytest.mark.parametrize("entries, message", [
    ({"../evil.png": b"x"}, "absolute path or '..'"),
    ({"/etc/evil.png": b"x"}, "absolute path or '..'"),
    ({"a/../../evil.png": b"x"}, "absolute path or '..'"),
])
def test_zip_path_traversal_is_refused(served, entries, message):
    client, _ = served
    r = client.post("/api/predict", files=[("files", ("p.zip", _zip(entries)))])
    assert r.status_code == 400 and message in r.json()["detail"]


def test_zip_bomb_and_too_many_files_are_refused(served):
    client, _ = served
    bomb = _zip({"big.bin": b"\0" * 5_000_000})  # ~5 KB compressed, 5 MB inflated
    assert len(bomb) < 100_000
    r = client.post("/api/predict", files=[("files", ("bomb.zip", bomb))])
    assert r.status_code == 413 and "inflates" in r.json()["detail"]
    many = _zip({f"{i}.png": _png() for i in range(25)})
    r = client.post("/api/predict", files=[("files", ("many.zip", many))])
    assert r.status_code == 413 and "entries" in r.json()["detail"]
    r = client.post("/api/predict", files=[("files", (f"{i}.png", _png())) for i in range(22)])
    assert r.status_code == 413


def test_upload_size_limit(served):
    client, _ = served
    r = client.post("/api/predict", files=[("files", ("huge.png", os.urandom(2_500_000)))])
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_type_is_decided_by_content_not_name(served):
    client, _ = served
    files = [("files", ("cell.png", b"MZ\x90\x00 this is an executable")),
             ("files", ("looks_like.txt", _png(90))),
             ("files", ("cell.gif", _gif()))]
    body = client.post("/api/predict", files=files).json()
    cells = {c["name"]: c for c in body["cells"]}
    assert cells["cell.png"]["prob_all"] is None and "not an image" in cells["cell.png"]["error"]
    assert cells["looks_like.txt"]["prob_all"] is not None  # a PNG whatever its name
    assert "accepted: BMP, PNG, JPEG, TIFF" in cells["cell.gif"]["error"]


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (80, 80)).save(buffer, format="GIF")
    return buffer.getvalue()


def test_decompression_bomb_image_is_refused_per_file(served):
    client, _ = served
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")  # 25 MP from a few KB
    body = client.post("/api/predict", files=[("files", ("bomb.png", buffer.getvalue())),
                                              ("files", ("ok.png", _png()))]).json()
    cells = {c["name"]: c for c in body["cells"]}
    assert "pixel limit" in cells["bomb.png"]["error"] and cells["ok.png"]["prob_all"] is not None


@pytest.mark.parametrize("kwargs, status, message", [
    ({"data": {"x": "1"}}, 400, "multipart/form-data"),
    ({"files": [("other", ("a.png", b"1"))]}, 400, "no files"),
    ({"content": b"--xx\r\nnonsense", "headers": {"content-type": "multipart/form-data; boundary=xx"}}, 400, ""),
])
def test_malformed_requests_get_a_readable_4xx(served, kwargs, status, message):
    client, _ = served
    r = client.post("/api/predict", **kwargs)
    assert r.status_code == status and message in r.json()["detail"]
    assert client.post("/api/predict?cam=maybe", files=[("files", ("a.png", _png()))]).status_code == 422


def test_nothing_from_an_upload_is_written_to_disk(served, tmp_path, monkeypatch):
    client, db = served
    watched = [Path.cwd(), db.parent]
    before = {p for d in watched for p in d.rglob("*")}
    client.post("/api/predict", files=[("files", ("p.zip", _zip({"a.png": _png()})))])
    after = {p for d in watched for p in d.rglob("*")}
    assert {p for p in after - before if not p.name.endswith("-journal")} == set()


def test_concurrent_requests_do_not_mix(served):
    client, _ = served
    values = [40, 80, 120, 160, 200, 240]
    expected = {v: client.post("/api/predict", files=[("files", (f"{v}.png", _png(v)))]).json()["cells"][0]["prob_all"]
                for v in values}

    def ask(v):
        body = client.post("/api/predict", files=[("files", (f"{v}.png", _png(v)))]).json()
        return v, body["cells"][0]["name"], body["cells"][0]["prob_all"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for v, name, prob in pool.map(ask, values * 4):
            assert name == f"{v}.png" and prob == pytest.approx(expected[v], abs=1e-9)


def _serve_command(ensemble_dir, tmp_path, monkeypatch, args, while_serving):
    """Run `alldetect serve ARGS` for real on a free port; ``while_serving(server)`` runs while it listens."""
    import uvicorn
    from typer.testing import CliRunner

    from alldetect.cli import app

    real_run = uvicorn.Server.run

    def start(server, sockets=None):
        monkeypatch.setattr(uvicorn.Server, "run", real_run)
        with serving(server, sockets):
            while_serving(server)

    monkeypatch.setattr(uvicorn.Server, "run", start)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(app, ["serve", str(ensemble_dir), "--db", str(tmp_path / "p.sqlite"),
                                      "--device", "cpu", "--port", str(port), *args])
    assert result.exit_code == 0, result.output


def test_serve_binds_loopback_by_default(ensemble_dir, tmp_path, monkeypatch):
    """`alldetect serve` with no --host: the server really listens on 127.0.0.1 and nowhere else."""
    bound = []
    _serve_command(ensemble_dir, tmp_path, monkeypatch, [], lambda server: bound.extend(
        s.getsockname()[0] for srv in server.servers for s in srv.sockets))
    assert bound == ["127.0.0.1"]


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 in this Python")
def test_host_ipv6_wildcard_answers_on_both_stacks(ensemble_dir, tmp_path, monkeypatch):
    answered = {}

    def ask(server):
        port = server.config.port
        for stack, host in (("ipv4", "127.0.0.1"), ("ipv6", "[::1]")):
            answered[stack] = httpx.get(f"http://{host}:{port}/api/health", timeout=10).status_code

    _serve_command(ensemble_dir, tmp_path, monkeypatch, ["--host", "::"], ask)
    assert answered == {"ipv4": 200, "ipv6": 200}


# ---- the page in a real browser --------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def live_server(ensemble_dir, tmp_path_factory):
    settings = ServeSettings(db_path=str(tmp_path_factory.mktemp("live") / "p.sqlite"), device="cpu")
    with running_server(create_app(ensemble_dir, settings)) as (url, _server):
        yield url


def test_page_in_headless_chromium(live_server, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"browser test skipped: no Chromium at {CHROMIUM} (install Debian's chromium package; "
                    ".ci/run does it with apt-get)")
    from playwright.sync_api import sync_playwright

    import httpx

    cell = tmp_path / "UID_5_1_1_all.png"
    cell.write_bytes(_png(110))
    api = httpx.post(f"{live_server}/api/predict", files=[("files", (cell.name, cell.read_bytes()))], timeout=60).json()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(live_server)
        page.set_input_files("#files", str(cell))
        page.click("#submit")
        page.wait_for_selector("#results:not([hidden])", timeout=60_000)
        shown = page.inner_text("tr[data-testid='cell-0'] td.prob")
        verdict = page.inner_text("tr[data-testid='cell-0'] [data-testid='outside-0']")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    assert float(shown) == pytest.approx(api["cells"][0]["prob_all"], abs=1e-4)  # the flag never hides it
    # a disc on black is not like the training cells: shown as outside, with the reason, instead of ALL/HEM
    assert api["cells"][0]["call"] == "OUTSIDE"
    assert "outside what this model was trained on" in verdict and api["cells"][0]["domain_note"] in verdict
    assert (tmp_path / "page.png").stat().st_size > 10_000
