"""The scope gate: no verdict where the model cannot know, and the borderline band around the threshold.

An image is *out of scope* (``in_scope: false`` and a ``scope_reason``) when one of these holds, checked
cheapest first:

1. ``"too little of the image decoded"``: a truncated file whose undecoded rest (a flat run of rows
   at the bottom, which decoders fill with one value) is more than half the image.
2. ``"image too small or too narrow to read"``: the shorter side under :data:`MIN_SIDE` pixels, or
   the sides further apart than :data:`MAX_ASPECT` to 1 (the model reads a square tile).
3. ``"blank or nearly constant image"``: the decoded pixels' standard deviation is below
   :data:`BLANK_STD` (of 255), or :data:`BLANK_SHARE` of them lie within 2 grey levels of one value.
4. What the file says it is. DICOM kinds by allow list: CR and DX are assessed; RF and XA only as
   single frames (``"multi-frame DICOM, not a single radiograph"``); OT, SC and files without a
   Modality only when their pixels pass every other check; everything else (CT, MR, US, NM, PT, RTDOSE,
   RTIMAGE, SEG, ...) is ``"not a radiograph"``, and MG, PX, IO (breast, dental) are
   ``"body part not among the model's classes"``. Colour: a colour file or colour DICOM whose
   thumbnail is colourful (Hasler-Suesstrunk colourfulness above :data:`COLOUR_LIMIT`) over more than
   :data:`COLOUR_SHARE` of its area is ``"not a radiograph"`` (a thin coloured arrow or label on a
   radiograph is not). The DICOM body-part tags (core/body_parts.py, one table): a file that names
   its region, none of which is among the model's classes, is ``"body part not among the model's
   classes"``; a region that maps is evidence only. A JPEG file, or a DICOM stored as 8-bit lossy JPEG
   (baseline / extended transfer syntax), whose quantization tables say it was saved below IJG quality
   :data:`MIN_JPEG_QUALITY` (estimated from the luminance table, as ImageMagick's identify does) is
   ``"image too heavily JPEG-compressed"``: block artefacts at such qualities flip verdicts
   (bench/RESULTS.md, Robustness). 12-bit lossy JPEG and JPEG 2000 carry no IJG table and are not judged.
5. The pixel gate on the pooled backbone embedding that both heads read (``card.scope``, written by
   ``bonexray calibrate-scope``): an in-scope head (multinomial logistic regression: in scope against
   the outlier kinds it was fitted with) refuses when p(in scope) is below its threshold, with the
   most probable outlier kind as the reason; and the feature distance (Mahalanobis distance in the
   top-k principal components of the training embeddings plus the residual off them) refuses above
   its threshold: ``"not a radiograph"`` above ``far_threshold`` (:data:`FAR_FACTOR` x threshold, a
   fixed rule), else ``"body part not among the model's classes"``. Both thresholds are quantiles of
   held-out in-scope images' scores (images neither was fitted on).

Models without ``card.scope`` (older checkpoints) and ONNX files without the ``embedding`` output
get checks 1-4 only; a card without ``scope["head"]`` gets the feature distance only.
``bench/scope.py`` measures the refusal rate at the operating point for each kind of image.
"""
from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.body_parts import REGION_TAGS, DicomRegion, dicom_region, region_outside_classes
from ..data.imageio import LOSSY_JPEG_SYNTAXES, dicom_jpeg_quality, jpeg_quality

NOT_RADIOGRAPH = "not a radiograph"
UNKNOWN_PART = "body part not among the model's classes"
BLANK = "blank or nearly constant image"
TRUNCATED = "too little of the image decoded"
TOO_SMALL = "image too small or too narrow to read"
MULTI_FRAME = "multi-frame DICOM, not a single radiograph"
INVERTED = "image looks inverted (a negative)"
COMPRESSED = "image too heavily JPEG-compressed"
ROTATED = "image looks rotated or upside down"
# New reasons go at the end: a card's head names its classes by these strings.
SCOPE_REASONS = (NOT_RADIOGRAPH, UNKNOWN_PART, BLANK, TRUNCATED, TOO_SMALL, MULTI_FRAME, INVERTED, COMPRESSED, ROTATED)

