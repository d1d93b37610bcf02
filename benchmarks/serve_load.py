"""`alldetect serve` under ordinary and hostile load at once, on loopback.

Starts the real command in its own process (temporary files sent to a watched folder, its log to a file), then: C
clients each send R requests of real-size cells (1-4 cells of 450x450 BMP per request, retrying after a 503 as
told by Retry-After); one client sends a stream of hostile requests (chunked uploads over the limit, zip bombs,
bad zip entries, decompression bombs, too many megapixels, cross-origin posts, foreign Host headers, malformed
bodies, empty files, float TIFFs, a TIFF of 20,000 pages, a 1x6000 PNG, Grad-CAM requests); from another loopback
address (127.0.0.2, as an attacker elsewhere; ``--slow-addresses N``: from N addresses in turn), S slow clients
each hold an upload open sending one body byte per second (reconnecting when closed) and a separate process holds
H connections that sent half their headers (reopened once a second when closed); from two more addresses
(127.0.0.3 and 127.0.0.4), a third process holds U connections that pipeline page requests until their buffers are
full and never read an answer (reopened once a second when closed); a poller asks /api/health every 50 ms. Then
two Grad-CAM requests, with the server's RSS before and after. ``--rounds N`` runs all of it N times on one
server, the RSS after each. Prints a table: answers by status, upload and health latency percentiles, how long
slow, half-open and unread connections lived, the server's RSS at the start, peak and end (of each round), the
largest temporary file ever written and the log's size. ``--tamper`` also changes each file an ensemble folder's
spec names (a byte of a member's weights, a swapped ONNX graph, overflowing combiner weights) and runs ``predict``
on each copy.

    python benchmarks/serve_load.py ENS_DIR [--clients 8] [--requests 25] [--slow-clients 16] [--half-open 2000]
                                            [--unread 0] [--body-timeout 20] [--max-connections 4096]
                                            [--slow-addresses 1] [--frame-size N]
                                            [--rounds 1] [--engine prefer-onnx] [--tamper] [--cells DIR]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import io
import json
import multiprocessing
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ATTACKER_ADDRESS = "127.0.0.2"  # slow and half-open clients connect from here; the lab from 127.0.0.1
UNREAD_ADDRESSES = ("127.0.0.3", "127.0.0.4")  # clients that never read their answers, half from each
PIPELINED = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
DEFAULT_CELLS = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnmc-dev" / "bmp"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ens_dir", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    parser.add_argument("--cells", type=Path, default=DEFAULT_CELLS, help="folder of real-size cell images")
    parser.add_argument("--max-upload-mb", type=int, default=8)
    parser.add_argument("--slow-clients", type=int, default=16, help="uploads sending one body byte per second")
    parser.add_argument("--slow-addresses", type=int, default=1, help="loopback addresses the slow clients come "
                                                                      "from, in turn (127.0.0.2 onward)")
    parser.add_argument("--frame-size", type=int, help="the server's --frame-size")
    parser.add_argument("--half-open", type=int, default=2000, help="connections that send half their headers")
    parser.add_argument("--unread", type=int, default=0, help="connections that never read their answers")
    parser.add_argument("--rounds", type=int, default=1, help="run the whole load this many times on one server")
    parser.add_argument("--body-timeout", type=float, default=20, help="the server's --body-timeout (s)")
    parser.add_argument("--max-connections", type=int, default=4096, help="the server's --max-connections")
    parser.add_argument("--engine", default="prefer-onnx", help="the server's --engine")
    parser.add_argument("--tamper", action="store_true", help="also refuse tampered copies of the folder")
    args = parser.parse_args()
    cells = [p.read_bytes() for p in sorted(args.cells.rglob("*.bmp"))] or [_synthetic_bmp(i) for i in range(8)]
    limit = args.max_upload_mb * 1024 * 1024
    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp) / "spool"
        spool.mkdir()
        port = _free_port()
        env = {**os.environ, "TMPDIR": str(spool)}
        log = Path(tmp) / "serve.log"
        with open(log, "wb") as log_file:
            server = subprocess.Popen([sys.executable, "-m", "alldetect.cli", "serve", str(args.ens_dir),
                                       "--port", str(port), "--db", str(Path(tmp) / "db.sqlite"),
                                       "--max-upload-mb", str(args.max_upload_mb), "--device", "cpu",
                                       "--body-timeout", str(args.body_timeout),
                                       "--max-connections", str(args.max_connections), "--engine", args.engine,
                                       *(["--frame-size", str(args.frame_size)] if args.frame_size else [])],
                                      env=env, stdout=log_file, stderr=log_file)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, server, log)
            httpx.post(f"{url}/api/predict", files=[("files", ("warm.bmp", cells[0]))], timeout=120)  # first call
            time.sleep(1)
            rounds = [_load(url, server.pid, spool, cells, limit, args) for _ in range(args.rounds)]
        finally:
            server.terminate()
            server.wait(timeout=30)
        report = rounds[-1]
        report["log_bytes"] = log.stat().st_size
        report["tampered"] = _tamper(args.ens_dir, cells[0], Path(tmp)) if args.tamper else []
    _print(report, args, limit)
    if args.rounds > 1:
        print("\n| round | server RSS start, peak, end | after the Grad-CAM requests | uploads p95 | health p95 |"
              "\n|---|---|---|---|---|")
        for k, r in enumerate(rounds, 1):
            print(f"| {k} | {r['rss_start'] / 1e6:.0f}, {r['rss_peak'] / 1e6:.0f}, {r['rss_end'] / 1e6:.0f} MB | "
                  f"{r['rss_cam'][-1][2] / 1e6:.0f} MB | {np.percentile(r['upload_ms'], 95):.0f} ms | "
                  f"{np.percentile(r['health_ms'], 95):.1f} ms |")


def _load(url: str, pid: int, spool: Path, cells: list[bytes], limit: int, args) -> dict:
    report: dict = {"rss_start": _rss(pid), "rss_peak": 0, "largest_temp": 0, "statuses": collections.Counter(),
                    "hostile": collections.Counter(), "unexpected": [], "health_ms": [], "upload_ms": [],
                    "retries": 0, "slow_lived_s": [], "half_open_closed": 0, "half_open_held": [],
                    "unread_lived_s": [], "unread_held": [], "unread_refused": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            report["rss_peak"] = max(report["rss_peak"], _rss(pid))
            for path in spool.rglob("*"):
                try:
                    report["largest_temp"] = max(report["largest_temp"], path.stat().st_size)
                except OSError:
                    pass
            time.sleep(0.02)

    def health() -> None:
        with httpx.Client(timeout=30) as client:
            while not done.is_set():
                start = time.perf_counter()
                r = client.get(f"{url}/api/health")
                report["health_ms"].append((time.perf_counter() - start) * 1000)
                if r.status_code != 200:
                    report["unexpected"].append(f"health {r.status_code}")
                time.sleep(0.05)

    def client(k: int) -> None:
        rng = np.random.default_rng(k)
        with httpx.Client(timeout=300) as http:
            for i in range(args.requests):
                chosen = rng.choice(len(cells), size=int(rng.integers(1, 5)), replace=False)
                files = [("files", (f"UID_{k}_{i}_{j}_all.bmp", cells[c])) for j, c in enumerate(chosen)]
                start = time.perf_counter()
                try:
                    while True:
                        r = http.post(f"{url}/api/predict", files=files)
                        if r.status_code != 503:
                            break
                        report["retries"] += 1
                        time.sleep(float(r.headers.get("retry-after", "1")))
                except httpx.TransportError as e:
                    report["statuses"][type(e).__name__] += 1
                    report["unexpected"].append(f"cells: {type(e).__name__} {e}")
                    continue
                report["upload_ms"].append((time.perf_counter() - start) * 1000)
                report["statuses"][r.status_code] += 1
                if r.status_code != 200:
                    report["unexpected"].append(f"cells {r.status_code}: {r.text[:120]}")

    def hostile() -> None:
        attacks = _attacks(limit)
        with httpx.Client(timeout=300) as http:
            i = 0
            while not done.is_set() or i < len(attacks):
                name, send, expected = attacks[i % len(attacks)]
                try:
                    status = send(http, url)
                except (httpx.HTTPError, OSError) as e:  # the server may close a connection it refuses mid-stream
                    status = f"closed ({type(e).__name__})"
                report["hostile"][(name, status)] += 1
                if isinstance(status, int) and status >= 500 and status != 503:
                    report["unexpected"].append(f"{name} {status}")
                elif status not in expected and not str(status).startswith("closed"):
                    report["unexpected"].append(f"{name}: {status}, expected {expected}")
                i += 1

    def slow(k: int) -> None:
        source = f"127.0.0.{2 + k % args.slow_addresses}"
        while not done.is_set():
            opened = time.perf_counter()
            try:
                with _connect(url, source=source) as sock:
                    sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/"
                                 b"form-data; boundary=b\r\nContent-Length: 1000000\r\n\r\n")
                    while not done.is_set():
                        sock.sendall(b"-")
                        time.sleep(1)
                        if _closed(sock):
                            report["slow_lived_s"].append(time.perf_counter() - opened)
                            break
            except OSError:
                report["slow_lived_s"].append(time.perf_counter() - opened)

    stop, counts, unread_counts = multiprocessing.Event(), multiprocessing.Queue(), multiprocessing.Queue()
    siege = multiprocessing.Process(target=_half_open, args=(url, args.half_open, stop, counts), daemon=True)
    unread = multiprocessing.Process(target=_unread, args=(url, args.unread, stop, unread_counts), daemon=True)
    if args.half_open:
        siege.start()
    if args.unread:
        unread.start()
    threads = [threading.Thread(target=f, daemon=True) for f in (watch, health, hostile)]
    threads += [threading.Thread(target=slow, args=(k,), daemon=True) for k in range(args.slow_clients)]
    for t in threads:
        t.start()
    time.sleep(3 if args.half_open or args.slow_clients or args.unread else 0)  # the siege before the lab uploads
    started, cpu = time.perf_counter(), _cpu_seconds(pid)
    attackers = [p.pid for p in (siege, unread) if p.pid is not None]
    attackers_cpu = sum(map(_cpu_seconds, attackers))
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(client, range(args.clients)))
    report["wall_s"] = time.perf_counter() - started
    report["server_cpu_s"] = _cpu_seconds(pid) - cpu
    report["attackers_cpu_s"] = sum(map(_cpu_seconds, attackers)) - attackers_cpu
    done.set()
    stop.set()
    if args.half_open:
        report["half_open_closed"], report["half_open_held"] = counts.get(timeout=120)
        siege.join(timeout=60)
    if args.unread:
        report["unread_lived_s"], report["unread_held"], report["unread_refused"] = unread_counts.get(timeout=300)
        unread.join(timeout=60)
    for t in threads:
        t.join(timeout=600)
    time.sleep(2)
    report["rss_end"] = _rss(pid)
    report["rss_cam"] = [(_rss(pid), _cam_request(url, cells), _rss(pid)) for _ in range(2)]
    return report


def _half_open(url: str, n: int, stop, counts) -> None:
    """Hold ``n`` connections that sent half their request headers, reopening once a second those the server
    closed; runs in its own process (its bursts of connections must not stall the measuring threads) and from
    another loopback address, as an attacker elsewhere would. Puts (connections closed, held open per second)."""
    selector = selectors.DefaultSelector()
    closed_total, held = 0, []

    def open_one() -> None:
        nonlocal closed_total
        try:
            sock = _connect(url, source=ATTACKER_ADDRESS)
            sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        except OSError:
            closed_total += 1

    for _ in range(n):
        open_one()
    while not stop.is_set():
        time.sleep(1)
        closed = [key.fileobj for key, _ in selector.select(timeout=0) if _closed(key.fileobj)]
        for sock in closed:
            selector.unregister(sock)
            sock.close()
        closed_total += len(closed)
        held.append(len(selector.get_map()))
        for _ in closed:
            open_one()
    for key in list(selector.get_map().values()):
        key.fileobj.close()
    counts.put((closed_total, held))


def _unread(url: str, n: int, stop, counts) -> None:
    """Hold ``n`` connections, half from each of ``UNREAD_ADDRESSES``, that pipeline page requests until their
    send buffers are full and never read an answer (a small receive buffer, so the server's answers back up
    quickly); once a second, those the server closed are counted and reopened. Runs in its own process. Puts
    (lifetimes of the closed connections, connections held per second, connections refused)."""
    opened: dict[socket.socket, tuple[float, str]] = {}
    refused = 0
    lived: list[float] = []
    held: list[int] = []

    def open_one(address: str) -> None:
        nonlocal refused
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sock.bind((address, 0))
            sock.settimeout(10)
            sock.connect(_host_port(url))
            sock.setblocking(False)
            for _ in range(2_000):  # many requests a call: the attacker's own CPU is not the server's cost
                sock.send(PIPELINED * 64)
        except BlockingIOError:
            opened[sock] = (time.perf_counter(), address)
        except OSError:
            refused += 1
            sock.close()
        else:
            opened[sock] = (time.perf_counter(), address)

    for k in range(n):
        open_one(UNREAD_ADDRESSES[k % len(UNREAD_ADDRESSES)])
    while not stop.is_set():
        time.sleep(1)
        closed = [sock for sock in opened if _reset(sock)]
        for sock in closed:
            began, address = opened.pop(sock)
            lived.append(time.perf_counter() - began)
            sock.close()
            open_one(address)
        held.append(len(opened))
    for sock in opened:
        sock.close()
    counts.put((lived, held, refused))


def _reset(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock``, a connection that never reads (so not by reading it)."""
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
        return True
    try:
        sock.send(b"G")
    except BlockingIOError:
        return False
    except OSError:
        return True
    return False


