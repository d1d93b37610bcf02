"""The FastAPI app: an upload page, a JSON API documented by OpenAPI, and a prediction history page.

It serves what ``predict`` and ``explain`` compute (same engine, same crops, same combiner, same
patient rule); nothing is re-implemented here.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import ctypes.util
import gc
import html
import io
import json
import logging
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.resources import files as package_files
from pathlib import Path, PurePosixPath

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from ..choices import Engine, History
from ..data.names import parse_cell_name
from ..data.geometry import FrameGeometry
from ..ensemble.combiners import WeightedAverage
from ..ensemble.folder import EnsembleFolder
from ..ensemble.spec import SpecError
from ..errors import first_line
from ..evaluation.evaluate import subject_level
from ..formats.labels import Label, cell_call
from ..formats.csvfiles import csv_text
from ..formats.predictions import prediction_records
from ..inference.load import load_engine
from ..inference.cells import score_cells
from ..inference.explain import cell_cams, overlay  # imported with the app: a first Grad-CAM adds no modules
from ..inference.torch_engine import TorchEngine
from .connections import ConnectionLimits, client_network
from .origin import SameOriginOnly
from .store import PredictionStore
from .uploads import Limits, UploadedCell, UploadRejected, decode_cell, expand_uploads

logger = logging.getLogger(__name__)
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


@dataclass(frozen=True)
class ServeSettings:
    db_path: str = "alldetect-predictions.sqlite"
    limits: Limits = field(default_factory=Limits)
    device: str = "auto"
    engine: str = Engine.prefer_onnx.value  # choices.Engine
    max_cam_cells: int = 32      # Grad-CAM is the slow part: at most this many overlays per request
    max_cam_queued: int = 2      # Grad-CAM requests waiting or running (one per client); more get 503
    max_queued: int = 16         # requests read and waiting for the scoring thread; more get 503 with Retry-After
    max_receiving: int = 64      # request bodies being received at once (each holds up to the upload limit)
    max_receiving_per_client: int = 8  # ... from one address (an IPv6 /64): slow senders leave room for others
    receiving_reserve: int = 16  # places beyond max_receiving, each for a client with no body arriving
    allowed_hosts: tuple[str, ...] | None = None  # Host header names answered (None: any; `serve` sets them)
    history: str = History.private.value  # choices.History: what /history shows
    domain_check: bool = True    # flag cells unlike the training cells (when the ensemble has a domain reference)
    geometry: FrameGeometry = FrameGeometry()  # how an uploaded image becomes the crop (see --frame-size, --no-crop)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)


MULTIPART_OVERHEAD = 256 * 1024  # part headers and boundaries on top of the uploaded files themselves


def create_app(folder: EnsembleFolder | str | Path, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The web app serving the ensemble in ``folder``."""
    return LabServer(EnsembleFolder.of(folder), settings).app