BLANK_STD = 3.0
BLANK_SHARE = 0.98
MIN_DECODED_SHARE = 0.5
COLOUR_LIMIT = 12.0
#: JPEG files and 8-bit lossy-JPEG DICOM saved below this IJG quality are refused. A stated limit, not
#: tuned: 50 is the IJG reference table itself; FracAtlas's images are 89-99, clinical exports usually 75+.
MIN_JPEG_QUALITY = 50
#: Share of a colourful thumbnail's pixels that must be coloured (chroma above :data:`CHROMA_MIN`).
COLOUR_SHARE = 0.05
CHROMA_MIN = 40
FAR_FACTOR = 3.0
#: The model reads a square tile; an image with a shorter side below this, or sides further apart
#: than MAX_ASPECT : 1, holds too little to read at that size.
MIN_SIDE = 64
MAX_ASPECT = 4.0
#: DICOM modalities that are assessed: projection radiographs.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})
#: Fluoroscopy and angiography: projection images, assessed as single frames only.
SINGLE_FRAME_MODALITIES = frozenset({"RF", "XA"})
#: Other captures and files without a Modality: assessed only when the pixels pass every check.
PIXELS_DECIDE_MODALITIES = frozenset({"OT", "SC", ""})
#: Projection radiographs of regions no model here knows (breast, dental): refused as such.
OTHER_REGION_MODALITIES = frozenset({"MG", "PX", "IO"})
#: Half-width of the borderline band when the model card states none (not tuned on any data).
DEFAULT_BAND = 0.1


# --------------------------------------------------------------------------- evidence from the file


@dataclass(frozen=True)
class SourceEvidence:
    """What the file says besides its gray pixels. ``colourfulness`` (None: a gray source) and
    ``colour_share`` of its thumbnail; for DICOM: ``modality`` (None: not DICOM or unreadable tags, ""
    when the tag is empty), ``n_frames`` and the body-region terms of its tags (core/body_parts.py)."""

    colourfulness: float | None = None
    modality: str | None = None
    colour_share: float | None = None
    n_frames: int = 1
    region: DicomRegion | None = None
    #: Estimated IJG quality of a JPEG file or an 8-bit lossy-JPEG DICOM (data/imageio.py :func:`jpeg_quality`);
    #: None: not lossy JPEG.
    jpeg_quality: int | None = None

    @property
    def is_colour(self) -> bool:
        return (self.colourfulness is not None and self.colourfulness > COLOUR_LIMIT
                and (self.colour_share is None or self.colour_share > COLOUR_SHARE))


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness of an (H, W, 3) uint8 image: 0 for gray, ~15+ for photos."""
    x = rgb.astype(np.float64)
    rg = x[..., 0] - x[..., 1]
    yb = 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def coloured_share(rgb: np.ndarray) -> float:
    """Share of pixels whose chroma (largest minus smallest channel) is above :data:`CHROMA_MIN`."""
    x = np.asarray(rgb)[..., :3].astype(np.int16)
    return float(((x.max(-1) - x.min(-1)) > CHROMA_MIN).mean()) if x.size else 0.0


_GRAY_MODES = {"1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_DICOM_TAGS = ["Modality", "NumberOfFrames", "PhotometricInterpretation", "SamplesPerPixel", "ViewPosition",
               *REGION_TAGS]


def source_evidence(source: Any) -> SourceEvidence:
    """Colour / DICOM evidence of a file path, its bytes or a PIL image; a file it cannot read says nothing.

    The file's warnings (pydicom's, Pillow's) are not repeated here: the decoder gives them, naming the file.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _source_evidence(source)


def _source_evidence(source: Any) -> SourceEvidence:
    if hasattr(source, "mode") and hasattr(source, "convert"):  # PIL image
        return _pil_evidence(source)
    data = source
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError:
            return SourceEvidence()
    if not isinstance(data, (bytes, bytearray)):
        return SourceEvidence()
    if len(data) > 132 and data[128:132] == b"DICM":
        return _dicom_evidence(bytes(data))
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return _pil_evidence(im)
    except Exception:  # noqa: BLE001
        return SourceEvidence()


