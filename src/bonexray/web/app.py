"""The FastAPI app behind ``bonexray serve``: one static page and a small JSON API.

* ``GET /``: the page (``static/``: plain HTML, CSS and JS, no build step, nothing from outside).
* ``POST /api/predict``: multipart field ``files`` (one or more images) -> the records of
  ``bonexray predict`` (core/findings.py ImageFinding, one per image) plus one StudyFinding per
  study: a DICOM image belongs to the study of its StudyInstanceUID; any other file is its own
  study unless the request says ``grouping=one`` (form field or query; all non-DICOM files of the
  request as one study); default ``grouping=auto``. Files that cannot be read are named in
  ``errors`` beside the results of the good ones (422 only when none is good). ``?heatmap=1`` adds,
  per image, the original radiograph at full resolution (8-bit PNG after the file's own VOI
  window, MONOCHROME1 inverted) with its size, the heatmap mapped from the letterboxed tile back
  onto the original's pixels (8-bit gray PNG, 0..255 = 0..1), and the older 512-px pictures.
* ``GET /api/model``: the model card; ``GET /healthz``; ``/docs``: the OpenAPI page, served
  from the ``fastapi-offline`` package (no CDN).

Decoding, the scope gate and the verdict go through :mod:`bonexray.pipeline` (what predict, the
Python API and pacs use), prediction through :class:`Predictor`, heatmaps through ``inference.cam``. One model is shared by all requests; model calls take a lock (Grad-CAM hooks
the network, so two at once would mix their activations), decoding runs in parallel beside it.
A client that goes away stops its request's work: the route checks between files (decoding)
and between model calls of ``INFER_CHUNK`` images, so a cancelled batch does not hold the model.
"""
from __future__ import annotations

import base64
import io
import logging
import os
import secrets
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from .._version import __version__
from ..errors import BonexrayError
from ..core.findings import ImageFinding, StudyFinding
from ..pipeline import Analyser, Decoded, decode, study_keys
from .uploads import FIELD, UploadError, UploadLimits, read_uploads

log = logging.getLogger("bonexray.serve")

STATIC_DIR = Path(__file__).parent / "static"
API_KEY_HEADER = "X-API-Key"
API_KEY_ENV = "BONEXRAY_API_KEY"
STUDY_NAME = "upload"  # grouping=one: the non-DICOM images a person dropped together
INTENDED_USE = ("Not a medical device: research and teaching software, not for diagnosis or treatment "
                "decisions. Every result must be checked by a qualified reader.")
HEATMAP_NAMES = {"localization": "learned fracture map", "gradcam++": "Grad-CAM++"}
HEATMAP_NOTES = {
    "localization": "probability of a fracture per region, learned from annotated fracture boxes; "
                    "not rescaled per image, so a faint map means no fracture seen",
    "gradcam++": "regions that raised p(abnormal) most (Grad-CAM++), rescaled per image: "
                 "it always shows a hot spot, even on a normal image",
}
# The page and its files: nothing but this origin, no inline code.
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


# A JSON document (the OpenAPI schema): nothing on it may run or load.
DATA_CSP = "default-src 'none'; frame-ancestors 'none'"


def docs_csp(html: str) -> str:
    """The CSP of the OpenAPI page (fastapi-offline's Swagger UI): its files from this origin, its inline
    scripts by their SHA-256 (nothing else inline runs), inline styles (Swagger UI sets style attributes)."""
    import hashlib
    import re

    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                      for attrs, body in re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S) if "src=" not in attrs)
    return (f"default-src 'self'; script-src 'self' {hashes}".rstrip() + "; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")


async def _with_docs_csp(response):
    """The docs page again, with the CSP that allows exactly its own inline scripts."""
    from fastapi.responses import Response

    body = b"".join([chunk async for chunk in response.body_iterator])
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    headers["Content-Security-Policy"] = docs_csp(body.decode("utf-8", "replace"))
    return Response(body, status_code=response.status_code, headers=headers)


# --------------------------------------------------------------------------- schemas


