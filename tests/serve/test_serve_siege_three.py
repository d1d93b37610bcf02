"""Siege, round three: Grad-CAM beside the scorer and one at a time per client, uploads arriving from a few
addresses that leave room for others, an IPv6 /64 counted as one client, a model card that lies outside its folder
or is huge, and a Grad-CAM that fails without losing the scores."""

import io
import shutil
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from alldetect.serve import ServeSettings, create_app
from alldetect.serve import app as serve_app
from alldetect.serve.connections import client_network

from helpers import running_server


def _png(value=90, size=80) -> bytes:
    yy, xx = np.mgrid[0:size, 0:size]
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2] = (value, value // 3, value)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


FILES = [("files", ("UID_1_1_1_all.png", _png()))]


def _app(folder, tmp_path, **settings):
    return create_app(folder, ServeSettings(db_path=str(tmp_path / "db.sqlite"), device="cpu", domain_check=False,
                                            **settings))


def _post(url: str, address: str, *, cam: bool = False, timeout: float = 120) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=timeout) as client:
        return client.post(f"{url}/api/predict" + ("?cam=true" if cam else ""), files=FILES)


def test_gradcam_runs_beside_the_scorer_and_one_at_a_time_per_client(ensemble_dir, tmp_path, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real = serve_app.cell_cams

    def held(model, batch):
        entered.set()
        release.wait(60)
        return real(model, batch)

    monkeypatch.setattr(serve_app, "cell_cams", held)
    with running_server(_app(ensemble_dir, tmp_path)) as (url, _server):
        result = {}
        worker = threading.Thread(target=lambda: result.update(r=_post(url, "127.0.0.1", cam=True)))
        worker.start()
        assert entered.wait(60)
        again = _post(url, "127.0.0.1", cam=True, timeout=10)
        assert again.status_code == 503 and "previous request" in again.json()["detail"]
        other = _post(url, "127.0.0.2", timeout=30)  # scored while the Grad-CAM is being made
        assert other.status_code == 200 and other.json()["cells"][0]["prob_all"] is not None
        release.set()
        worker.join(60)
    answer = result["r"].json()
    assert result["r"].status_code == 200 and answer["cells"][0]["cam_png"].startswith("data:image/png;base64,")


def test_a_failed_gradcam_keeps_the_scores(ensemble_dir, tmp_path, monkeypatch):
    def broken(model, batch):
        raise RuntimeError("weights replaced since the server started")

    monkeypatch.setattr(serve_app, "cell_cams", broken)
    with running_server(_app(ensemble_dir, tmp_path)) as (url, _server):
        r = _post(url, "127.0.0.1", cam=True)
    assert r.status_code == 200, r.text
    assert r.json()["cells"][0]["prob_all"] is not None and "weights replaced" in r.json()["cam_error"]


def _slow_upload(url: str, address: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10, source_address=(address, 0))
    sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                 b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b")
    return sock


def test_a_few_addresses_that_fill_the_upload_places_leave_room_for_others(ensemble_dir, tmp_path):
    app = _app(ensemble_dir, tmp_path, max_receiving=4, max_receiving_per_client=2, receiving_reserve=1)
    with running_server(app) as (url, _server):
        slow = [_slow_upload(url, address) for address in ("127.0.0.3", "127.0.0.3", "127.0.0.4", "127.0.0.4")]
        time.sleep(0.5)
        assert _post(url, "127.0.0.5", timeout=60).status_code == 200  # a place of the reserve
        late = _slow_upload(url, "127.0.0.3")
        assert late.recv(12).startswith(b"HTTP/1.1 503")  # its address already holds two
        for sock in slow + [late]:
            sock.close()


def test_one_ipv6_64_is_one_client():
    assert client_network("2001:db8:0:1::1") == client_network("2001:db8:0:1:ffff::2") == "2001:db8:0:1::/64"
    assert client_network("2001:db8:0:2::1") != client_network("2001:db8:0:1::1")
    assert client_network("::ffff:192.0.2.1") == "192.0.2.1" and client_network("testclient") == "testclient"


@pytest.mark.parametrize("kind", ["link out of the folder", "too large"])
def test_the_model_card_is_served_by_the_folders_rules(ensemble_dir, tmp_path, kind):
    folder = tmp_path / "ensemble"
    shutil.copytree(ensemble_dir, folder)
    card = folder / "MODEL_CARD.md"
    card.unlink()
    if kind == "too large":
        card.write_bytes(b"x" * (5 << 20))
    else:
        secret = tmp_path / "secret.txt"
        secret.write_text("a file of the machine")
        card.symlink_to(secret)
    with running_server(_app(folder, tmp_path)) as (url, _server):
        r = httpx.get(f"{url}/model-card", timeout=30)
    assert r.status_code == 404 and "machine" not in r.text