def _pil_evidence(im) -> SourceEvidence:
    quality = jpeg_quality(im)  # from the header, before _pil_colour drafts the decoder down
    colour, share = _pil_colour(im)
    return SourceEvidence(colourfulness=colour, colour_share=share, jpeg_quality=quality)


def compression_reason(evidence: SourceEvidence | None) -> str | None:
    """:data:`COMPRESSED` for lossy JPEG data saved below :data:`MIN_JPEG_QUALITY`."""
    q = None if evidence is None else evidence.jpeg_quality
    return COMPRESSED if q is not None and q < MIN_JPEG_QUALITY else None


def _dicom_evidence(data: bytes) -> SourceEvidence:
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=_DICOM_TAGS)
        if str(ds.file_meta.get("TransferSyntaxUID", "")) in LOSSY_JPEG_SYNTAXES:
            ds = pydicom.dcmread(io.BytesIO(data))  # lossy JPEG: its quality is in the pixel data's tables
    except Exception:  # noqa: BLE001 - the decoder reports unreadable files; this only adds evidence
        return SourceEvidence()
    return dataset_evidence(ds, data)


def dataset_evidence(ds, data: bytes | None = None) -> SourceEvidence:
    """Evidence of a pydicom Dataset already in memory (PACS): Modality, frames, body-part tags and, for a
    colour photometric interpretation, its colourfulness (from ``data``, the file's bytes, or ``ds``)."""
    try:
        modality = str(ds.get("Modality", "") or "").strip().upper()
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            frames = 1
        region = dicom_region(ds)
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    except Exception:  # noqa: BLE001 - the decoder reports unreadable files; this only adds evidence
        return SourceEvidence()
    colour = share = None
    if photometric and not photometric.startswith("MONOCHROME"):
        colour, share = _dicom_colour(data if data is not None else ds)
    return SourceEvidence(colourfulness=colour, modality=modality, colour_share=share, n_frames=frames, region=region,
                          jpeg_quality=dicom_jpeg_quality(ds))


def _dicom_colour(data) -> tuple[float | None, float | None]:
    """Colourfulness of a colour DICOM's first frame, judged like a colour file's (a thumbnail)."""
    try:
        import pydicom
        from PIL import Image

        ds = pydicom.dcmread(io.BytesIO(data)) if isinstance(data, (bytes, bytearray)) else data
        try:
            from pydicom.pixels import apply_color_lut, pixel_array

            arr = pixel_array(ds, index=0)
        except ImportError:  # pydicom 2.x
            from pydicom.pixel_data_handlers.util import apply_color_lut

            arr = ds.pixel_array
            arr = arr[0] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else arr
        if str(ds.PhotometricInterpretation).strip().upper() == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        if arr.ndim != 3 or arr.shape[-1] < 3:
            return None, None
        arr = arr[..., :3]
        if arr.dtype != np.uint8:
            arr = np.clip(arr.astype(np.float64) * (255.0 / max(float(arr.max()), 1.0)), 0, 255).astype(np.uint8)
        small = Image.fromarray(np.ascontiguousarray(arr), "RGB")
        small.thumbnail((128, 128))
        rgb = np.asarray(small)
        return colourfulness(rgb), coloured_share(rgb)
    except Exception:  # noqa: BLE001 - a colour DICOM this cannot decode: the decoder reports it
        return None, None


def _pil_colour(im) -> tuple[float | None, float | None]:
    if im.mode in _GRAY_MODES:
        return None, None
    try:
        if im.format == "JPEG":
            im.draft("RGB", (128, 128))  # decode at 1/8 scale: colour needs no detail
        small = im.convert("RGB")
        small.thumbnail((128, 128))
        rgb = np.asarray(small)
        return colourfulness(rgb), coloured_share(rgb)
    except Exception:  # noqa: BLE001 - a truncated colour file: the gray decode path decides
        return None, None


