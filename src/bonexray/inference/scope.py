"""The scope gate: no verdict where the model cannot know, and the borderline band around the threshold.

An image is *out of scope* (``in_scope: false`` and a ``scope_reason``) when one of these holds, checked
cheapest first:

1. ``"too little of the image decoded"``: a truncated file whose undecoded rest (a flat run of rows
   at the bottom, which decoders fill with one value) is more than half the image.
2. ``"blank or nearly constant image"``: the decoded pixels' standard deviation is below
   :data:`BLANK_STD` (of 255), or :data:`BLANK_SHARE` of them lie within 2 grey levels of one value.
3. ``"not a radiograph"``: the file is in colour (Hasler-Suesstrunk colourfulness of a small RGB
   thumbnail above :data:`COLOUR_LIMIT`; radiographs stored as RGB have ~0), or a DICOM whose Modality
   is not a projection radiograph (CT, MR, US, ...).
4. The feature-space distance: the pooled backbone embedding that both heads read, compared with the
   training images' embeddings (``card.scope``, written by :func:`calibrate_scope`). Score = mean of
   (Mahalanobis distance^2 in the top-k principal components / k) and (squared residual off those
   components / its training mean); about 1 for training-like images. Above ``threshold`` (a stated
   quantile of held-out valid images' scores) the image is out of scope: ``"not a radiograph"`` when
   the score is above ``far_threshold`` (:data:`FAR_FACTOR` x threshold, a fixed rule, not fitted),
   else ``"body part not among the model's classes"`` (a radiograph-like image unlike the training data).

Models without ``card.scope`` (older checkpoints) and ONNX files without the ``embedding`` output
get checks 1-3 only. ``bench/scope.py`` measures the gate as detection AUROCs.
"""
from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NOT_RADIOGRAPH = "not a radiograph"
UNKNOWN_PART = "body part not among the model's classes"
BLANK = "blank or nearly constant image"
TRUNCATED = "too little of the image decoded"
SCOPE_REASONS = (NOT_RADIOGRAPH, UNKNOWN_PART, BLANK, TRUNCATED)

BLANK_STD = 3.0
BLANK_SHARE = 0.98
MIN_DECODED_SHARE = 0.5
COLOUR_LIMIT = 12.0
FAR_FACTOR = 3.0
#: DICOM modalities that are not projection radiographs.
NON_RADIOGRAPH_MODALITIES = {"CT", "MR", "US", "NM", "PT", "XA", "RF", "OP", "OPT", "SM", "ES", "IVUS", "OCT", "ECG",
                             "MG", "PX", "IO", "BI", "XC", "GM"}
#: Half-width of the borderline band when the model card states none (not tuned on any data).
DEFAULT_BAND = 0.1


# --------------------------------------------------------------------------- evidence from the file


@dataclass(frozen=True)
class SourceEvidence:
    """What the file says besides its gray pixels: colourfulness (None: a gray source) and DICOM Modality."""

    colourfulness: float | None = None
    modality: str | None = None


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness of an (H, W, 3) uint8 image: 0 for gray, ~15+ for photos."""
    x = rgb.astype(np.float64)
    rg = x[..., 0] - x[..., 1]
    yb = 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


_GRAY_MODES = {"1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


def source_evidence(source: Any) -> SourceEvidence:
    """Colour / modality evidence of a file path, its bytes or a PIL image; a file it cannot read says nothing.

    The file's warnings (pydicom's, Pillow's) are not repeated here: the decoder gives them, naming the file.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _source_evidence(source)


def _source_evidence(source: Any) -> SourceEvidence:
    if hasattr(source, "mode") and hasattr(source, "convert"):  # PIL image
        return SourceEvidence(_pil_colourfulness(source))
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
        try:
            import pydicom

            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["Modality"])
            return SourceEvidence(modality=str(ds.get("Modality", "")).strip().upper() or None)
        except Exception:  # noqa: BLE001 - the decoder reports unreadable files; this only adds evidence
            return SourceEvidence()
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return SourceEvidence(_pil_colourfulness(im))
    except Exception:  # noqa: BLE001
        return SourceEvidence()


def _pil_colourfulness(im) -> float | None:
    if im.mode in _GRAY_MODES:
        return None
    try:
        if im.format == "JPEG":
            im.draft("RGB", (128, 128))  # decode at 1/8 scale: colour needs no detail
        small = im.convert("RGB")
        small.thumbnail((128, 128))
        return colourfulness(np.asarray(small))
    except Exception:  # noqa: BLE001 - a truncated colour file: the gray decode path decides
        return None


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
    """Checks 1-3 of the module doc on the decoded (full-resolution) gray pixels; None: nothing found."""
    raw = np.asarray(pixels)
    g = _as_uint8(raw)
    step = max(1, int(np.ceil(max(g.shape) / 512)))  # a subsample is plenty for these statistics
    sub = g[::step, ::step]
    if truncated and decoded_share(g) < MIN_DECODED_SHARE:
        return TRUNCATED
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
        if evidence.colourfulness is not None and evidence.colourfulness > COLOUR_LIMIT:
            return NOT_RADIOGRAPH
        if evidence.modality in NON_RADIOGRAPH_MODALITIES:
            return NOT_RADIOGRAPH
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


# --------------------------------------------------------------------------- the gate


class ScopeGate:
    """Per-image scope decisions for one model (``enabled=False``: ``--no-scope-check``, nothing decided)."""

    def __init__(self, card, enabled: bool = True) -> None:
        self.enabled = enabled
        try:
            self.features = FeatureScope.from_card(getattr(card, "scope", None)) if enabled else None
        except (KeyError, TypeError, ValueError) as err:
            from ..errors import CheckpointError

            raise CheckpointError(f"model card scope statistics are malformed ({type(err).__name__}: {err})") from None

    def describe(self) -> str:
        if not self.enabled:
            return "off (--no-scope-check): every image gets a verdict"
        feat = (f"feature distance (threshold {self.features.threshold:.3g}, "
                f"{self.features.info.get('quantile', '?')} quantile of held-out valid images)"
                if self.features is not None else "no feature statistics in this model card")
        return f"image statistics (blank, truncated, colour, DICOM modality) and {feat}"

    def reasons(self, pixels: Sequence[np.ndarray | None], truncated: Sequence[bool],
                evidence: Sequence[SourceEvidence | None], embedding: np.ndarray | None) -> list[str | None]:
        """One entry per image: None (in scope) or the reason. ``pixels``: the decoded full-resolution
        gray image (None: the statistics checks are skipped for that image)."""
        if not self.enabled:
            return [None] * len(truncated)
        out = [statistics_reason(p, t, e) if p is not None else None for p, t, e in zip(pixels, truncated, evidence)]
        if self.features is not None and embedding is not None:
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