def _cam_request(url: str, cells: list[bytes]) -> int:
    files = [("files", (f"cam{i}.bmp", cell)) for i, cell in enumerate(cells[:4])]
    status = httpx.post(f"{url}/api/predict?cam=true", files=files, timeout=600).status_code
    time.sleep(2)
    return status


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _connect(url: str, source: str | None = None) -> socket.socket:
    return socket.create_connection(_host_port(url), timeout=30, source_address=(source, 0) if source else None)


def _closed(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (nothing else is ever sent on it)."""
    try:
        return sock.recv(65536, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _tamper(ens_dir: Path, cell: bytes, tmp: Path) -> list[tuple[str, int, str]]:
    """(what was changed, predict's exit status, its last line) for each file the spec names."""
    spec = json.loads((ens_dir / "ensemble.json").read_text())
    weights = [w for m in spec["members"] for w in (m["weights"] if isinstance(m["weights"], list) else [m["weights"]])]
    (tmp / "cell.bmp").write_bytes(cell)

    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    def swap_graph(path: Path) -> None:  # a valid graph with the same inputs and metadata, other weights
        other = path.parent / "ensemble.int8.onnx"
        if other.is_file():
            path.write_bytes(other.read_bytes())
        else:
            flip(path)

    def overflow(path: Path) -> None:
        raw = json.loads(path.read_text())
        fit = raw["methods"][raw["default_method"]]
        fit["weights"] = [1e308] * len(fit["weights"])
        path.write_text(json.dumps(raw))

    cases = [(f"one byte of {w}", w, flip) for w in weights]
    swapped = "swapped for the int8 graph" if (ens_dir / "ensemble.int8.onnx").is_file() else "one byte changed"
    cases += [(f"{g}: {swapped if g == 'ensemble.onnx' else 'one byte changed'}", g,
               swap_graph if g == "ensemble.onnx" else flip) for g in spec.get("graphs", {})]
    cases.append(("combiner weights 1e308", "ensemble.json", overflow))
    results = []
    for what, name, change in cases:
        copy = tmp / "tampered"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(ens_dir, copy)
        change(copy / name)
        engine = {"ensemble.onnx": ["--engine", "onnx", "--precision", "fp32"],
                  "ensemble.int8.onnx": ["--precision", "int8"]}.get(name, ["--engine", "torch"])
        r = subprocess.run([sys.executable, "-m", "alldetect.cli", "predict", str(copy), str(tmp / "cell.bmp"),
                            "-o", str(tmp / "t.csv"), "--device", "cpu", *engine], capture_output=True, text=True,
                           check=False)
        lines = (r.stderr + r.stdout).strip().splitlines()
        results.append((what, r.returncode, lines[-1] if lines else ""))
    return results


def _attacks(limit: int) -> list[tuple[str, object, tuple]]:
    """(name, send(client, url) -> status, statuses that are the right answer)."""
    def post(files=None, **kwargs):
        return lambda http, url: http.post(f"{url}/api/predict", files=files, **kwargs).status_code

    def chunked(http, url):
        def body():
            yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n\r\n'
            for _ in range(limit // 65536 + 64):
                yield b"\0" * 65536
            yield b"\r\n--b--\r\n"
        return http.post(f"{url}/api/predict", content=body(),
                         headers={"content-type": "multipart/form-data; boundary=b"}).status_code

    bomb = _zip({f"b{i}.bin": b"\0" * 60_000_000 for i in range(6)})
    bad_entries = _zip({"ok.png": _png(80)}, corrupt={"bad.png": _png(80)})
    big = _png(2000)
    pixel_flood = [("files", (f"p{i}.png", big)) for i in range(70)]
    decompression_bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(decompression_bomb, format="PNG")
    float_tiff = io.BytesIO()
    Image.fromarray(np.full((450, 450), 0.5, np.float32), mode="F").save(float_tiff, format="TIFF")
    cell = [("files", ("c.png", _png(450)))]
    pages = [Image.new("L", (1, 1)) for _ in range(20_000)]
    many_pages = io.BytesIO()
    pages[0].save(many_pages, format="TIFF", save_all=True, append_images=pages[1:])
    thin = io.BytesIO()
    Image.new("RGB", (1, 6000)).save(thin, format="PNG")
    return [
        ("TIFF of 20,000 chained 1x1 pages", post([("files", ("pages.tif", many_pages.getvalue()))]), (200,)),
        ("1x6000 PNG (with --frame-size: a huge rescale)", post([("files", ("thin.png", thin.getvalue()))]), (200,)),
        ("Grad-CAM of one cell (?cam=true)", post(cell, params={"cam": "true"}), (200, 503)),
        ("chunked upload over the limit", chunked, (413,)),
        ("zip bomb (6 x 60 MB of zeros)", post([("files", ("bomb.zip", bomb))]), (413,)),
        ("zip with a corrupt entry", post([("files", ("p.zip", bad_entries))]), (200,)),
        ("70 images of 4 MP", post(pixel_flood), (413,)),
        ("decompression-bomb PNG", post([("files", ("b.png", decompression_bomb.getvalue()))]), (200,)),
        ("float TIFF", post([("files", ("f.tif", float_tiff.getvalue()))]), (200,)),
        ("empty file", post([("files", ("e.png", b""))]), (200,)),
        ("cross-origin post", post(cell, headers={"origin": "http://evil.example"}), (403,)),
        ("foreign Host header", lambda http, url: http.get(f"{url}/history",
                                                           headers={"host": "evil.example"}).status_code, (421,)),
        ("malformed multipart", post(content=b"--xx\r\nnonsense",
                                     headers={"content-type": "multipart/form-data; boundary=xx"}), (400,)),
        ("Content-Length far over the limit", lambda http, url: _lying_length(url, 10 * limit), (413,)),
    ]


def _lying_length(url: str, declared: int) -> int:
    """A request whose Content-Length promises far more than it sends (no HTTP client will send one)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(f"POST /api/predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; "
                  f"boundary=b\r\nContent-Length: {declared}\r\n\r\n".encode() + b"x" * 1000)
        return int(s.recv(4096).split(b" ", 2)[1])


def _zip(entries: dict[str, bytes], corrupt: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in {**entries, **(corrupt or {})}.items():
            z.writestr(name, data)
        infos = {i.filename: i for i in z.infolist()}
    data = bytearray(buffer.getvalue())
    for name in corrupt or {}:
        info = infos[name]
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        data[start + 8:start + 16] = b"\xff" * 8
    return bytes(data)


def _png(size: int) -> bytes:
    yy, xx = np.mgrid[0:size, 0:size]
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2] = (65, 27, 76)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _synthetic_bmp(i: int) -> bytes:
    from alldetect.data.synth import render_cell

    stain = {"gain": np.ones(3), "brightness": 1.0, "texture": 1.0}
    buffer = io.BytesIO()
    Image.fromarray(render_cell(np.random.default_rng(i), "all" if i % 2 else "hem", stain, 450)).save(buffer, "BMP")
    return buffer.getvalue()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` and its threads so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not start in 5 minutes")


def _print(report: dict, args, limit: int) -> None:
    health, upload = np.array(report["health_ms"]), np.array(report["upload_ms"])
    total = sum(report["statuses"].values())
    print("| what | value |\n|---|---|")
    print(f"| siege held during the run | {args.slow_clients} slow-body clients (1 byte/s) from "
          f"{args.slow_addresses} address(es), {args.half_open} "
          f"half-sent-header connections, {args.unread} connections that never read; server --body-timeout "
          f"{args.body_timeout:g} s |")
    print(f"| ordinary requests ({args.clients} clients x {args.requests}) | {total} in {report['wall_s']:.0f} s, "
          f"statuses {dict(report['statuses'])}, {report['retries']} retries after 503 |")
    print(f"| CPU time during them | server {report['server_cpu_s']:.0f} s, processes holding half-open and unread "
          f"connections {report['attackers_cpu_s']:.0f} s, of {report['wall_s'] * os.cpu_count():.0f} core-seconds |")
    print(f"| ordinary upload latency (retries included) | p50 {np.percentile(upload, 50):.0f} ms, "
          f"p95 {np.percentile(upload, 95):.0f} ms, max {upload.max():.0f} ms |")
    if report["slow_lived_s"]:
        lived = np.array(report["slow_lived_s"])
        print(f"| slow-body connections closed by the server | {len(lived)}, after {np.median(lived):.1f} s "
              f"(median), {lived.max():.1f} s at most |")
    if report["half_open_held"]:
        print(f"| half-open connections | {report['half_open_closed']} closed by the server; "
              f"{np.median(report['half_open_held']):.0f} held open (median of 1 s samples) |")
    if report["unread_held"]:
        lived = np.array(report["unread_lived_s"]) if report["unread_lived_s"] else np.zeros(1)
        print(f"| connections that never read | {len(report['unread_lived_s'])} closed by the server, after "
              f"{np.median(lived):.1f} s (median), {lived.max():.1f} s at most; "
              f"{np.median(report['unread_held']):.0f} held open (median of 1 s samples); "
              f"{report['unread_refused']} refused |")
    print(f"| server log | {report['log_bytes']:,} bytes |")
    for i, (before, status, after) in enumerate(report["rss_cam"]):
        print(f"| Grad-CAM request {i + 1} of 4 cells (status {status}) | RSS {before / 1e6:.0f} MB -> "
              f"{after / 1e6:.0f} MB ({after / before:.2f}x) |")
    print(f"| hostile requests | {sum(report['hostile'].values())} |")
    print(f"| unexpected answers (5xx other than 503, or a wrong status) | {len(report['unexpected'])} |")
    print(f"| /api/health during load | {len(health)} polls, p50 {np.percentile(health, 50):.1f} ms, "
          f"p95 {np.percentile(health, 95):.1f} ms, max {health.max():.1f} ms |")
    print(f"| server RSS: start, peak, end | {report['rss_start'] / 1e6:.0f} MB, {report['rss_peak'] / 1e6:.0f} MB, "
          f"{report['rss_end'] / 1e6:.0f} MB (end/start {report['rss_end'] / report['rss_start']:.2f}) |")
    print(f"| largest temporary file | {report['largest_temp']:,} bytes (upload limit {limit:,}) |")
    print("\nhostile answers:")
    for (name, status), n in sorted(report["hostile"].items(), key=lambda kv: kv[0][0]):
        print(f"  {name}: {status} x{n}")
    for line in report["unexpected"][:20]:
        print(f"  unexpected: {line}")
    if report["tampered"]:
        print("\n| tampered file | predict exit status | its last line |\n|---|---|---|")
        for what, code, line in report["tampered"]:
            print(f"| {what} | {code} | {line[:160]} |")


if __name__ == "__main__":
    main()