def dicom_kind_reason(evidence: SourceEvidence | None) -> str | None:
    """Check 4's DICOM allow list: None when the file is not DICOM or its kind may be assessed."""
    if evidence is None or evidence.modality is None:
        return None
    m = evidence.modality
    if m in RADIOGRAPH_MODALITIES or m in PIXELS_DECIDE_MODALITIES:
        return None
    if m in SINGLE_FRAME_MODALITIES:
        return MULTI_FRAME if evidence.n_frames > 1 else None
    if m in OTHER_REGION_MODALITIES:
        return UNKNOWN_PART
    return NOT_RADIOGRAPH


def region_reason(evidence: SourceEvidence | None, classes: Sequence[str]) -> str | None:
    """The body-part tags name only regions outside the model's ``classes``: :data:`UNKNOWN_PART`."""
    if evidence is None or not region_outside_classes(evidence.region, classes):
        return None
    return UNKNOWN_PART


# --------------------------------------------------------------------------- image statistics


def _as_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    from ..data.imageio import to_uint8

    return to_uint8(pixels)


def decoded_share(pixels: np.ndarray) -> float:
    """Share of rows above the flat run at the bottom (what a decoder fills in for a truncated file)."""
    g = _as_uint8(pixels)
    if g.ndim != 2 or g.shape[0] < 2:
        return 1.0
    last = g[-1].astype(np.int16)
    flat_value = int(np.median(last))
    flat = (np.abs(g.astype(np.int16) - flat_value) <= 1).mean(axis=1) >= 0.99
    n = 0
    for f in flat[::-1]:
        if not f:
            break
        n += 1
    return 1.0 - n / g.shape[0]


def statistics_reason(pixels: np.ndarray, truncated: bool, evidence: SourceEvidence | None = None) -> str | None:
    """Checks 1-4 of the module doc on the decoded (full-resolution) gray pixels and the file's evidence,
    except the body-part tags (they need the model's classes: :func:`region_reason`); None: nothing found."""
    raw = np.asarray(pixels)
    g = _as_uint8(raw)
    step = max(1, int(np.ceil(max(g.shape) / 512)))  # a subsample is plenty for these statistics
    sub = g[::step, ::step]
    if truncated and decoded_share(g) < MIN_DECODED_SHARE:
        return TRUNCATED
    if g.ndim == 2 and (min(g.shape) < MIN_SIDE or max(g.shape) > MAX_ASPECT * min(g.shape)):
        return TOO_SMALL
    if sub.size == 0 or float(sub.std()) < BLANK_STD:
        return BLANK
    if raw.dtype != np.uint8 and raw.dtype.kind in "ui":
        # 16-bit sources are min-max stretched to 8 bits, which would blow a few levels of noise up to
        # full contrast: judge their spread in the file's own levels.
        lo, hi = np.percentile(raw[::step, ::step], [0.5, 99.5])
        if hi - lo <= 4:
            return BLANK
    hist = np.bincount(sub.reshape(-1), minlength=256)
    near_mode = np.convolve(hist, np.ones(5, int), mode="same").max()  # within +-2 grey levels of one value
    if near_mode / sub.size >= BLANK_SHARE:
        return BLANK
    if evidence is not None:
        kind = dicom_kind_reason(evidence)
        if kind is not None:
            return kind
        if evidence.is_colour:
            return NOT_RADIOGRAPH
        return compression_reason(evidence)
    return None


# --------------------------------------------------------------------------- feature space


def _pack(a: np.ndarray, dtype) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode("ascii")


def _unpack(s: str, dtype, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype).astype(np.float64).reshape(shape)