class LabServer:
    """One ensemble served: its engine, the prediction record, and one scoring thread with a bounded queue. The
    models run in that thread, never on the event loop: pages and health answer while it scores, and one batch at
    a time keeps memory bounded."""

    def __init__(self, folder: EnsembleFolder, settings: ServeSettings):
        History.checked(settings.history, "history")
        self.folder, self.settings = folder, settings
        self.engine = load_engine(folder, device=settings.device, engine=settings.engine)
        self.point = self.engine.operating_point
        self.check_domain = settings.domain_check and self.engine.domain is not None
        if settings.domain_check and not self.check_domain:
            logger.warning("%s has no domain reference (built by an earlier alldetect): uploaded cells are not "
                           "checked against its training cells; rebuild it with `alldetect ensemble`", folder.path)
        self.store = PredictionStore(settings.db_path)
        self.scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alldetect-score")
        # Grad-CAM runs apart: a request asking for it holds the scorer no longer than scoring its cells
        self.explainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alldetect-cam")
        self.queued = self.receiving = 0
        self.receiving_from: dict[str, int] = {}  # bodies being received, per client network
        self.cam_from: set[str] = set()  # client networks with a Grad-CAM request waiting or running
        self.page_html = package_files("alldetect.serve").joinpath("page.html").read_bytes()
        self.app = self._routes(FastAPI(title="alldetect", version="1", description="ALL detection in single-cell "
                                        "images with a weighted ensemble of CNNs. Research software, not a medical "
                                        "device."))

    def _routes(self, app: FastAPI) -> FastAPI:
        app.add_middleware(SameOriginOnly, allowed_hosts=self.settings.allowed_hosts)
        app.exception_handler(UploadRejected)(_rejected)
        app.exception_handler(RequestValidationError)(_invalid)
        app.get("/", response_class=HTMLResponse, include_in_schema=False)(self.page)
        app.get("/model-card", response_class=PlainTextResponse, include_in_schema=False)(self.card)
        app.get("/api/health")(self.health)
        app.get("/api/model")(self.model_info)
        app.post("/api/predict")(self.predict)
        app.get("/api/results/{request_id}.csv")(self.results_csv)
        app.get("/history", response_class=HTMLResponse, include_in_schema=False)(self.history)
        return app

    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page_html)  # on the event loop: the cheapest answer is the one asked most

    def card(self) -> str:
        try:
            return self.folder.card()
        except SpecError as e:
            logger.warning("%s", e)
            raise HTTPException(404, "this ensemble folder has no usable MODEL_CARD.md; rebuild it with `alldetect "
                                     "ensemble`") from None

    def health(self) -> dict:
        """Liveness: the model is loaded; the prediction record is writable (else predictions are answered but
        not recorded); how many requests wait for scoring."""
        problem = self.store.problem()
        return {"status": "ok" if problem is None else "degraded", "model_id": self.folder.model_id,
                "store": "ok" if problem is None else problem, "queued": self.queued}

    def model_info(self) -> dict:
        """Members, their weights in the ensemble, the method, and the data the ensemble was trained on."""
        engine, point, spec = self.engine, self.point, self.folder.spec
        fit = spec.fit(engine.method)
        return {"model_id": self.folder.model_id, "method": engine.method, "engine": type(engine).__name__,
                "crop": engine.preprocess.crop, "threshold": point.cell_threshold,
                "patient_threshold": point.patient_threshold, "min_cells": point.min_cells,
                "operating_point": point.describe(), "tta": engine.default_tta,
                "domain_check": None if not self.check_domain else {
                    "fitted_on": engine.domain.fitted_on, "flagged_out_of_fold": engine.domain.flagged_out_of_fold},
                "members": [{"name": m.name, "weight": fit.weights[i] if isinstance(fit, WeightedAverage) else None,
                             "val_metrics": spec.val_metrics.get(m.name)}
                            for i, m in enumerate(spec.members)],
                "data": spec.data}

    async def predict(self, request: Request, cam: bool = False) -> dict:
        """Score uploaded cells. Multipart form, field ``files``: images (BMP, PNG, JPEG, TIFF) and/or zips
        of one patient's cells. ``cam=true`` adds a Grad-CAM overlay of each cell (PNG, base64)."""
        settings = self.settings
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise UploadRejected(400, "send the images as multipart/form-data in the field 'files'")
        address = client_network(request.client.host) if request.client else ""
        mine = self.receiving_from.get(address, 0)
        if mine >= settings.max_receiving_per_client:
            raise UploadRejected(503, f"busy: {settings.max_receiving_per_client} uploads from your address are "
                                      "still arriving; retry when one is in", retry_after=5)
        if self.receiving >= settings.max_receiving + (0 if mine else settings.receiving_reserve):
            raise UploadRejected(503, f"busy: {self.receiving} uploads are arriving; retry shortly", retry_after=5)
        self._refuse_cam(cam, address)  # before the body, so that a refused client sends nothing more
        return await self._receive_and_score(request, address, cam)

    def _cam_busy(self, address: str) -> bool:
        """Whether ``address`` has a Grad-CAM waiting or being made, or every place for one is taken."""
        return address in self.cam_from or len(self.cam_from) >= self.settings.max_cam_queued

    def _refuse_cam(self, cam: bool, address: str) -> None:
        if cam and self._cam_busy(address):
            raise UploadRejected(503, "busy: Grad-CAM " + ("of your previous request is still being made" if address
                                 in self.cam_from else "is being made for others") + "; retry later, or without "
                                 "cam", retry_after=10)

    async def _receive_and_score(self, request: Request, address: str, cam: bool) -> dict:
        settings, loop = self.settings, asyncio.get_running_loop()
        self.receiving += 1
        self.receiving_from[address] = self.receiving_from.get(address, 0) + 1
        try:
            files = await _read_files(request, settings.limits)
        finally:
            self.receiving -= 1
            self.receiving_from[address] -= 1
            if not self.receiving_from[address]:
                del self.receiving_from[address]
        # A queue place is taken once the body is in: a client that sends slowly holds none.
        if self.queued >= settings.max_queued:
            raise UploadRejected(503, f"busy: {self.queued} requests are waiting to be scored; retry shortly",
                                 retry_after=5)
        self.queued += 1
        try:
            answer, crops, scored = await loop.run_in_executor(self.scorer, self._work, files, request.state.client)
        finally:
            self.queued -= 1
        if cam and len(crops):
            overlays = await self._explained(address, crops[: settings.max_cam_cells])
            if isinstance(overlays, str):
                answer["cam_error"] = overlays
            else:
                for j, png in enumerate(overlays):
                    answer["cells"][scored[j]]["cam_png"] = png
        return answer

    async def _explained(self, address: str, crops: np.ndarray) -> list[str] | str:
        """Grad-CAM overlays of ``crops`` in the explaining thread, a place held by ``address`` while it waits and
        runs: taken only once the request's body is in and scored, so a client that sends slowly holds none. If the
        places filled meanwhile, the answer keeps its scores and says why it has no overlays."""
        if self._cam_busy(address):
            return "no Grad-CAM: it is being made for other requests; retry later"
        self.cam_from.add(address)
        try:
            return await asyncio.get_running_loop().run_in_executor(self.explainer, self._cams, crops)
        finally:
            self.cam_from.discard(address)

    def _work(self, files: list[tuple[str, bytes]], client: str) -> tuple[dict, np.ndarray, list[int]]:
        """The answer, the scored cells' crops (for Grad-CAM) and the indices of those cells in the answer."""
        try:
            cells = expand_uploads(files, self.settings.limits)
            files.clear()  # the cells hold what is still needed
            request_id, model_id = uuid.uuid4().hex, self.folder.model_id
            result, crops, scored = self._score(cells)
            recorded = self.store.record(request_id, model_id, result["cells"], client=client)
            return {"request_id": request_id, "model_id": model_id, "method": self.engine.method,
                    "threshold": self.point.cell_threshold, "patient_threshold": self.point.patient_threshold,
                    "tta": self.engine.default_tta, **result, "recorded": recorded,
                    "csv_url": f"/api/results/{request_id}.csv"}, crops, scored
        finally:
            release_memory()

    def _score(self, cells: list[UploadedCell]) -> tuple[dict, np.ndarray, list[int]]:
        engine, point, settings = self.engine, self.point, self.settings

        def decoder(cell: UploadedCell):
            def decode():
                try:
                    return decode_cell(cell, settings.limits)
                finally:
                    cell.data = None  # one frame decoded at a time; only its crop is kept
            return decode

        scores = score_cells(engine, [cell.error or decoder(cell) for cell in cells], [c.name for c in cells],
                             domain_check=settings.domain_check, geometry=settings.geometry)
        position = {cell_index: j for j, cell_index in enumerate(scores.kept)}
        out = []
        for i, cell in enumerate(cells):
            j = position.get(i)
            prob = scores.prob[i]
            finite = j is not None and bool(np.isfinite(prob))
            inside = None if scores.in_domain is None or j is None else bool(scores.in_domain[i])
            out.append({
                "name": cell.name, "group": cell.group or _subject(cell.name), "sha256": cell.sha256,
                "prob_all": float(prob) if finite else None,
                "call": cell_call(prob, point.cell_threshold, inside) if finite else None,
                "in_domain": inside, "domain_note": scores.domain_notes[i],
                "members": {} if j is None else {n: float(scores.members[k, i]) for k, n in enumerate(engine.names)},
                "cam_png": None,
                "error": scores.errors[i] or ("" if finite or j is None else "no probability could be computed"),
                "warning": scores.warnings[i]})
        scored = [i for i, c in enumerate(out) if c["prob_all"] is not None]
        patients = subject_level(np.full(len(scored), Label.UNLABELLED), scores.prob[scored],
                                 [out[i]["group"] for i in scored], point=point,
                                 in_domain=None if scores.in_domain is None else scores.in_domain[scored]) \
            if scored else []
        for p in patients:
            del p["truth"], p["correct"]
            if not np.isfinite(p["mean_prob_all"]):  # every cell outside the domain: no mean to show
                p["mean_prob_all"] = None
        return {"cells": out, "patients": patients}, scores.crops, scores.kept

    def _cams(self, batch: np.ndarray) -> list[str] | str:
        """Grad-CAM needs the torch members with hooks on them, beside the scorer's thread: always a copy loaded
        for this request and let go after it (the scoring engine, torch or ONNX, is never hooked while it scores).
        Why there is none (the folder's weights replaced since the server started, say) is one line; the scores
        stand."""
        try:
            model = TorchEngine.from_folder(self.folder, method=self.engine.method, device=self.settings.device)
            maps = cell_cams(model, batch).ensemble
            del model
        except Exception as e:  # noqa: BLE001  (whatever fails, the request keeps its scores)
            logger.warning("Grad-CAM not made: %s", first_line(e))
            return f"no Grad-CAM: {first_line(e)}"
        finally:
            gc.collect()
            release_memory()
        encoded = []
        for crop, m in zip(batch, maps):
            buffer = io.BytesIO()
            Image.fromarray(overlay(crop, m)).save(buffer, format="PNG")
            encoded.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
        return encoded

    def results_csv(self, request_id: str) -> Response:
        """The cells of one request as a predictions CSV (contract columns plus members)."""
        rows = self.store.request(request_id)
        if not rows:
            raise HTTPException(404, f"no request {request_id!r}")
        nan = float("nan")
        members = [json.loads(r["member_probs"]) for r in rows]
        notes = [r["domain_note"] for r in rows]
        probs = [nan if r["prob_all"] is None else r["prob_all"] for r in rows]
        inside = [None if n is None else not n for n in notes]  # a note is written only for a cell outside
        texts = {"call": [cell_call(p, self.point.cell_threshold, i) for p, i in zip(probs, inside)]}
        if not all(n is None for n in notes):
            texts.update({"in_domain": ["" if n is None else "no" if n else "yes" for n in notes],
                          "domain_note": [n or "" for n in notes]})
        columns, records = prediction_records(
            [r["file_name"] for r in rows], [""] * len(rows),
            {self.engine.method: np.array(probs)},
            subjects=[r["subject"] or _subject(r["file_name"]) for r in rows], errors=[r["error"] for r in rows],
            texts=texts, extra={f"prob_{n}": np.array([m.get(n, nan) for m in members]) for n in self.engine.names},
            spreadsheet_safe=True, printed=True)  # names were made printable when they were uploaded
        for record, r in zip(records, rows):
            record["sha256"] = r["sha256"]
        return Response(csv_text([*columns, "sha256"], records), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="alldetect-{request_id}.csv"'})

    def history(self, request: Request) -> str:
        """Recent predictions: this browser's own (private), everyone's (shared) or none (off)."""
        if self.settings.history == History.off:
            raise HTTPException(404, "the prediction history is not shown on this server (serve --history off)")
        private = self.settings.history == History.private
        rows = self.store.recent(client=request.state.client if private else None)
        scope = "this browser's predictions" if private else "every client's predictions"
        body = "".join(
            f"<tr><td>{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['time']))}</td>"
            f"<td>{html.escape(r['file_name'])}</td><td><code>{r['sha256'][:16]}</code></td>"
            f"<td>{_probability(r['prob_all'])}</td>"
            f"<td>{html.escape(r['model_id'])}</td><td>{html.escape(r['error'])}</td></tr>" for r in rows)
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>alldetect history</title>"
                f"<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 8px;border-bottom:1px solid #ddd}}"
                f"</style></head><body><h1>Prediction history</h1><p>{scope}. <a href='/'>back</a></p>"
                f"<table><tr><th>time"
                f"</th><th>file</th><th>sha256</th><th>P(ALL)</th><th>model</th><th>error</th></tr>{body}</table>"
                f"</body></html>")


