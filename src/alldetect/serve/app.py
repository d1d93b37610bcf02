"""The FastAPI app: an upload page, a JSON API documented by OpenAPI, and a prediction history page.

It serves what ``predict`` and ``explain`` compute (same engine, same crops, same combiner, same
patient rule); nothing is re-implemented here.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib.resources import files as package_files
from pathlib import Path, PurePosixPath

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.datastructures import UploadFile

from ..data.names import parse_cell_name
from ..ensemble_dir import load_ensemble_spec
from ..errors import ImageProblem
from ..evaluation import subject_level
from ..export import ONNX_NAME, load_engine
from ..predict import prepare_crop
from ..predictions import prediction_records
from .store import PredictionStore
from .uploads import Limits, UploadedCell, UploadRejected, expand_uploads

logger = logging.getLogger(__name__)
THRESHOLD = 0.5


@dataclass(frozen=True)
class ServeSettings:
    db_path: str = "alldetect-predictions.sqlite"
    limits: Limits = field(default_factory=Limits)
    device: str = "auto"
    engine: str = "prefer-onnx"  # the exported ONNX graph when there is one, else the `auto` choice
    max_cam_cells: int = 32      # Grad-CAM is the slow part: at most this many overlays per request


def create_app(ens_dir: str | Path, settings: ServeSettings = ServeSettings()) -> FastAPI:
    ens_dir = Path(ens_dir)
    spec = load_ensemble_spec(ens_dir)
    choice = settings.engine
    if choice == "prefer-onnx":
        choice = "onnx" if (ens_dir / ONNX_NAME).is_file() else "auto"
    engine = load_engine(ens_dir, device=settings.device, engine=choice)
    model_id = hashlib.sha256((ens_dir / "ensemble.json").read_bytes()).hexdigest()[:12]
    store = PredictionStore(settings.db_path)
    inference_lock = threading.Lock()  # one batch at a time: bounded memory, no interleaving between requests
    cam_model: dict = {}
    app = FastAPI(title="alldetect", version="1", description="ALL detection in single-cell images with a "
                  "weighted ensemble of CNNs. Research software, not a medical device.")

    @app.exception_handler(UploadRejected)
    async def rejected(_request: Request, exc: UploadRejected) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": f"invalid request: {problems}"}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return package_files("alldetect.serve").joinpath("page.html").read_text()

    @app.get("/api/health")
    def health() -> dict:
        """Liveness: the model is loaded."""
        return {"status": "ok", "model_id": model_id}

    @app.get("/api/model")
    def model_info() -> dict:
        """Members, their weights in the ensemble, the method, and the data the ensemble was trained on."""
        fit = spec["methods"][engine.method]
        return {"model_id": model_id, "method": engine.method, "engine": type(engine).__name__,
                "crop": engine.crop, "threshold": THRESHOLD,
                "members": [{"name": m["name"], "weight": (fit["weights"] or [None] * len(spec["members"]))[i],
                             "val_metrics": spec["val_metrics"].get(m["name"])}
                            for i, m in enumerate(spec["members"])],
                "data": spec["data"]}

    @app.post("/api/predict")
    async def predict(request: Request, cam: bool = False) -> dict:
        """Score uploaded cells. Multipart form, field ``files``: images (BMP, PNG, JPEG, TIFF) and/or zips
        of one patient's cells. ``cam=true`` adds a Grad-CAM overlay of each cell (PNG, base64)."""
        limits = settings.limits
        declared = int(request.headers.get("content-length") or 0)
        if declared > limits.max_request_bytes + 1024 * 1024:
            raise UploadRejected(413, f"request of {declared:,} bytes exceeds the {limits.max_request_bytes:,}-byte "
                                      "limit")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise UploadRejected(400, "send the images as multipart/form-data in the field 'files'")
        try:
            form = await request.form(max_files=limits.max_files, max_fields=16)
        except Exception as e:  # starlette raises several types for malformed multipart bodies
            if "Too many files" in str(e):
                raise UploadRejected(413, f"more than {limits.max_files} files in one request") from None
            raise UploadRejected(400, f"malformed multipart body ({e})") from None
        uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if len(uploads) > limits.max_files:
            raise UploadRejected(413, f"more than {limits.max_files} files in one request")
        files = []
        budget = limits.max_request_bytes
        for upload in uploads:
            data = await upload.read(budget + 1)
            budget -= len(data)
            if budget < 0:
                raise UploadRejected(413, f"upload exceeds the {limits.max_request_bytes:,}-byte limit")
            files.append((PurePosixPath(upload.filename or "upload").name, data))
        cells = expand_uploads(files, limits)
        request_id = uuid.uuid4().hex
        result = _score(cells, cam)
        store.record(request_id, model_id, result["cells"])
        return {"request_id": request_id, "model_id": model_id, "method": engine.method, "threshold": THRESHOLD,
                **result, "csv_url": f"/api/results/{request_id}.csv"}

    def _score(cells: list[UploadedCell], cam: bool) -> dict:
        crops, kept = [], []
        for i, cell in enumerate(cells):
            if cell.error:
                continue
            try:
                crops.append(prepare_crop(cell.pixels, engine.crop, engine.input_size, name=cell.name))
                kept.append(i)
            except ImageProblem as e:
                cell.error = e.reason
        batch = np.stack(crops) if crops else np.zeros((0, engine.crop, engine.crop, 3), np.uint8)
        with inference_lock:
            ens, members = engine.predict(batch) if len(batch) else (np.zeros(0), np.zeros((len(engine.names), 0)))
            overlays = _cams(batch[: settings.max_cam_cells]) if cam and len(batch) else []
        out = []
        position = {cell_index: j for j, cell_index in enumerate(kept)}
        for i, cell in enumerate(cells):
            j = position.get(i)
            out.append({
                "name": cell.name, "group": cell.group or _subject(cell.name),
                "sha256": hashlib.sha256(cell.data).hexdigest(),
                "prob_all": None if j is None else float(ens[j]),
                "call": None if j is None else ("ALL" if ens[j] >= THRESHOLD else "HEM"),
                "members": {} if j is None else {n: float(members[k, j]) for k, n in enumerate(engine.names)},
                "cam_png": overlays[j] if j is not None and j < len(overlays) else None,
                "error": cell.error})
        scored = [c for c in out if c["prob_all"] is not None]
        patients = subject_level(np.full(len(scored), -1), np.array([c["prob_all"] for c in scored]),
                                 [c["group"] for c in scored], threshold=THRESHOLD) if scored else []
        for p in patients:
            del p["truth"], p["correct"]
        return {"cells": out, "patients": patients}

    def _cams(batch: np.ndarray) -> list[str]:
        from ..ensemble_model import load_ensemble
        from ..explain import ensemble_cam, member_cams, overlay

        if "model" not in cam_model:
            cam_model["model"] = load_ensemble(ens_dir, method=engine.method, device=settings.device)
        model = cam_model["model"]
        classes = [int(p >= THRESHOLD) for p in model.predict(batch)[0]]
        maps = ensemble_cam(member_cams(model, batch, classes), model.cam_weights)
        encoded = []
        for crop, m in zip(batch, maps):
            buffer = io.BytesIO()
            Image.fromarray(overlay(crop, m)).save(buffer, format="PNG")
            encoded.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
        return encoded

    @app.get("/api/results/{request_id}.csv")
    def results_csv(request_id: str) -> Response:
        """The cells of one request as a predictions CSV (contract columns plus members)."""
        rows = store.request(request_id)
        if not rows:
            raise HTTPException(404, f"no request {request_id!r}")
        nan = float("nan")
        members = [json.loads(r["member_probs"]) for r in rows]
        columns, records = prediction_records(
            [r["file_name"] for r in rows], [""] * len(rows),
            {engine.method: np.array([nan if r["prob_all"] is None else r["prob_all"] for r in rows])},
            subjects=[_subject(r["file_name"]) for r in rows], errors=[r["error"] for r in rows],
            extra={f"prob_{n}": np.array([m.get(n, nan) for m in members]) for n in engine.names})
        for record, r in zip(records, rows):
            record["sha256"] = r["sha256"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[*columns, "sha256"])
        writer.writeheader()
        writer.writerows(records)
        return Response(buffer.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="alldetect-{request_id}.csv"'})

    @app.get("/history", response_class=HTMLResponse, include_in_schema=False)
    def history() -> str:
        rows = store.recent()
        body = "".join(
            f"<tr><td>{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['time']))}</td>"
            f"<td>{html.escape(r['file_name'])}</td><td><code>{r['sha256'][:16]}</code></td>"
            f"<td>{_probability(r['prob_all'])}</td>"
            f"<td>{html.escape(r['model_id'])}</td><td>{html.escape(r['error'])}</td></tr>" for r in rows)
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>alldetect history</title>"
                f"<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 8px;border-bottom:1px solid #ddd}}"
                f"</style></head><body><h1>Prediction history</h1><p><a href='/'>back</a></p><table><tr><th>time"
                f"</th><th>file</th><th>sha256</th><th>P(ALL)</th><th>model</th><th>error</th></tr>{body}</table>"
                f"</body></html>")

    return app


def _probability(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _subject(name: str) -> str:
    parsed = parse_cell_name(PurePosixPath(name).name)
    return parsed.subject if parsed else "upload"