class ImagePrediction(ImageFinding):
    """One image: the record of ``bonexray predict`` (core/findings.py ImageFinding, with ``prob_<part>`` for
    every body part) and, with ``?heatmap=1``, its pictures."""

    heatmap_png: str | None = Field(None, description="with ?heatmap=1 and a checkpoint: base64 PNG, radiograph with the heatmap")
    image_png: str | None = Field(None, description="with ?heatmap=1: base64 PNG, the radiograph as the model saw it")
    original_png: str | None = Field(None, description="with ?heatmap=1: base64 8-bit PNG, the radiograph at its own "
                                     "resolution (DICOM: after its VOI LUT/window, MONOCHROME1 inverted)")
    original_width: int | None = Field(None, description="with ?heatmap=1: width of the original in pixels")
    original_height: int | None = Field(None, description="with ?heatmap=1: height of the original in pixels")
    heatmap_gray_png: str | None = Field(None, description="with ?heatmap=1 and a checkpoint: base64 8-bit gray PNG, "
                                         "the heatmap (0..255 = 0..1) covering exactly the original image, padding cut "
                                         "off; stretch it to original_width x original_height")


#: A study of the request (core/findings.py StudyFinding, with ``prob_<part>`` means).
StudyPrediction = StudyFinding


class FileProblem(BaseModel):
    file: str
    reason: str


class PredictResponse(BaseModel):
    images: list[ImagePrediction]
    study: StudyPrediction = Field(description="the first study")
    studies: list[StudyPrediction] = Field(description="one record per study, in order of first appearance")
    threshold: float
    heatmap: str | None = Field(None, description="what the heatmaps show (with ?heatmap=1)")
    errors: list[FileProblem] | None = Field(None, description="files that could not be read; the others were analysed")


class ErrorResponse(BaseModel):
    detail: str = Field(description="one line saying what was wrong")
    errors: list[FileProblem] | None = Field(None, description="per file, when files could not be read")


class Evaluation(BaseModel):
    """Test results of the model, from the ``metrics.json`` of ``bonexray evaluate`` given to ``serve --metrics``."""

    split: str | None = None
    n_images: int | None = None
    n_studies: int | None = None
    auroc: float | None = Field(None, description="image-level AUROC for abnormality")
    auroc_ci95: list[float] | None = Field(None, description="95% bootstrap interval of the AUROC")
    sensitivity: float | None = Field(None, description="at the model's threshold, image level")
    specificity: float | None = Field(None, description="at the model's threshold, image level")
    source_file: str = Field(description="name of the metrics file")


class TrainingData(BaseModel):
    dataset: str
    source: str | None = None
    images: dict[str, int] | None = Field(None, description="images per split used in training")
    epochs: int | None = Field(None, description="epochs configured (early stopping may have ended sooner)")


class ModelInfo(BaseModel):
    model_file: str
    format: Literal["checkpoint", "onnx"]
    backbone: str
    image_size: int
    body_parts: list[str]
    threshold: float
    threshold_source: str = Field(description="where the threshold came from")
    classes: list[str] = Field(description="what the model tells apart: abnormality and body parts")
    evaluation: Evaluation | None = Field(None, description="test results (serve --metrics), or null")
    version: str = Field(description="bonexray version that wrote the model")
    heatmap: str | None = Field(description="the heatmap this model gives, or null (ONNX models have none)")
    heatmap_note: str
    training_data: TrainingData | None = Field(description="from the training run's config.yaml when found")
    intended_use: str
    borderline_band: float = Field(description="|p - threshold| below this is 'borderline'")
    borderline_source: str = Field(description="how the band was set")
    scope_check: str = Field(description="which scope checks run (inference/scope.py)")
    limits: dict[str, int]
    server_version: str


class Health(BaseModel):
    status: Literal["ok"]


GROUPING_HELP = ("how images without a DICOM StudyInstanceUID form studies: 'auto' (default): each file is its own "
                 "study; 'one': all of them are one study. DICOM images always go to the study of their "
                 "StudyInstanceUID. Also accepted as the form field 'grouping'.")
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 500)}


# --------------------------------------------------------------------------- the model


