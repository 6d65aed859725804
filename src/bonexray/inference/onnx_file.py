"""An ONNX file read and verified once: its bytes, its metadata and its model card, passed on to the engine.

:func:`read_onnx` reads the file once and checks the graph SHA-256 that ``bonexray export`` records
(:func:`onnx_graph_sha256`). The check walks the file's top-level protobuf
fields (the graph's bytes and the metadata entries) without the ``onnx`` library: a file that
protobuf wrote stores the graph exactly as the canonical serialisation that the hash covers. A file
whose bytes do not give the recorded hash that way (another tool re-ordered its fields, or it is
damaged), or that records no hash, goes through the ``onnx`` library's check, which decides.
The engine then opens the same bytes (:attr:`OnnxFile.data`), and the card is built once
(:attr:`OnnxFile.card`).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..core.card import ModelCard
from ..errors import BonexrayError, BonexrayWarning, CheckpointError
from .onnx_format import ONNX_CARD_KEY, ONNX_HASH_KEY

#: ModelProto field numbers (onnx.proto): the graph and the metadata entries (StringStringEntryProto).
_GRAPH_FIELD, _METADATA_FIELD = 7, 14


@dataclass(frozen=True)
class OnnxFile:
    """A verified ONNX file: ``data`` (its bytes, for the engine), ``metadata`` (its ``metadata_props``)."""

    path: Path
    data: bytes = field(repr=False)
    metadata: dict[str, str]

    @property
    def card(self) -> ModelCard:
        """The bonexray model card in the metadata (built on first use, then kept)."""
        cached = self.__dict__.get("_card")
        if cached is None:
            cached = _card_of(self.path, self.metadata)
            object.__setattr__(self, "_card", cached)
        return cached


def read_onnx(path: Path, require_hash: bool = False) -> OnnxFile:
    """Read and verify ``path`` once (see the module doc); damaged or changed files raise CheckpointError."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the ONNX model ({err.strerror or err})") from err
    try:
        fields = _fields(data)
        meta = dict(_entry(e) for e in fields.get(_METADATA_FIELD, ()))
    except ValueError:  # malformed protobuf or text: the onnx library's check reports it
        fields, meta = {}, {}
    recorded = meta.get(ONNX_HASH_KEY)
    if recorded is not None and len(fields.get(_GRAPH_FIELD, ())) == 1 \
            and _graph_sha256(fields[_GRAPH_FIELD][0], meta) == recorded:
        return OnnxFile(path, data, meta)
    return OnnxFile(path, data, verify_onnx_integrity(path, require_hash=require_hash, data=data))


def _graph_sha256(graph: bytes, meta: dict[str, str]) -> str:
    h = hashlib.sha256(graph)
    h.update(meta.get(ONNX_CARD_KEY, "").encode())
    return h.hexdigest()


def _card_of(path: Path, meta: dict[str, str]) -> ModelCard:
    if ONNX_CARD_KEY not in meta:
        raise CheckpointError(f"{path}: ONNX file has no bonexray model card (not made by `bonexray export`?)")
    try:
        return ModelCard.from_dict(json.loads(meta[ONNX_CARD_KEY]))
    except ValueError as err:
        raise CheckpointError(f"{path}: malformed model card in ONNX metadata: {err}") from err
    except BonexrayError as err:
        raise CheckpointError(f"{path}: {err}") from err


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return value, i


def _fields(data: bytes) -> dict[int, list[bytes]]:
    """The length-delimited fields of one protobuf message by number (others skipped); ValueError if malformed."""
    out: dict[int, list[bytes]] = {}
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(data, i)
            if i + n > len(data):
                raise ValueError("truncated field")
            out.setdefault(number, []).append(data[i:i + n])
            i += n
        else:
            raise ValueError(f"wire type {wire}")
    if i != len(data):
        raise ValueError("truncated field")
    return out


def _entry(raw: bytes) -> tuple[str, str]:
    f = _fields(raw)
    return f.get(1, [b""])[-1].decode("utf-8"), f.get(2, [b""])[-1].decode("utf-8")


def onnx_graph_sha256(model) -> str:
    """SHA-256 of an ONNX model's graph (nodes, weights, signature; deterministically serialised) and its
    model card, so a flipped byte in either is caught."""
    card = {p.key: p.value for p in model.metadata_props}.get(ONNX_CARD_KEY, "")
    h = hashlib.sha256(model.graph.SerializeToString(deterministic=True))
    h.update(card.encode())
    return h.hexdigest()


def verify_onnx_integrity(path: Path, require_hash: bool = False, data: bytes | None = None) -> dict[str, str]:
    """Refuse an ONNX file whose graph or model card does not match the SHA-256 recorded at export
    (``require_hash``: also one that records none, e.g. bonexray's own cached exports, which always do).
    Returns the file's metadata (``metadata_props``: the model card among them). ``data``: the file's
    bytes when the caller has read them (inference/onnx_file.py ``read_onnx``, which checks intact
    exports without the onnx library and calls this for the rest)."""
    import onnx

    try:
        model = (onnx.load(str(path), load_external_data=False) if data is None
                 else onnx.load_model_from_string(data))
    except Exception as err:  # noqa: BLE001 - protobuf DecodeError and friends
        first = " ".join(str(err).split())[:160] or type(err).__name__
        raise CheckpointError(f"{path}: corrupt ONNX model (cannot be parsed: {first})") from err
    meta = {p.key: p.value for p in model.metadata_props}
    recorded = meta.get(ONNX_HASH_KEY)
    if recorded is None:
        if require_hash:
            raise CheckpointError(f"{path}: corrupt ONNX model (no graph SHA-256 recorded)")
        if ONNX_CARD_KEY in meta:
            warnings.warn(f"{path}: no graph SHA-256 recorded (exported before bonexray recorded one); "
                          "loaded without an integrity check", BonexrayWarning, stacklevel=3)
        return meta
    if onnx_graph_sha256(model) != recorded:
        raise CheckpointError(f"{path}: corrupt ONNX model (weights do not match their recorded SHA-256)")
    return meta
