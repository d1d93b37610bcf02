"""The web app under hostile and careless requests: bounded disk and memory, a responsive server, bad zip
entries as error rows, no call without a probability, a record that never costs an answer, same-origin only."""

import concurrent.futures
import csv
import io
import os
import tempfile
import threading
import zipfile

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import alldetect.serve.app as serve_app
from alldetect.serve import ServeSettings, create_app
from alldetect.serve.uploads import Limits

from helpers import running_server


def _png(size=80, value=90, noise=False) -> bytes:
    rgb = np.zeros((size, size, 3), np.uint8)
    if noise:
        rgb = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    else:
        yy, xx = np.mgrid[0:size, 0:size]
        rgb[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2] = (value, value // 3, value)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _app(ensemble_dir, tmp_path, **settings):
    return create_app(ensemble_dir, ServeSettings(db_path=str(tmp_path / "db.sqlite"), device="cpu", **settings))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_chunked_upload_is_cut_at_the_limit_and_nothing_is_spooled_to_disk(ensemble_dir, tmp_path, monkeypatch):
    spooled = []
    rollover = tempfile.SpooledTemporaryFile.rollover
    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", lambda self: spooled.append(1) or rollover(self))
    client = TestClient(_app(ensemble_dir, tmp_path, limits=Limits(max_request_bytes=3_000_000)))

    def body():  # no Content-Length: chunked
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'
        for _ in range(80):
            yield os.urandom(100_000)
        yield b"\r\n--b--\r\n"

    r = client.post("/api/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    ordinary = _png(size=800, noise=True)  # about 2 MB, above starlette's 1 MB spooling threshold
    assert len(ordinary) > 1_500_000
    r = client.post("/api/predict", files=[("files", ("ordinary.png", ordinary))])
    assert r.status_code == 200 and r.json()["cells"][0]["prob_all"] is not None
    assert spooled == [], "an upload was written to a temporary file on disk"


def test_memory_returns_after_a_heavy_request_and_pixels_per_request_are_bounded(ensemble_dir, tmp_path):
    big = _png(size=2000)  # 4 MP of mostly black: a few KB on the wire, 12 MB decoded
    client = TestClient(_app(ensemble_dir, tmp_path, limits=Limits(max_files=200, max_request_pixels=240_000_000)))
    assert client.post("/api/predict", files=[("files", (f"w{i}.png", big)) for i in range(3)]).status_code == 200
    before = _rss()
    r = client.post("/api/predict", files=[("files", (f"c{i}.png", big)) for i in range(50)])
    after = _rss()
    assert r.status_code == 200 and all(c["prob_all"] is not None for c in r.json()["cells"])
    assert after < before * 1.10, f"RSS {before / 1e6:.0f} MB -> {after / 1e6:.0f} MB"
    r = client.post("/api/predict", files=[("files", (f"c{i}.png", big)) for i in range(70)])
    assert r.status_code == 413 and "megapixels" in r.json()["detail"]


def test_health_answers_while_scoring_and_a_full_queue_gets_503(ensemble_dir, tmp_path, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real = serve_app.expand_uploads

    def held(files, limits):
        entered.set()
        release.wait(60)
        return real(files, limits)

    monkeypatch.setattr(serve_app, "expand_uploads", held)
    files = [("files", ("a.png", _png()))]
    with running_server(_app(ensemble_dir, tmp_path, max_queued=1)) as (url, _server), \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, f"{url}/api/predict", files=files, timeout=120)
        assert entered.wait(60)
        health = httpx.get(f"{url}/api/health", timeout=10)  # times out if scoring held the event loop
        assert health.json()["queued"] == 1 and httpx.get(url, timeout=10).status_code == 200
        busy = httpx.post(f"{url}/api/predict", files=files, timeout=10)
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) > 0
        release.set()
        assert first.result().status_code == 200


def _zip_with_bad_entries() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("good.png", _png(), compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("corrupt_deflate.png", _png(value=120), compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("bad_crc.png", _png(value=130))
        z.writestr("encrypted.png", _png(value=140))
        z.writestr("unknown_method.png", _png(value=150))
        z.writestr("lying_size.png", _png(value=160))
        infos = {i.filename: i for i in z.infolist()}
        infos["encrypted.png"].flag_bits |= 0x1
        infos["unknown_method.png"].compress_type = 99
        infos["lying_size.png"].file_size = 10
    data = bytearray(buffer.getvalue())
    for name, at in (("corrupt_deflate.png", 8), ("bad_crc.png", 60)):
        info = infos[name]
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        data[start + at:start + at + 8] = b"\xff" * 8
    return bytes(data)


def test_a_bad_zip_entry_is_an_error_row_and_the_rest_is_scored(ensemble_dir, tmp_path):
    client = TestClient(_app(ensemble_dir, tmp_path))
    r = client.post("/api/predict", files=[("files", ("patient.zip", _zip_with_bad_entries()))])
    assert r.status_code == 200, r.text
    cells = {c["name"]: c for c in r.json()["cells"]}
    assert cells["good.png"]["prob_all"] is not None and not cells["good.png"]["error"]
    for name in ("corrupt_deflate.png", "bad_crc.png", "encrypted.png", "unknown_method.png", "lying_size.png"):
        assert cells[name]["prob_all"] is None and cells[name]["call"] is None
        assert cells[name]["error"], name
    assert "encrypted" in cells["encrypted.png"]["error"]
    assert "compression" in cells["unknown_method.png"]["error"]


def test_a_cell_without_a_probability_is_never_called(ensemble_dir, tmp_path, monkeypatch):
    real = serve_app.load_engine

    def broken_engine(*args, **kwargs):
        engine = real(*args, **kwargs)
        predict = engine.predict
        engine.predict = lambda crops, tta=False: (np.full(len(crops), np.nan), predict(crops, tta=tta)[1])
        return engine

    monkeypatch.setattr(serve_app, "load_engine", broken_engine)
    cell = TestClient(_app(ensemble_dir, tmp_path)).post(
        "/api/predict", files=[("files", ("a.png", _png()))]).json()["cells"][0]
    assert cell["prob_all"] is None and cell["call"] is None and "no probability" in cell["error"]


def test_the_record_never_costs_an_answer(ensemble_dir, tmp_path):
    db = tmp_path / "db.sqlite"
    client = TestClient(_app(ensemble_dir, tmp_path))
    files = [("files", ("a.png", _png()))]
    assert client.post("/api/predict", files=files).json()["recorded"] is True
    db.unlink()
    body = client.post("/api/predict", files=files).json()
    assert body["recorded"] is True and db.is_file()  # recreated
    assert client.get(f"/api/results/{body['request_id']}.csv").status_code == 200
    db.unlink()
    db.mkdir()  # now nothing can be written there
    body = client.post("/api/predict", files=files).json()
    assert body["cells"][0]["prob_all"] is not None and body["recorded"] is False
    health = client.get("/api/health").json()
    assert health["status"] == "degraded" and "not writable" in health["store"]


def test_serve_refuses_a_folder_as_its_database(ensemble_dir, tmp_path):
    from typer.testing import CliRunner

    from alldetect.cli import app

    r = CliRunner().invoke(app, ["serve", str(ensemble_dir), "--db", str(tmp_path)])
    assert r.exit_code == 1 and "is a folder" in r.output and "Traceback" not in r.output


def test_names_that_spreadsheets_would_run_are_neutralised(ensemble_dir, tmp_path):
    client = TestClient(_app(ensemble_dir, tmp_path))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("@SUM(1+1)*cmd.png", _png())
    body = client.post("/api/predict", files=[("files", ("=HYPERLINK(evil).png", _png())),
                                              ("files", ("-2+3.png", _png())),
                                              ("files", ("patient7.zip", archive.getvalue()))]).json()
    rows = list(csv.DictReader(io.StringIO(client.get(body["csv_url"]).text)))
    assert [r["path"] for r in rows] == ["'=HYPERLINK(evil).png", "'-2+3.png", "'@SUM(1+1)*cmd.png"]
    assert rows[2]["subject"] == "patient7"  # the zip's name, as in the JSON answer


def test_only_same_origin_requests_and_bound_hosts(ensemble_dir, tmp_path):
    client = TestClient(_app(ensemble_dir, tmp_path, allowed_hosts=("testserver", "127.0.0.1")))
    files = [("files", ("a.png", _png()))]
    r = client.post("/api/predict", files=files, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    assert client.post("/api/predict", files=files, headers={"origin": "http://testserver"}).status_code == 200
    assert client.get("/history", headers={"host": "rebound.example:8000"}).status_code == 421
    assert client.get("/history").status_code == 200


def test_empty_uploads_get_the_message_the_command_line_gives(ensemble_dir, tmp_path):
    from alldetect.data.images import read_rgb
    from alldetect.errors import ImageProblem

    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageProblem) as cli_error:
        read_rgb(tmp_path / "empty.png")
    cell = TestClient(_app(ensemble_dir, tmp_path)).post(
        "/api/predict", files=[("files", ("empty.png", b""))]).json()["cells"][0]
    assert cell["error"] == cli_error.value.reason


def test_the_unzip_budget_is_per_request_not_per_zip(ensemble_dir, tmp_path):
    def zeros(n):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("zeros.bin", b"\0" * n)
        return buffer.getvalue()

    client = TestClient(_app(ensemble_dir, tmp_path, limits=Limits(max_unzipped_bytes=3_000_000)))
    one = [("files", ("a.zip", zeros(2_000_000)))]
    assert client.post("/api/predict", files=one).status_code == 200  # one zip under the budget
    r = client.post("/api/predict", files=one + [("files", ("b.zip", zeros(2_000_000)))])
    assert r.status_code == 413 and "inflates" in r.json()["detail"]