def _training_data(model_path: Path) -> TrainingData | None:
    """What the model learned from, read from its run directory (RUN/checkpoints/x.ckpt)."""
    import yaml

    from ..runs import find_run_dir

    run = find_run_dir(model_path)
    if run is None:
        return None
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
        return TrainingData(dataset=Path(str(cfg.get("data", "?"))).name,  # a name, never a local path
                            source=cfg.get("source"), images=cfg.get("n_images"), epochs=cfg.get("epochs"))
    except Exception as err:  # noqa: BLE001 - a card without this line is still a card
        log.warning("%s: cannot read the training run's config.yaml (%s)", run, err)
        return None


def threshold_source(card) -> str:
    """Where the card's threshold came from, in words (a train+valid fit keeps 0.5 by design)."""
    fit_on = (card.split or {}).get("fit_on")
    if fit_on == "train+valid":
        return ("0.5 by design: fitted on train+valid, so no split was left to choose it on "
                "(0.5 is the operating point of its class-balanced loss)")
    if card.split is None:
        return "stored in the model file (this model does not record how it was chosen)"
    return "chosen on the validation split during training"


def read_evaluation(path: str | os.PathLike) -> Evaluation:
    """The headline test numbers from a ``bonexray evaluate`` metrics.json; a bad file is one clear error."""
    import json

    p = Path(path)
    try:
        m = json.loads(p.read_text())
        img = m["abnormality"]["image"]
        ci = (m["abnormality"].get("ci95") or {}).get("image_auroc")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BonexrayError(f"{p}: not a metrics.json of bonexray evaluate ({type(err).__name__}: {err})") from None
    return Evaluation(split=m.get("split"), n_images=m.get("n_images"), n_studies=m.get("n_studies"),
                      auroc=img.get("auroc"), auroc_ci95=list(ci) if ci else None,
                      sensitivity=img.get("recall"), specificity=img.get("specificity"), source_file=p.name)


def _bundled_training_data(model_path: Path) -> TrainingData | None:
    from ..model.hub import BUNDLED

    for m in BUNDLED:
        if m.path == model_path and m.info().get("training_data"):
            td = m.info()["training_data"]
            return TrainingData(dataset=td.get("dataset", "?"), source=(m.info().get("card", {}).get("split") or {}).get(
                "source"), images=td.get("split_counts"))
    return None


def bundled_evaluation(model_path: Path) -> Evaluation | None:
    """The test numbers a bundled model's description records (model/hub.py), when ``model_path`` is one."""
    from ..model.hub import BUNDLED

    for m in BUNDLED:
        if m.path == model_path:
            t = m.info().get("test_metrics") or {}
            auroc = t.get("image_auroc") or {}
            return Evaluation(split=t.get("split"), n_images=t.get("n_images"), n_studies=t.get("n_studies"),
                              auroc=auroc.get("value"), auroc_ci95=auroc.get("ci95"),
                              sensitivity=(t.get("sensitivity") or {}).get("value"),
                              specificity=(t.get("specificity") or {}).get("value"),
                              source_file=m.info_path.name) if t else None
    return None


