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

The card type, :class:`~bonexray.core.card.ModelCard`, lives in the torch-free core (one type for
checkpoints, ONNX metadata and ``/api/model``); it is re-exported here.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bonexray.atomic import atomic_write
from bonexray.core.card import IMAGE_SIZE_RANGE, MAX_NAME_CHARS, RESERVED_PROB_NAMES, ModelCard  # noqa: F401 (re-exported)
from bonexray.errors import BonexrayError, BonexrayWarning, CheckpointError
from bonexray.model.network import BoneXrayNet
from bonexray.model.registry import get_backbone_spec
from bonexray.model.weights import describe_key_mismatch

CARD_KEY = "bonexray"
STATE_KEY = "state_dict"
NET_PREFIX = "net."
WEIGHTS_HASH_KEY = "weights_sha256"
_ZIP_MAGIC = b"PK\x03\x04"


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
