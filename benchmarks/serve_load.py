"""A short load check of `alldetect serve` on loopback: N requests (one 450x450 synthetic cell each, no
Grad-CAM) from C concurrent clients against a real uvicorn server; prints errors and latency percentiles.

    python benchmarks/serve_load.py ENS_DIR [--requests 200] [--clients 8]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from PIL import Image

from alldetect.data.synth import render_cell
from alldetect.serve import ServeSettings, create_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ens_dir", type=Path)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    stain = {"gain": np.ones(3), "brightness": 1.0, "texture": 1.0}
    cells = []
    for i in range(16):
        buffer = io.BytesIO()
        Image.fromarray(render_cell(rng, "all" if i % 2 else "hem", stain, 450)).save(buffer, format="BMP")
        cells.append(buffer.getvalue())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(args.ens_dir, ServeSettings(db_path=str(Path(tmp) / "p.sqlite")))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/api/predict"

        def one(i: int) -> tuple[float, int]:
            start = time.perf_counter()
            r = httpx.post(url, files=[("files", (f"UID_{i % 4}_1_{i}_all.bmp", cells[i % len(cells)]))], timeout=120)
            return time.perf_counter() - start, r.status_code

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - started
        server.should_exit = True
        thread.join(timeout=10)
    latencies = np.array([r[0] for r in results]) * 1000
    errors = sum(r[1] != 200 for r in results)
    print(f"{args.requests} requests, {args.clients} clients, {errors} errors, {wall:.1f} s wall, "
          f"{args.requests / wall:.1f} requests/s")
    print(f"latency ms: p50 {np.percentile(latencies, 50):.0f}, p95 {np.percentile(latencies, 95):.0f}, "
          f"max {latencies.max():.0f}")


if __name__ == "__main__":
    main()
