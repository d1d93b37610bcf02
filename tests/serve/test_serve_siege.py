"""The server under siege and careless use: slow bodies, unfinished headers, refused bodies still arriving,
clients that hang up, whose history is shown to whom, one ensemble for scores and Grad-CAM, names that
would disguise themselves, and what the decoder did to a cell."""

import gc
import io
import logging
import socket
import time

import httpx
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from alldetect.inference.torch_engine import TorchEngine
from alldetect.serve import ServeSettings, create_app
from alldetect.serve.connections import EVICTABLE_AFTER, ConnectionLimits
from alldetect.serve.uploads import Limits

from helpers import running_server


def _png(value=90, size=80, alpha=None) -> bytes:
    yy, xx = np.mgrid[0:size, 0:size]
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2] = (value, value // 3, value)
    image = Image.fromarray(rgb) if alpha is None else Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _app(ensemble_dir, tmp_path, **settings):
    return create_app(ensemble_dir, ServeSettings(db_path=str(tmp_path / "db.sqlite"), device="cpu", **settings))


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """True when the server closes ``sock`` (EOF or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_slow_bodies_take_no_queue_place_and_are_closed_at_the_body_limit(ensemble_dir, tmp_path, caplog):
    limits = ConnectionLimits(header_seconds=60, body_seconds=2)
    with caplog.at_level(logging.WARNING), \
            running_server(_app(ensemble_dir, tmp_path, max_queued=2), limits=limits) as (url, _server):
        slow = []
        for _ in range(4):  # more than the queue holds
            sock = _connect(url)
            sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                         b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b")
            slow.append(sock)
        time.sleep(0.3)
        r = httpx.post(f"{url}/api/predict", files=[("files", ("a.png", _png()))], timeout=30)
        assert r.status_code == 200, r.text
        assert all(_closed_by_server(s, within=60) for s in slow)
    closed = [r for r in caplog.records if "the request body did not arrive within 2s" in r.getMessage()]
    assert len(closed) == 4  # by the body limit, not by the (60 s) header limit


def test_unfinished_headers_are_closed_and_cannot_take_every_connection(ensemble_dir, tmp_path):
    limits = ConnectionLimits(header_seconds=2, max_connections=40, max_per_client=30)
    with running_server(_app(ensemble_dir, tmp_path), limits=limits) as (url, _server):
        half = []
        for _ in range(80):  # twice the cap, from one address
            sock = _connect(url)
            sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127")
            half.append(sock)
        time.sleep(EVICTABLE_AFTER + 0.5)
        assert httpx.get(f"{url}/api/health", timeout=10).status_code == 200  # room is made for it
        r = httpx.post(f"{url}/api/predict", files=[("files", ("a.png", _png()))], timeout=30)
        assert r.status_code == 200, r.text
        assert all(_closed_by_server(s, within=60) for s in half)


def test_a_refused_body_is_not_read_to_its_end(ensemble_dir, tmp_path):
    """An upload over the limit gets its 413, and the server stops reading: the client cannot go on pushing
    the rest of a huge body into it."""
    app = _app(ensemble_dir, tmp_path, limits=Limits(max_request_bytes=1_000_000))
    with running_server(app) as (url, _server):
        sock = _connect(url)
        sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                     b"boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n")
        part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'
        sock.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
        block = b"%x\r\n" % (1 << 20) + b"\0" * (1 << 20) + b"\r\n"
        sent = 0
        try:
            for _ in range(256):
                sock.sendall(block)
                sent += 1
        except OSError:
            pass
        assert sent < 64, f"the server read {sent} MiB of a request it had refused after 1 MB"
        sock.settimeout(5)
        try:
            answer = sock.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert answer == b"" or answer.startswith(b"HTTP/1.1 413")


def test_a_connection_whose_refused_body_ended_serves_the_next_request(ensemble_dir, tmp_path):
    app = _app(ensemble_dir, tmp_path, limits=Limits(max_request_bytes=1_000_000))

    def over_the_limit():
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'
        for _ in range(15):
            yield b"\0" * 100_000
        yield b"\r\n--b--\r\n"

    with running_server(app) as (url, _server), httpx.Client(timeout=30) as client:
        r = client.post(f"{url}/api/predict", content=over_the_limit(),
                        headers={"content-type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413
        r = client.post(f"{url}/api/predict", files=[("files", ("a.png", _png()))])
        assert r.status_code == 200, r.text


def test_a_client_that_hangs_up_mid_upload_is_one_log_line(ensemble_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING), running_server(_app(ensemble_dir, tmp_path)) as (url, _server):
        sock = _connect(url)
        sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                     b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n" + b"x" * 1000)
        time.sleep(0.3)
        sock.close()
        time.sleep(0.5)
        assert httpx.get(f"{url}/api/health", timeout=10).status_code == 200
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in records] == ["127.0.0.1 hung up while sending an upload; nothing was scored"]
    assert all(r.exc_info is None for r in caplog.records)


def test_history_is_private_by_default_shared_or_off_on_request(ensemble_dir, tmp_path):
    app = _app(ensemble_dir, tmp_path)
    alice, bob = TestClient(app), TestClient(app)
    alice.post("/api/predict", files=[("files", ("alice_cell.png", _png()))])
    bob.post("/api/predict", files=[("files", ("bob_cell.png", _png()))])
    assert "alice_cell.png" in alice.get("/history").text and "bob_cell.png" not in alice.get("/history").text
    assert "bob_cell.png" in bob.get("/history").text and "alice_cell.png" not in bob.get("/history").text
    stranger = TestClient(app).get("/history").text
    assert "alice_cell.png" not in stranger and "bob_cell.png" not in stranger
    shared = TestClient(_app(ensemble_dir, tmp_path, history="shared")).get("/history").text
    assert "alice_cell.png" in shared and "bob_cell.png" in shared
    assert TestClient(_app(ensemble_dir, tmp_path, history="off")).get("/history").status_code == 404


def _ensembles_alive() -> int:
    gc.collect()
    return sum(type(o) is TorchEngine for o in gc.get_objects())


def test_grad_cam_keeps_no_second_ensemble_in_memory(ensemble_dir, tmp_path):
    client = TestClient(_app(ensemble_dir, tmp_path))
    before = _ensembles_alive()
    body = client.post("/api/predict?cam=true", files=[("files", ("a.png", _png()))]).json()
    assert body["cells"][0]["cam_png"].startswith("data:image/png;base64,")
    assert _ensembles_alive() == before


def test_hidden_characters_in_names_are_shown_escaped_everywhere(ensemble_dir, tmp_path):
    client = TestClient(_app(ensemble_dir, tmp_path))
    disguised = "cell\u202egnp.exe.png"
    body = client.post("/api/predict", files=[("files", (disguised, _png()))]).json()
    shown = "cell\\u202egnp.exe.png"
    assert body["cells"][0]["name"] == shown
    assert shown in client.get(body["csv_url"]).text
    history = client.get("/history").text
    assert shown in history and "\u202e" not in history


def test_what_the_decoder_did_to_a_cell_is_said(ensemble_dir, tmp_path):
    alpha = np.full((80, 80), 255, np.uint8)
    alpha[:20] = 0
    cells = TestClient(_app(ensemble_dir, tmp_path)).post("/api/predict", files=[
        ("files", ("half.png", _png(alpha=alpha))), ("files", ("plain.png", _png()))]).json()["cells"]
    assert "composited onto black" in cells[0]["warning"] and cells[1]["warning"] == ""