@dataclass
class FeatureScope:
    """PCA of the training embeddings + the score threshold (see the module doc)."""

    mean: np.ndarray  # (C,)
    components: np.ndarray  # (k, C), orthonormal rows
    variances: np.ndarray  # (k,)
    residual_mean: float
    threshold: float
    far_threshold: float
    info: dict[str, Any]

    def scores(self, embedding: np.ndarray) -> np.ndarray:
        e = np.asarray(embedding, np.float64) - self.mean
        z = e @ self.components.T
        resid = (e * e).sum(1) - (z * z).sum(1)
        maha = (z * z / self.variances).sum(1) / len(self.variances)
        return 0.5 * (maha + np.maximum(resid, 0.0) / self.residual_mean)

    def to_card(self) -> dict[str, Any]:
        k, c = self.components.shape
        return {"method": "pca-mahalanobis+residual", "k": k, "dim": c, "mean": _pack(self.mean, "<f4"),
                "components": _pack(self.components, "<f2"), "variances": [float(v) for v in self.variances],
                "residual_mean": float(self.residual_mean), "threshold": float(self.threshold),
                "far_threshold": float(self.far_threshold), **self.info}

    @classmethod
    def from_card(cls, d: dict[str, Any] | None) -> FeatureScope | None:
        if not d:
            return None
        k, c = int(d["k"]), int(d["dim"])
        known = {"method", "k", "dim", "mean", "components", "variances", "residual_mean", "threshold", "far_threshold"}
        return cls(_unpack(d["mean"], "<f4", (c,)), _unpack(d["components"], "<f2", (k, c)),
                   np.asarray(d["variances"], np.float64), float(d["residual_mean"]), float(d["threshold"]),
                   float(d["far_threshold"]), {key: v for key, v in d.items() if key not in known})


def fit_feature_scope(train_emb: np.ndarray, held_out_emb: np.ndarray, k: int = 32, quantile: float = 0.995,
                      info: dict[str, Any] | None = None) -> FeatureScope:
    """PCA on ``train_emb``; threshold = ``quantile`` of ``held_out_emb``'s scores (never test images)."""
    x = np.asarray(train_emb, np.float64)
    mean = x.mean(0)
    xc = x - mean
    k = int(min(k, xc.shape[0] - 1, xc.shape[1]))
    if k < 1:
        raise ValueError("need at least two training embeddings to fit the scope statistics")
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    comps = vt[:k].astype(np.float16).astype(np.float64)  # what the card stores
    var = np.maximum((s[:k] ** 2) / max(1, xc.shape[0] - 1), 1e-12)
    z = xc @ comps.T
    resid = np.maximum((xc * xc).sum(1) - (z * z).sum(1), 0.0)
    fs = FeatureScope(mean.astype(np.float32).astype(np.float64), comps, var, float(max(resid.mean(), 1e-12)),
                      np.inf, np.inf, {})
    held = fs.scores(held_out_emb)
    fs.threshold = float(np.quantile(held, quantile, method="higher"))  # refuses at most 1 - quantile of them
    fs.far_threshold = FAR_FACTOR * fs.threshold
    fs.info = {"quantile": quantile, "n_fit": int(len(x)), "n_threshold": int(len(held)),
               "held_out_refused": float((held > fs.threshold).mean()),
               "far_rule": f"far_threshold = {FAR_FACTOR:g} x threshold (fixed, not fitted)", **(info or {})}
    return fs


IN_SCOPE = "in scope"