class ModelService:
    """One loaded model shared by every request."""

    def __init__(self, model_path: str | os.PathLike | None, device: str = "auto",
                 metrics: str | os.PathLike | None = None, scope_check: bool = True) -> None:
        from ..inference.predictor import Predictor, is_onnx_file, resolve_device

        self.predictor = Predictor(model_path, device=device)  # a path or a bundled name (None: the default)
        self.path = self.predictor.path
        # Non-finite outputs name the model file, never its folder on the server.
        self.analyser = Analyser(self.predictor, scope_check=scope_check, model_label=self.path.name)
        self.scope = self.analyser.gate
        self.band, self.band_source = self.analyser.band, self.analyser.band_source
        self.format: Literal["checkpoint", "onnx"] = "onnx" if is_onnx_file(self.path) else "checkpoint"
        self.cam_net = None
        self.heatmap_method: str | None = None
        if self.format == "checkpoint":
            # Heatmaps need the torch network; load it here so this does not depend on how the
            # Predictor runs the checkpoint.
            from ..model.checkpoint import load_model

            self.cam_net, _ = load_model(self.path, map_location=resolve_device(device))
            has_head = getattr(self.cam_net, "localization_head", None) is not None
            self.heatmap_method = "localization" if has_head else "gradcam++"
        self.training_data = (_training_data(self.path) or _bundled_training_data(self.path)
                              if self.format == "checkpoint" else None)
        self.evaluation = read_evaluation(metrics) if metrics else bundled_evaluation(self.path)
        self._lock = threading.Lock()

    @property
    def image_size(self) -> int:
        return int(self.predictor.card.image_size)

    def run(self, batch: np.ndarray, heatmap: bool):
        """(BatchPrediction (probabilities, boxes in tile pixels), heatmaps (N, S, S) or None); one caller at a time."""
        from ..inference.cam import cam_for_batch

        with self._lock:
            pred = self.predictor.predict_batch(batch, box_settings=self.analyser.box_settings)
            maps = None
            if heatmap and self.cam_net is not None:
                maps = cam_for_batch(self.cam_net, batch, method=self.heatmap_method)
        return pred, maps

    def info(self, limits: UploadLimits) -> ModelInfo:
        card = self.predictor.card
        method = self.heatmap_method
        return ModelInfo(
            model_file=self.path.name, format=self.format, backbone=card.backbone, image_size=int(card.image_size),
            body_parts=list(self.predictor.body_parts), threshold=float(self.predictor.threshold),
            threshold_source=threshold_source(card),
            classes=["normal", "abnormal"] + [f"body part: {b}" for b in self.predictor.body_parts],
            evaluation=self.evaluation,
            version=str(card.version), heatmap=HEATMAP_NAMES.get(method) if method else None,
            heatmap_note=HEATMAP_NOTES[method] if method else
            "an exported ONNX model has no heatmaps (they need the network's gradients); serve the checkpoint for them",
            training_data=self.training_data, intended_use=INTENDED_USE, limits=asdict(limits),
            borderline_band=self.band, borderline_source=self.band_source, scope_check=self.scope.describe(),
            server_version=__version__,
        )


def _png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pictures(gray: np.ndarray, heat: np.ndarray | None) -> tuple[str | None, str]:
    """(overlay or None, plain) base64 PNGs, both at the size ``render_overlay`` draws."""
    from PIL import Image

    from ..inference.cam import DISPLAY_SIZE, render_overlay

    size = max(DISPLAY_SIZE, gray.shape[0])
    plain = _png_b64(Image.fromarray(gray).resize((size, size), Image.Resampling.BICUBIC))
    return (None if heat is None else _png_b64(render_overlay(gray, heat, display_size=size))), plain


def heatmap_on_original(heat: np.ndarray, geometry) -> np.ndarray:
    """The part of a heatmap over the letterboxed tile that covers the image (padding cut off).

    ``geometry`` (data/preprocess.py Letterbox) says where the original sits in the tile; the crop,
    stretched to the original's size, lies exactly on its pixels. Returned as uint8 (0..255 = 0..1).
    """
    left, top, nw, nh = geometry.content
    crop = np.clip(heat[top : top + nh, left : left + nw], 0.0, 1.0)
    return np.rint(crop * 255.0).astype(np.uint8)


@dataclass
class Upload:
    """One upload through the pipeline's decode (bonexray.pipeline.decode), with the picture serve shows."""

    name: str
    decoded: Decoded
    original: np.ndarray | None  # uint8 (H, W) at full resolution, when pictures are wanted

    @property
    def original_wh(self) -> tuple[int, int]:
        return self.decoded.geometry.original_size


def _decode_one(up, size: int, max_pixels: int, want_original: bool) -> Upload:
    from ..data.imageio import read_image_bytes, to_uint8

    d = decode(up.data, size, name=up.name, max_pixels=max_pixels)
    original = None
    if want_original:
        full = d.pixels
        if full.shape[::-1] != tuple(d.geometry.original_size):  # a JPEG decoded at 1/2..1/8 scale
            full = read_image_bytes(up.data, up.name, max_pixels=max_pixels).pixels
        original = to_uint8(full)
    return Upload(up.name, d, original)


