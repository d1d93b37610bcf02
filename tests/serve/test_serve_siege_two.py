"""Siege, round two: clients that never read their answers (closed after a bounded time, or sooner to make room),
one address holding every upload slot, two framings of one body, a request of many blank megapixels, and a
history lookup that must not scan the whole record."""

import errno
import io
import math
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from alldetect.serve import ServeSettings, create_app
from alldetect.serve.connections import EVICTABLE_AFTER, ConnectionLimits
from alldetect.serve.store import PredictionStore

from helpers import running_server

PIPELINED = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _app(ensemble_dir, tmp_path, **settings):
    return create_app(ensemble_dir, ServeSettings(db_path=str(tmp_path / "db.sqlite"), device="cpu", **settings))


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _never_reading(url: str) -> socket.socket:
    """A connection that pipelines page requests until its send buffer is full, and never reads an answer."""
    sock = socket.create_connection(_address(url), timeout=10)
    sock.setblocking(False)
    try:
        for _ in range(20_000):
            sock.send(PIPELINED)
    except BlockingIOError:
        pass
    return sock


def _reset_within(sock: socket.socket, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock.send(b"G")
        except BlockingIOError:
            time.sleep(0.2)
        except OSError as e:  # reset or broken pipe: the server closed it
            return e.errno in (errno.ECONNRESET, errno.EPIPE)
        else:
            time.sleep(0.05)
    return False


def _from(address: str, url: str, path: str = "/api/health") -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(transport=transport, timeout=10) as client:
        return client.get(f"{url}{path}")


def test_a_client_that_never_reads_is_closed_after_the_send_limit(ensemble_dir, tmp_path):
    limits = ConnectionLimits(send_seconds=2, max_connections=40, max_per_client=20)
    with running_server(_app(ensemble_dir, tmp_path), limits=limits) as (url, _server):
        stalled = [_never_reading(url) for _ in range(5)]
        assert _from("127.0.0.2", url).status_code == 200
        assert all(_reset_within(s, 15) for s in stalled)


def _stalled(server, n: int, within: float = 30) -> bool:
    guard = server.config.http.guard
    deadline = time.monotonic() + within
    while sum(map(len, guard.stalled.values())) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return sum(map(len, guard.stalled.values())) >= n


def test_a_client_that_never_reads_gets_only_the_answers_that_fit_its_buffers(ensemble_dir, tmp_path):
    limits = ConnectionLimits(send_seconds=600)
    with running_server(_app(ensemble_dir, tmp_path), limits=limits) as (url, server):
        sock = _never_reading(url)  # thousands of page requests pipelined
        assert _stalled(server, 1)
        time.sleep(3)
        assert server.server_state.total_requests <= 64  # 5 KB pages: those that fill the buffers on the way
        sock.close()


def test_pipelined_requests_are_all_answered_once_the_client_reads(ensemble_dir, tmp_path):
    with running_server(_app(ensemble_dir, tmp_path)) as (url, server):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # 60 pages cannot wait in it
            sock.settimeout(10)
            sock.connect(_address(url))
            sock.sendall(PIPELINED * 60)
            assert _stalled(server, 1)  # the answers wait for the client
            received = b""
            while received.count(b"</html>") < 60:
                chunk = sock.recv(1 << 16)
                assert chunk, f"closed after {received.count(b'</html>')} of 60 pages"
                received += chunk
        assert received.count(b"HTTP/1.1 200 OK") == 60


def test_a_slow_reader_of_a_large_answer_is_not_closed(ensemble_dir, tmp_path):
    app = _app(ensemble_dir, tmp_path)
    cells = [{"name": f"UID_{i}_1_1_all_{'x' * 60}.bmp", "sha256": "0" * 64, "prob_all": 0.5, "members": {},
              "error": "", "group": "UID_1"} for i in range(1000)]
    assert PredictionStore(tmp_path / "db.sqlite").record("large", "model", cells)
    with running_server(app, limits=ConnectionLimits(send_seconds=1)) as (url, server):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(10)
            sock.connect(_address(url))
            sock.sendall(b"GET /api/results/large.csv HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            received, steps = b"", 0
            while received.count(b"UID_") < 1000:
                time.sleep(0.25)  # a few KB a step: slower than the send limit allows for the whole answer
                chunk = sock.recv(1 << 16)
                assert chunk, f"closed after {len(received):,} bytes"
                received, steps = received + chunk, steps + 1
        assert steps * 0.25 > 2 * server.config.http.guard.limits.send_seconds  # it did read for that long


def test_one_address_starts_requests_at_its_rate_however_many_connections_it_opens(ensemble_dir, tmp_path):
    limits = ConnectionLimits(requests_per_second=5)  # after a burst of 10
    with running_server(_app(ensemble_dir, tmp_path), limits=limits) as (url, server):
        flood = []
        for _ in range(30):
            sock = socket.create_connection(_address(url), timeout=10, source_address=("127.0.0.2", 0))
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            flood.append(sock)
        time.sleep(1)
        answered = server.server_state.total_requests
        # the limiter's own schedule, read after the count: turns it set later than now have not started
        guard = server.config.http.guard
        scheduled_later = (guard.next_turn["127.0.0.2"] - time.monotonic()) * limits.requests_per_second
        assert answered <= 30 - math.floor(scheduled_later) + 1  # no request started before its turn
        assert _from("127.0.0.3", url).status_code == 200
        assert server.server_state.total_requests < 30 + 1  # answered while the flood still waits its turns
        assert all(b"200 OK" in sock.recv(4096) for sock in flood)  # each in its turn (within 4 s)
        for sock in flood:
            sock.close()


@pytest.mark.slow
def test_clients_that_never_read_make_room_when_the_server_is_full(ensemble_dir, tmp_path):
    limits = ConnectionLimits(send_seconds=600, max_connections=8, max_per_client=8)
    with running_server(_app(ensemble_dir, tmp_path), limits=limits) as (url, server):
        stalled = [_never_reading(url) for _ in range(8)]  # every connection the server allows
        _stalled(server, 8, within=60)  # until the answers fill every buffer between the server and these clients
        time.sleep(EVICTABLE_AFTER + 0.5)
        assert _from("127.0.0.2", url).status_code == 200  # long before the send limit: one was closed for it
        assert sum(_reset_within(s, 2) for s in stalled) >= 1


def _png() -> bytes:
    rgb = np.zeros((80, 80, 3), np.uint8)
    rgb[20:60, 20:60] = (90, 30, 90)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def test_one_address_cannot_hold_every_upload_slot(ensemble_dir, tmp_path):
    app = _app(ensemble_dir, tmp_path, max_receiving=64, max_receiving_per_client=3)
    with running_server(app) as (url, _server):
        slow = []
        for _ in range(4):
            sock = socket.create_connection(_address(url), timeout=10)
            sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                         b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b")
            slow.append(sock)
            time.sleep(0.2)
        assert slow[-1].recv(12).startswith(b"HTTP/1.1 503")  # the fourth from this address
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(transport=transport, timeout=60) as client:
            r = client.post(f"{url}/api/predict", files=[("files", ("a.png", _png()))])
        assert r.status_code == 200, r.text


def test_transfer_encoding_with_content_length_is_refused(ensemble_dir, tmp_path):
    with running_server(_app(ensemble_dir, tmp_path)) as (url, _server):
        sock = socket.create_connection(_address(url), timeout=10)
        sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                     b"boundary=b\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        answer = b""
        while b"not both" not in answer:  # headers and body may come in separate segments
            part = sock.recv(4096)
            if not part:
                break
            answer += part
        assert answer.startswith(b"HTTP/1.1 400") and b"not both" in answer, answer


def test_pixel_work_per_request_is_bounded_with_a_413_naming_the_bound(ensemble_dir, tmp_path):
    """60 blank 2000x2000 PNGs compress to a few KiB and would decode to 240 megapixels."""
    import zipfile

    from fastapi.testclient import TestClient

    buffer = io.BytesIO()
    blank = io.BytesIO()
    Image.new("RGB", (2000, 2000)).save(blank, format="PNG")
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(60):
            archive.writestr(f"blank{i}.png", blank.getvalue())
    client = TestClient(_app(ensemble_dir, tmp_path))
    r = client.post("/api/predict", files=[("files", ("blanks.zip", buffer.getvalue()))])
    assert r.status_code == 413 and "--max-request-megapixels" in r.json()["detail"], r.text


def test_a_private_history_is_found_through_an_index(tmp_path):
    import sqlite3

    from alldetect.serve.store import PredictionStore

    store = PredictionStore(str(tmp_path / "db.sqlite"))
    with sqlite3.connect(store.path) as db:
        plan = " ".join(str(row) for row in db.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM predictions WHERE client = ? ORDER BY id DESC LIMIT 200", ("x",)))
    assert "predictions_client" in plan and "SCAN predictions" not in plan, plan