async def _rejected(_request: Request, exc: UploadRejected) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)


async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"detail": f"invalid request: {problems}"}, status_code=422)


async def _read_files(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """The uploaded files, kept in memory, the size limit enforced on the bytes as they arrive (a request
    without Content-Length, or one that lies about it, is cut off at the limit, never spooled whole). A client
    that hangs up is one log line."""
    try:
        return await _parse_files(request, limits)
    except ClientDisconnect:
        client = request.client.host if request.client else "a client"
        logger.warning("%s hung up while sending an upload; nothing was scored", client)
        raise UploadRejected(400, "the client disconnected before the upload was complete") from None


async def _parse_files(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    allowed = limits.max_request_bytes + MULTIPART_OVERHEAD
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > allowed:
        raise UploadRejected(413, f"request of {int(declared):,} bytes exceeds the {limits.max_request_bytes:,}-byte "
                                  "limit")

    async def counted():
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > allowed:
                raise UploadRejected(413, f"request exceeds the {limits.max_request_bytes:,}-byte limit")
            yield chunk

    parser = MultiPartParser(request.headers, counted(), max_files=limits.max_files, max_fields=16)
    parser.spool_max_size = allowed + 1  # starlette spools parts above this size to disk; ours never reach it
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if "Too many files" in str(e):
            raise UploadRejected(413, f"more than {limits.max_files} files in one request") from None
        raise UploadRejected(400, f"malformed multipart body ({e})") from None
    uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    files = [(PurePosixPath(u.filename or "upload").name, await u.read()) for u in uploads]
    await form.close()
    return files


def release_memory() -> None:
    """Hand freed heap back to the system after a request (glibc keeps it otherwise, and a server's resident
    memory would stay at its largest request)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _probability(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _subject(name: str) -> str:
    parsed = parse_cell_name(PurePosixPath(name).name)
    return parsed.subject if parsed else "upload"