def _decode_all(uploads, size: int, max_pixels: int, want_original: bool = False):
    good, problems = [], []
    for up in uploads:
        try:
            good.append(_decode_one(up, size, max_pixels, want_original))
        except BonexrayError as err:
            problems.append(FileProblem(file=up.name, reason=getattr(err, "reason", str(err))))
        except Exception as err:  # noqa: BLE001 - whatever a decoder throws, the client gets a 4xx
            problems.append(FileProblem(file=up.name, reason=f"cannot decode ({type(err).__name__})"))
    return good, problems


def study_names(good: list[Upload], grouping: str) -> list[str]:
    """Each upload's study: its DICOM StudyInstanceUID where it states one; other files each alone
    (``grouping="auto"``) or together (``"one"``)."""
    fallback = [STUDY_NAME if grouping == "one" else f"image {i + 1}" for i in range(len(good))]
    return study_keys([u.decoded for u in good], fallback)


# --------------------------------------------------------------------------- cancel on disconnect

#: Images per model call: a client that goes away stops the work within one such call.
INFER_CHUNK = 4


class ClientGone(Exception):
    """The client closed the connection (a cancel, a closed tab, a later drop): its work stops."""


RAW_RECEIVE = "bonexray.receive"


class KeepServerReceive:
    """Pure ASGI middleware (outermost) that keeps the server's own ``receive`` in the scope.

    The ``http`` middleware of :func:`create_app` (Starlette's BaseHTTPMiddleware) wraps ``receive``
    so that ``Request.is_disconnected`` never sees the client leave; the server's one does."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            scope[RAW_RECEIVE] = receive
        await self.app(scope, receive, send)


async def client_gone(request: Request) -> bool:
    """True once the client has closed the connection (the body must have been read already)."""
    raw = request.scope.get(RAW_RECEIVE)
    return await (Request(request.scope, raw) if raw is not None else request).is_disconnected()


@dataclass
class WorkCounters:
    """What the predict route did, per request: kept on ``app.state.work`` for logs and tests.

    ``started``: requests that began decoding; ``cancelled``: those whose client went away first;
    ``last_cancelled`` / ``last_completed``: ``{"of", "decoded", "inferred"}`` image counts."""

    started: int = 0
    cancelled: int = 0
    last_cancelled: dict[str, int] | None = None
    last_completed: dict[str, int] | None = None

    def begin(self, n_images: int) -> dict[str, int]:
        self.started += 1
        return {"of": n_images, "decoded": 0, "inferred": 0}

    def cancel(self, progress: dict[str, int]) -> JSONResponse:
        self.cancelled += 1
        self.last_cancelled = dict(progress)
        log.info("client went away: stopped after decoding %d and analysing %d of %d images",
                 progress["decoded"], progress["inferred"], progress["of"])
        # Nobody reads this answer; 499 is the usual log code for "client closed the request".
        return _error(499, "the client closed the request; its work was stopped")

    def completed(self, progress: dict[str, int]) -> None:
        self.last_completed = dict(progress)


async def _decode_while_connected(request: Request, uploads, size: int, max_pixels: int, want_original: bool,
                                  limiter, progress: dict[str, int]):
    """``_decode_all`` one file at a time, stopping (:class:`ClientGone`) once the client has left."""
    good, problems = [], []
    for up in uploads:
        if await client_gone(request):
            raise ClientGone
        ok, bad = await anyio.to_thread.run_sync(_decode_all, [up], size, max_pixels, want_original, limiter=limiter)
        good += ok
        problems += bad
        progress["decoded"] += 1
    return good, problems


async def _run_while_connected(request: Request, service: "ModelService", batch: np.ndarray, heatmap: bool,
                               progress: dict[str, int]):
    """``service.run`` in chunks of :data:`INFER_CHUNK` images, stopping once the client has left (a
    later request then waits for one chunk at most, not for a whole abandoned batch)."""
    preds, maps = [], []
    for start in range(0, len(batch), INFER_CHUNK):
        if await client_gone(request):
            raise ClientGone
        chunk = batch[start : start + INFER_CHUNK]
        p, m = await anyio.to_thread.run_sync(service.run, chunk, heatmap)
        preds.append(p)
        maps.append(m)
        progress["inferred"] += len(chunk)
    if len(preds) == 1:
        return preds[0], maps[0]
    first = preds[0]
    pred = replace(
        first, prob=np.concatenate([p.prob for p in preds]), parts=np.concatenate([p.parts for p in preds]),
        embedding=None if first.embedding is None else np.concatenate([p.embedding for p in preds]),
        boxes=None if first.boxes is None else [b for p in preds for b in p.boxes],
        outputs=None if first.outputs is None else {k: np.concatenate([p.outputs[k] for p in preds])
                                                    for k in first.outputs})
    return pred, (None if maps[0] is None else np.concatenate(maps))


# --------------------------------------------------------------------------- the app


def _error(status: int, detail: str, errors: list[FileProblem] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail}
    if errors:
        body["errors"] = [e.model_dump() for e in errors]
    return JSONResponse(body, status_code=status)


def create_app(
    model_path: str | os.PathLike | None,
    *,
    api_key: str | None = None,
    limits: UploadLimits | None = None,
    device: str = "auto",
    decode_workers: int | None = None,
    metrics: str | os.PathLike | None = None,
    max_requests: int = 64,
    scope_check: bool = True,
) -> FastAPI:
    """The app for one model. With ``api_key``, every ``/api/`` call needs header ``X-API-Key``;
    ``metrics``: a ``bonexray evaluate`` metrics.json whose test numbers the model card shows.

    ``max_requests``: requests in progress at once; more get 503 (idle connections do not count, nor
    ``/healthz``). A request body that stops coming is cut off with 408 (``UploadLimits.body_grace_s``).
    """
    from fastapi_offline import FastAPIOffline

    limits = limits or UploadLimits()
    service = ModelService(model_path, device=device, metrics=metrics, scope_check=scope_check)
    # Decoding a large image holds a few times its pixels in memory: bound how many run at once.
    decode_limiter = anyio.CapacityLimiter(decode_workers or max(2, os.cpu_count() or 2))
    app = FastAPIOffline(
        title="bonexray", version=__version__, redoc_url=None,
        description="Bone X-ray abnormality and body part, with heatmaps. " + INTENDED_USE,
    )
    app.state.service = service
    app.state.model_path = service.path
    app.state.limits = limits
    work = app.state.work = WorkCounters()

    key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the key given to `bonexray serve`")

    async def require_key(key: str | None = Depends(key_header)) -> None:
        if not key:
            raise UploadError(401, f"this server needs an API key (send it in the {API_KEY_HEADER} header)")
        if not secrets.compare_digest(key.encode(), api_key.encode()):
            raise UploadError(401, "wrong API key: the server did not accept it")

    api_deps = [Depends(require_key)] if api_key else []

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("query", "body"))
        return _error(422, f"{where or 'request'}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, "internal error; the server log has the details")

    in_progress = [0]  # requests being handled now (one event loop: no lock needed)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        path = request.url.path
        if path == "/healthz":  # outside the limit: a monitor must see a busy server alive
            response = await call_next(request)
        else:
            if in_progress[0] >= max_requests:
                return _error(503, f"server busy ({max_requests} requests in progress); try again shortly")
            in_progress[0] += 1
            try:
                response = await call_next(request)
            finally:
                in_progress[0] -= 1
        h = response.headers
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("Referrer-Policy", "no-referrer")
        if path == "/" or path.startswith("/static/"):
            h.setdefault("Content-Security-Policy", PAGE_CSP)
        elif path == app.openapi_url:
            h.setdefault("Content-Security-Policy", DATA_CSP)
        elif path.startswith("/docs") and response.headers.get("content-type", "").startswith("text/html"):
            # fastapi-offline's Swagger UI page (and its OAuth2 redirect page), both with inline scripts
            response = await _with_docs_csp(response)
        if path.startswith("/api/"):
            h["Cache-Control"] = "no-store"  # results about someone's radiograph are not cached anywhere
        return response

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get("/api/model", response_model=ModelInfo, responses={401: _ERRORS[401]}, dependencies=api_deps,
             tags=["model"], summary="The model card")
    async def model_info() -> ModelInfo:
        return service.info(limits)

    @app.post(
        "/api/predict", response_model=PredictResponse, response_model_exclude_unset=True, responses=_ERRORS,
        dependencies=api_deps, tags=["model"], summary="Predict on one image or several (one study by default)",
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": [FIELD],
            "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                                   "description": "PNG, JPEG or DICOM files"},
                           "grouping": {"type": "string", "enum": ["auto", "one"], "default": "auto",
                                        "description": GROUPING_HELP}}}}}}},
    )
    async def predict(request: Request, heatmap: bool = Query(False, description="add the original image and "
                                                              "heatmaps as base64 PNGs"),
                      grouping: Literal["auto", "one"] | None = Query(None, description=GROUPING_HELP)):
        form: dict[str, str] = {}
        uploads = await read_uploads(request.headers.get("content-type"), request.headers.get("content-length"),
                                     request.stream(), limits, fields=form)
        grouping = grouping or _form_grouping(form)
        progress = work.begin(len(uploads))
        try:
            good, problems = await _decode_while_connected(request, uploads, service.image_size, limits.max_pixels,
                                                           heatmap, decode_limiter, progress)
        except ClientGone:
            return work.cancel(progress)
        del uploads  # the bytes are not needed any more
        if not good:  # nothing to analyse: the request fails, naming every file
            bad, first = ", ".join(p.file for p in problems), problems[0]
            detail = (f"{first.file}: {first.reason}" if len(problems) == 1
                      else f"{len(problems)} files could not be read ({bad}); first: {first.file}: {first.reason}")
            return _error(422, detail, problems)
        batch = np.stack([u.decoded.tile for u in good])
        try:
            pred, maps = await _run_while_connected(request, service, batch, heatmap, progress)
        except ClientGone:
            return work.cancel(progress)
        found = service.analyser.interpret([u.decoded for u in good], pred, study_names(good, grouping))
        problems += [FileProblem(file=p.label, reason=p.reason) for p in found.problems]
        if not found.findings:  # every output was non-finite
            return _error(500, f"{problems[-1].file}: {problems[-1].reason}", problems)
        body = await anyio.to_thread.run_sync(_response, service, found, good, maps, heatmap)
        if problems:  # the good files were analysed; the bad ones are named beside them
            body["errors"] = [p.model_dump() for p in problems]
        work.completed(progress)
        return body

    app.add_middleware(KeepServerReceive)  # last added: outermost, so it sees the server's receive
    return app


def _form_grouping(form: dict[str, str]) -> str:
    value = form.get("grouping") or "auto"
    if value not in ("auto", "one"):
        raise UploadError(422, f"grouping: must be 'auto' or 'one', got {value[:20]!r}")
    return value


def _response(service: ModelService, found, good: list[Upload], maps, want_pictures: bool) -> dict[str, Any]:
    """The JSON body: the findings' records, their studies, and with ``want_pictures`` each image's pictures."""
    images = [f.record() for f in found.findings]
    if want_pictures:
        for rec, i in zip(images, found.kept, strict=True):
            _add_pictures(rec, good[i], None if maps is None else maps[i])
    study_list = [s.record() for s in service.analyser.aggregate(found.findings)]
    return {"images": images, "study": study_list[0], "studies": study_list, "threshold": service.predictor.threshold,
            "heatmap": HEATMAP_NAMES[service.heatmap_method] if maps is not None else None}


def _add_pictures(rec: dict[str, Any], up: Upload, heat: np.ndarray | None) -> None:
    from PIL import Image

    overlay, rec["image_png"] = _pictures(up.decoded.tile, heat)
    if overlay is not None:  # unset, not null, when there is no heatmap (fields are sent only when set)
        rec["heatmap_png"] = overlay
    rec["original_png"] = _png_b64(Image.fromarray(up.original))
    rec["original_width"], rec["original_height"] = up.original_wh
    if heat is not None:
        rec["heatmap_gray_png"] = _png_b64(Image.fromarray(heatmap_on_original(heat, up.decoded.geometry)))