@dataclass
class ScopeHead:
    """Check 5's in-scope head: multinomial logistic regression on the standardised embedding.

    ``classes[0]`` is :data:`IN_SCOPE`; the others are scope reasons (the outlier kinds it was fitted
    with). An image is refused when p(in scope) is below ``threshold``; the reason is its most probable
    other class."""

    mean: np.ndarray  # (C,)
    scale: np.ndarray  # (C,)
    coef: np.ndarray  # (K, C)
    intercept: np.ndarray  # (K,)
    classes: list[str]
    threshold: float
    info: dict[str, Any]

    def probabilities(self, embedding: np.ndarray) -> np.ndarray:
        z = (np.asarray(embedding, np.float64) - self.mean) / self.scale
        logits = z @ self.coef.T + self.intercept
        logits -= logits.max(1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(1, keepdims=True)

    def p_in_scope(self, embedding: np.ndarray) -> np.ndarray:
        return self.probabilities(embedding)[:, 0]

    def reasons(self, embedding: np.ndarray) -> list[str | None]:
        probs = self.probabilities(embedding)
        out: list[str | None] = []
        for row in probs:
            if row[0] >= self.threshold:  # NaN compares False: refused
                out.append(None)
            else:
                out.append(self.classes[1 + int(np.nanargmax(row[1:]))] if np.isfinite(row[1:]).any()
                           else NOT_RADIOGRAPH)
        return out

    def to_card(self) -> dict[str, Any]:
        k, c = self.coef.shape
        return {"method": "multinomial logistic regression on the standardised embedding", "dim": c,
                "classes": list(self.classes), "mean": _pack(self.mean, "<f4"), "scale": _pack(self.scale, "<f4"),
                "coef": _pack(self.coef, "<f4"), "intercept": [float(v) for v in self.intercept],
                "threshold": float(self.threshold), **self.info}

    @classmethod
    def from_card(cls, d: dict[str, Any] | None) -> ScopeHead | None:
        if not d:
            return None
        c, classes = int(d["dim"]), [str(x) for x in d["classes"]]
        k = len(classes)
        if k < 2 or classes[0] != IN_SCOPE or any(x not in SCOPE_REASONS for x in classes[1:]):
            raise ValueError(f"scope head classes {classes} must be {IN_SCOPE!r} then scope reasons")
        known = {"method", "dim", "classes", "mean", "scale", "coef", "intercept", "threshold"}
        return cls(_unpack(d["mean"], "<f4", (c,)), _unpack(d["scale"], "<f4", (c,)), _unpack(d["coef"], "<f4", (k, c)),
                   np.asarray(d["intercept"], np.float64).reshape(k), classes, float(d["threshold"]),
                   {key: v for key, v in d.items() if key not in known})


def fit_scope_head(in_scope: np.ndarray, outliers: dict[str, np.ndarray], held_out: np.ndarray,
                   quantile: float = 0.99, c: float = 0.1, info: dict[str, Any] | None = None) -> ScopeHead:
    """Fit the head on in-scope embeddings against ``outliers`` (scope reason -> embeddings; outlier
    exposure); its threshold refuses at most ``1 - quantile`` of ``held_out`` in-scope embeddings (images
    the head was not fitted on). Classes are weighted to balance; ``c`` is the inverse L2 strength."""
    from sklearn.linear_model import LogisticRegression

    kinds = [k for k, v in outliers.items() if len(v)]
    if not kinds:
        raise ValueError("the scope head needs outlier examples of at least one kind")
    bad = [k for k in kinds if k not in SCOPE_REASONS]
    if bad:
        raise ValueError(f"outlier kinds {bad} are not scope reasons")
    x = np.concatenate([np.asarray(in_scope, np.float64)] + [np.asarray(outliers[k], np.float64) for k in kinds])
    y = np.concatenate([np.zeros(len(in_scope), int)] + [np.full(len(outliers[k]), i + 1) for i, k in enumerate(kinds)])
    mean, scale = x.mean(0), x.std(0) + 1e-6
    mean, scale = mean.astype(np.float32).astype(np.float64), scale.astype(np.float32).astype(np.float64)
    lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
    lr.fit((x - mean) / scale, y)
    coef, intercept = lr.coef_, lr.intercept_
    if coef.shape[0] == 1:  # two classes: sklearn gives one row; as softmax, [0, w] against [in, out]
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.r_[0.0, intercept]
    head = ScopeHead(mean, scale, coef.astype(np.float32).astype(np.float64), np.asarray(intercept, np.float64),
                     [IN_SCOPE, *kinds], 0.0, {})
    held = head.p_in_scope(held_out)
    head.threshold = float(np.quantile(held, 1.0 - quantile, method="lower"))  # refuses at most 1 - quantile
    head.info = {"quantile": quantile, "C": c, "n_fit_in_scope": int(len(in_scope)),
                 "n_fit_outliers": {k: int(len(outliers[k])) for k in kinds}, "n_threshold": int(len(held)),
                 "held_out_refused": float((held < head.threshold).mean()), **(info or {})}
    return head


# --------------------------------------------------------------------------- the gate


class ScopeGate:
    """Per-image scope decisions for one model (``enabled=False``: ``--no-scope-check``, nothing decided)."""

    def __init__(self, card, enabled: bool = True) -> None:
        self.enabled = enabled
        self.classes = list(getattr(card, "body_parts", None) or [])
        stats = getattr(card, "scope", None) if enabled else None
        try:
            self.features = FeatureScope.from_card(stats)
            self.head = ScopeHead.from_card(stats.get("head")) if isinstance(stats, dict) else None
        except (KeyError, TypeError, ValueError) as err:
            from ..errors import CheckpointError

            raise CheckpointError(f"model card scope statistics are malformed ({type(err).__name__}: {err})") from None

    def describe(self) -> str:
        if not self.enabled:
            return "off (--no-scope-check): every image gets a verdict"
        feat = (f"feature distance (threshold {self.features.threshold:.3g}, "
                f"{self.features.info.get('quantile', '?')} quantile of held-out valid images)"
                if self.features is not None else "no feature statistics in this model card")
        if self.head is not None:
            feat = (f"in-scope head (refuses p(in scope) < {self.head.threshold:.3g}, "
                    f"{self.head.info.get('quantile', '?')} of held-out images pass) and " + feat)
        return ("image statistics (truncated, size, blank), DICOM kind and body-part tags, colour, and " + feat)

    def reasons(self, pixels: Sequence[np.ndarray | None], truncated: Sequence[bool],
                evidence: Sequence[SourceEvidence | None], embedding: np.ndarray | None) -> list[str | None]:
        """One entry per image: None (in scope) or the reason. ``pixels``: the decoded full-resolution
        gray image (None: the statistics checks are skipped for that image)."""
        return self.embedding_reasons(self.file_reasons(pixels, truncated, evidence), embedding)

    def file_reasons(self, pixels: Sequence[np.ndarray | None], truncated: Sequence[bool],
                     evidence: Sequence[SourceEvidence | None]) -> list[str | None]:
        """Checks 1-4 and the body-part tags: what the file and its pixels say, before the model runs
        (a process that reads the image can decide these and drop the pixels)."""
        if not self.enabled:
            return [None] * len(truncated)
        out = [statistics_reason(p, t, e) if p is not None else dicom_kind_reason(e) or compression_reason(e)
               for p, t, e in zip(pixels, truncated, evidence)]
        return [r if r is not None else region_reason(e, self.classes) for r, e in zip(out, evidence)]

    def embedding_reasons(self, prior: Sequence[str | None], embedding: np.ndarray | None) -> list[str | None]:
        """Check 5 for the images that ``prior`` (:meth:`file_reasons`, one per row of ``embedding``) leaves in scope."""
        out = list(prior)
        if not self.enabled or embedding is None:
            return out
        if self.head is not None:
            for i, r in enumerate(self.head.reasons(embedding)):
                if out[i] is None:
                    out[i] = r
        if self.features is not None:
            scores = self.features.scores(embedding)
            for i, s in enumerate(scores):
                if out[i] is None and not s <= self.features.threshold:  # NaN counts as out
                    out[i] = NOT_RADIOGRAPH if s > self.features.far_threshold else UNKNOWN_PART
        return out


def borderline_band(card) -> tuple[float, str]:
    """(half-width, how it was set) of the band around the threshold where a verdict is "borderline"."""
    band = getattr(card, "borderline_band", None)
    if band is None:
        return DEFAULT_BAND, f"default {DEFAULT_BAND} (not tuned on data; the model card states no band)"
    return float(band), str(getattr(card, "borderline_source", None) or "stated in the model card")


def choose_band(valid_probs: np.ndarray, threshold: float, share: float = 0.2) -> float:
    """The band half-width that holds the ``share`` of held-out valid images closest to the threshold."""
    d = np.abs(np.asarray(valid_probs, np.float64) - threshold)
    return float(np.quantile(d, share)) if len(d) else DEFAULT_BAND
