"""Model card and bonexray checkpoints.

A checkpoint is a torch file holding a dict with ``"bonexray"`` (the model card as plain
data) and ``"state_dict"`` (the LightningModule's state dict: the network under ``net.``,
other keys such as loss buffers are ignored). Loading always uses
``torch.load(weights_only=True)``: never arbitrary unpickling.

Integrity: the card records ``weights_sha256``, a SHA-256 over the network's tensors *and the rest of
the model card* (threshold, image size, class names: a changed card changes answers as surely as changed
weights), when the file is written (:func:`save_model`, and :func:`stamp_weights_sha256` from the
LightningModule's ``on_save_checkpoint``). Loading first checks every zip record's CRC (a flipped byte
anywhere in the file), then recomputes the hash (weights or card changed in a file that is still a valid
zip). Either failure refuses the file by name: a damaged model must never give answers. Files written
before the card was hashed (hash over the weights only) still load, with a warning line.

Every card, from a checkpoint or an ONNX file, is checked once, by :meth:`ModelCard.validate` (called on
construction): a card that would give wrong or no answers (threshold outside (0, 1], absurd image size,
duplicate or colliding class names) refuses the model with one line.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from bonexray.atomic import atomic_write
from bonexray.errors import BonexrayError, BonexrayWarning, CheckpointError
from bonexray.model.network import BoneXrayNet
from bonexray.model.registry import get_backbone_spec
from bonexray.model.weights import describe_key_mismatch

CARD_KEY = "bonexray"
STATE_KEY = "state_dict"
NET_PREFIX = "net."
WEIGHTS_HASH_KEY = "weights_sha256"
_ZIP_MAGIC = b"PK\x03\x04"
#: Image sizes a model card may ask for: below, no backbone has a feature map left; above, one image alone
#: takes gigabytes through the network (a card of 10000 px drove predict into the OOM killer).
IMAGE_SIZE_RANGE = (32, 2048)
#: Output fields of a prediction record: a class named so that ``prob_<name>`` is one of them would overwrite it.
RESERVED_PROB_NAMES = ("abnormal",)
#: A body-part name is shown in CSV headers, JSON keys, DICOM SR text and the web page.
MAX_NAME_CHARS = 64
_NAME_PUNCTUATION = set(" _-.()/+")


def _plain_name(name: str) -> bool:
    return len(name) <= MAX_NAME_CHARS and all(c.isalnum() or c in _NAME_PUNCTUATION for c in name)


@dataclass
class ModelCard:
    """What a consumer needs besides the weights: see docs/ARCHITECTURE.md."""

    backbone: str
    image_size: int
    in_chans: int = 1
    #: Backbone normalisation (applied inside the net). None -> the registry's default.
    mean: list[float] | None = None
    std: list[float] | None = None
    #: Class order of the body-part head.
    body_parts: list[str] = field(default_factory=list)
    #: Abnormality decision threshold on the sigmoid probability.
    threshold: float = 0.5
    version: str = __version__
    #: The training split: source, seed, fractions, --limit and a fingerprint of (image, split) pairs
    #: (data/splits.py split_fingerprint). None for models from before bonexray recorded it.
    split: dict | None = None
    #: SHA-256 of the network weights (:func:`weights_sha256`), written with the checkpoint.
    weights_sha256: str | None = None
    #: Box head settings (model/detection.py BoxSettings: threshold, nms_iou, max_detections, stride,
    #: threshold_source); None for models without a box head.
    boxes: dict | None = None
    #: Feature-space scope statistics (inference/scope.py FeatureScope.to_card: PCA of the training
    #: embeddings, threshold, how it was chosen); None: only the image-statistics checks run.
    scope: dict | None = None
    #: Half-width of the "borderline" band around ``threshold`` and how it was set; None: the stated default.
    borderline_band: float | None = None
    borderline_source: str | None = None
    #: Probability calibration fitted on held-out predictions (core/decision.py ``calibrated``):
    #: {"method": "temperature" or "temperature+bias", "temperature": T, "bias": b (optional, 0),
    #: "fitted_on": ...}; None: probabilities as the net gives them.
    calibration: dict | None = None
    #: The two operating points of the three-state finding (core/decision.py): {"suspicious": p_low,
    #: "definite": p_high, "source": ...} on the calibrated probability; None: threshold -/+ band.
    operating_points: dict | None = None

    def __post_init__(self) -> None:
        if self.mean is None or self.std is None:
            spec = get_backbone_spec(self.backbone)
            self.mean = list(spec.mean) if self.mean is None else self.mean
            self.std = list(spec.std) if self.std is None else self.std
        self.mean = [float(v) for v in self.mean]
        self.std = [float(v) for v in self.std]
        self.body_parts = [str(b) for b in self.body_parts]
        self.image_size = int(self.image_size)
        self.in_chans = int(self.in_chans)
        self.threshold = float(self.threshold)
        self.validate()

    def validate(self) -> None:
        """Refuse a card that would give wrong or no answers (:class:`CheckpointError`, one line, no path:
        callers prefix the model file). Every model bonexray loads goes through here."""
        if not math.isfinite(self.threshold) or not 0.0 < self.threshold <= 1.0:
            raise CheckpointError(f"model card threshold {self.threshold!r} is not a probability in (0, 1]")
        lo, hi = IMAGE_SIZE_RANGE
        if not lo <= self.image_size <= hi:
            raise CheckpointError(f"model card image_size {self.image_size} is outside {lo}..{hi} pixels")
        if not self.body_parts:
            raise CheckpointError("model card has no body_parts")
        blank = [b for b in self.body_parts if not isinstance(b, str) or not b.strip()]
        if blank:
            raise CheckpointError(f"model card has an empty body-part name in {self.body_parts}")
        odd = [b for b in self.body_parts if not _plain_name(b)]
        if odd:
            raise CheckpointError(f"model card body part {odd[0]!r} is not a plain name (it reaches CSV headers, JSON "
                                  f"keys and web pages): use at most {MAX_NAME_CHARS} letters, digits, spaces or "
                                  "_-.()/+, without control characters or markup")
        dupes = sorted({b for b in self.body_parts if self.body_parts.count(b) > 1})
        if dupes:
            raise CheckpointError(f"model card names body part(s) {', '.join(dupes)} twice; each class needs its "
                                  "own name")
        clash = [b for b in self.body_parts if b in RESERVED_PROB_NAMES]
        if clash:
            raise CheckpointError(f"model card body part {clash[0]!r} would overwrite the output field "
                                  f"prob_{clash[0]}; rename the class")
        band = self.borderline_band
        if band is not None and not (isinstance(band, (int, float)) and math.isfinite(band) and 0.0 <= band < 0.5):
            raise CheckpointError(f"model card borderline_band {band!r} is not a probability distance in [0, 0.5)")
        cal = self.calibration
        if cal is not None:
            t = cal.get("temperature") if isinstance(cal, Mapping) else None
            if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
                raise CheckpointError(f"model card calibration {cal!r} has no positive finite temperature")
            b = cal.get("bias", 0.0)
            if not (isinstance(b, (int, float)) and math.isfinite(b)):
                raise CheckpointError(f"model card calibration {cal!r} has a bias that is not a finite number")
        pts = self.operating_points
        if pts is not None:
            lo = pts.get("suspicious") if isinstance(pts, Mapping) else None
            hi = pts.get("definite") if isinstance(pts, Mapping) else None
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (lo, hi)) or not 0 <= lo <= hi <= 1:
                raise CheckpointError(f"model card operating_points {pts!r} are not two probabilities with "
                                      "suspicious <= definite")
        if self.scope is not None:
            need = ("k", "dim", "mean", "components", "variances", "residual_mean", "threshold", "far_threshold")
            lacking = [k for k in need if not isinstance(self.scope, Mapping) or k not in self.scope]
            if lacking:
                raise CheckpointError(f"model card scope statistics lack {', '.join(lacking)}")
            head = self.scope.get("head")
            if head is not None:
                need = ("dim", "classes", "mean", "scale", "coef", "intercept", "threshold")
                lacking = [k for k in need if not isinstance(head, Mapping) or k not in head]
                if lacking:
                    raise CheckpointError(f"model card scope head lacks {', '.join(lacking)}")
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean) or not all(
                math.isfinite(v) for v in self.mean + self.std) or not all(v > 0 for v in self.std):
            raise CheckpointError(f"model card mean/std {self.mean}/{self.std} are not a valid normalisation")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what goes under ``"bonexray"`` and into ONNX metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Inverse of :meth:`to_dict`; unknown keys (from newer versions) are ignored."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"model card must be a dict, got {type(data).__name__}")
        missing = [k for k in ("backbone", "image_size", "body_parts") if k not in data]
        if missing:
            raise CheckpointError(f"model card lacks {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"malformed model card: {err}") from err


def weights_sha256(net_state: Mapping[str, torch.Tensor], card: Mapping[str, Any] | None = None) -> str:
    """SHA-256 over the network's tensors (names, dtypes, shapes and bytes, in sorted name order) and, when
    given, the model card (canonical JSON, without the hash itself). Without ``card``: the weights-only
    hash of files written before the card was covered."""
    h = hashlib.sha256()
    for name in sorted(net_state):
        t = net_state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    if card is not None:
        h.update(b"card\n" + _card_bytes(card))
    return h.hexdigest()


def _card_bytes(card: Mapping[str, Any]) -> bytes:
    plain = {k: v for k, v in card.items() if k != WEIGHTS_HASH_KEY}
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), allow_nan=True, default=str).encode()


def _net_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k[len(NET_PREFIX):]: v for k, v in state.items() if k.startswith(NET_PREFIX)}


def stamp_weights_sha256(checkpoint: dict) -> None:
    """Record the SHA-256 of ``checkpoint["state_dict"]``'s network weights in its model card.

    Call it last, after anything else that edits the state dict (the hash must match what is written).
    """
    card = checkpoint[CARD_KEY]
    card[WEIGHTS_HASH_KEY] = weights_sha256(_net_state(checkpoint[STATE_KEY]), card)


def _check_archive(path: Path) -> None:
    """Refuse anything that is not an intact PyTorch zip archive, before torch parses it."""
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if not head:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    if head != _ZIP_MAGIC:
        kind = "a raw Python pickle, which bonexray never loads" if head[:1] == b"\x80" else "not a PyTorch zip archive"
        raise CheckpointError(f"{path}: not a bonexray checkpoint ({kind})")
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()  # reads every record and checks its CRC-32
    except Exception as err:  # noqa: BLE001 - zipfile raises BadZipFile, zlib.error, EOFError, ...
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint (its zip archive is damaged: {err})") from err
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint (record {bad} fails its CRC check; the file was damaged "
                              "after it was written)")


def _read_checkpoint(path: Path, map_location: Any) -> Mapping[str, Any]:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give the checkpoint file (.ckpt) or ONNX file (.onnx) in it")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    _check_archive(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own text ends in advice to pass weights_only=False, i.e. to run the code: not ours.
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused: the file holds Python objects{what} that could run code when loaded; a bonexray "
            "checkpoint holds only tensors and plain data"
        ) from err
    except Exception as err:  # noqa: BLE001 - any other failure: the file is damaged
        first = " ".join(str(err).split())[:160] or type(err).__name__
        raise CheckpointError(f"{path}: corrupt checkpoint (PyTorch cannot read it: {first})") from err
    if not isinstance(obj, Mapping) or CARD_KEY not in obj:
        raise CheckpointError(
            f"{path}: not a bonexray checkpoint (no '{CARD_KEY}' model card; a plain state_dict "
            "or another tool's file?)"
        )
    return obj


def read_card(path: str | os.PathLike) -> ModelCard:
    """The model card of a checkpoint, without building the network."""
    p = Path(path)
    try:
        return ModelCard.from_dict(_read_checkpoint(p, "cpu")[CARD_KEY])
    except CheckpointError:
        raise
    except BonexrayError as err:
        raise CheckpointError(f"{p}: {err}") from err


def verify_checkpoint_hash(path: Path, raw_card: Mapping[str, Any], net_state: Mapping[str, Any]) -> None:
    """Check the recorded SHA-256 against the weights and the card as stored (``raw_card``: the dict read from
    the file, before any defaults are filled in). Used by load_model and by ``train --resume``."""
    recorded = raw_card.get(WEIGHTS_HASH_KEY)
    if recorded is None:
        warnings.warn(f"{path}: no weights SHA-256 recorded (written before bonexray recorded one); "
                      "loaded without an integrity check", BonexrayWarning, stacklevel=3)
    elif weights_sha256(net_state, raw_card) == recorded:
        return
    elif weights_sha256(net_state) == recorded:
        warnings.warn(f"{path}: its SHA-256 covers the weights but not the model card (written before bonexray "
                      "hashed the card); the card is loaded unchecked", BonexrayWarning, stacklevel=3)
    else:
        raise CheckpointError(f"{path}: corrupt checkpoint (weights or model card do not match their recorded "
                              "SHA-256)")


def read_verified_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Mapping[str, Any]:
    """The whole checkpoint dict (for ``train --resume``) after every check :func:`load_model` makes on the
    file: zip CRCs, tensors and plain data only, a valid model card, weights and card matching their SHA-256."""
    p = Path(path)
    ckpt = _read_checkpoint(p, map_location)
    try:
        ModelCard.from_dict(ckpt[CARD_KEY])
    except BonexrayError as err:
        raise CheckpointError(f"{p}: {err}") from err
    state = ckpt.get(STATE_KEY)
    if not isinstance(state, Mapping) or not _net_state(state):
        raise CheckpointError(f"{p}: no network weights ('{STATE_KEY}' with '{NET_PREFIX}*' keys) in checkpoint")
    verify_checkpoint_hash(p, ckpt[CARD_KEY], _net_state(state))
    return ckpt


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[BoneXrayNet, ModelCard]:
    """Read a bonexray/Lightning checkpoint -> (BoneXrayNet in eval mode, ModelCard)."""
    p = Path(path)
    ckpt = _read_checkpoint(p, map_location)
    try:
        card = ModelCard.from_dict(ckpt[CARD_KEY])
    except BonexrayError as err:
        raise CheckpointError(f"{p}: {err}") from err
    if card.in_chans != 1:
        raise CheckpointError(f"{p}: in_chans={card.in_chans}; bonexray networks take 1 channel")
    state = ckpt.get(STATE_KEY)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{p}: no '{STATE_KEY}' in checkpoint")
    net_state = _net_state(state)
    if not net_state:
        raise CheckpointError(f"{p}: state_dict has no '{NET_PREFIX}*' keys (network weights)")
    verify_checkpoint_hash(p, ckpt[CARD_KEY], net_state)
    try:
        net = BoneXrayNet(
            card.backbone, num_body_parts=len(card.body_parts), pretrained=None,
            mean=card.mean, std=card.std, localization_head=any(k.startswith("localization_head.") for k in net_state),
            box_head=any(k.startswith("box_head.") for k in net_state),
            box_stride=int((card.boxes or {}).get("stride", 8)),
        )
    except BonexrayError as err:
        raise CheckpointError(f"{p}: cannot build the network of this checkpoint: {err}") from err
    own = net.state_dict()
    missing = [k for k in own if k not in net_state]
    unexpected = [k for k in net_state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{p}: weights do not match backbone '{card.backbone}' with "
            f"{len(card.body_parts)} body parts: {describe_key_mismatch(missing, unexpected)}"
        )
    try:
        net.load_state_dict(net_state, strict=True)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{p}: weights do not fit the network: {str(err)[:300]}") from err
    if isinstance(map_location, (str, torch.device)):
        net.to(map_location)  # buffers/heads created here live on CPU until moved
    return net.eval(), card


def save_model(path: str | os.PathLike, net: BoneXrayNet, card: ModelCard) -> Path:
    """Write ``net`` + ``card`` in the checkpoint format load_model reads, atomically."""
    if card.backbone != net.backbone_name and get_backbone_spec(card.backbone).name != net.backbone_name:
        raise ValueError(f"card backbone {card.backbone!r} != network backbone {net.backbone_name!r}")
    if len(card.body_parts) != net.num_body_parts:
        raise ValueError(
            f"card has {len(card.body_parts)} body parts, network head has {net.num_body_parts}"
        )
    if card.mean != net.mean or card.std != net.std:
        raise ValueError(f"card mean/std {card.mean}/{card.std} != network's {net.mean}/{net.std}")
    p = Path(path)
    ckpt = {
        CARD_KEY: card.to_dict(),
        STATE_KEY: {NET_PREFIX + k: v.detach().cpu() for k, v in net.state_dict().items()},
    }
    stamp_weights_sha256(ckpt)
    with atomic_write(p) as tmp:
        torch.save(ckpt, tmp)
    return p
