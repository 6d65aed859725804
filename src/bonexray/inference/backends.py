"""Which engine runs a model: PyTorch, or its ONNX export in onnxruntime or OpenVINO (faster on CPU).

A checkpoint runs on an ONNX engine through its export, made once and cached beside the checkpoint
as ``<name>.<digest>.onnx``, where the digest covers the export format and the SHA-256 of the
checkpoint's bytes (the hash the backend record is matched with, computed once per load), so a
retrained or edited checkpoint never reuses a stale graph. Where that folder is not writable the
export goes to the per-user cache (``$BONEXRAY_CACHE/onnx``, default ``~/.cache/bonexray/onnx``), and
where that fails too it is made in a temporary folder, loaded into memory and deleted.

Engines: ``onnx`` (onnxruntime, float32), ``openvino`` (OpenVINO, float32) and ``openvino-bf16``
(OpenVINO computing in bfloat16; only on CPUs with AVX-512 BF16 or AMX). ``--backend auto`` (the
default) on CPU runs the fastest engine that the model's backend record
(``inference/backend_check.py``: ``<model>.backends.json``, written by ``bench/backends.py`` for that
exact file's SHA-256) accepts and this machine has; without a record it stays on onnxruntime float32.
On a GPU, ``auto`` keeps PyTorch. ``bench/inference.py`` measures the engines against eager PyTorch.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BonexrayError
from ..hardware import BF16_FLAGS, cpu_flags, cpu_has_bf16, cpu_model, physical_cores  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from ..model.hub import ModelFile
    from .onnx_file import OnnxFile

BACKENDS = ("auto", "torch", "onnx", "openvino", "openvino-bf16")
#: Engines that run an ONNX graph (a checkpoint's cached export, or the user's .onnx file).
ONNX_ENGINES = ("onnx", "openvino", "openvino-bf16")
#: The backend record's format tag (inference/backend_check.py writes it; :func:`accepted_backends` reads it).
RECORD_FORMAT = "bonexray-backends-1"
#: Part of the cache key: bump when the export itself changes (opset, graph), so old files are not reused.
EXPORT_FORMAT = "bonexray-onnx-3"  # 2: graph SHA-256 in the metadata; 3: embedding and box outputs
DIGEST_CHARS = 16


def ort_session_options(threads: int | None = None):
    """onnxruntime session options: ``threads`` intra-op threads (default one per physical core), quiet logs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: no provider chatter on stderr
    opts.intra_op_num_threads = threads or physical_cores()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def openvino_version() -> str | None:
    """OpenVINO's version, or None when it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


def backend_unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine, or None when it can."""
    if backend in ("openvino", "openvino-bf16") and openvino_version() is None:
        return "OpenVINO is not installed (pip install openvino)"
    if backend == "openvino-bf16" and not cpu_has_bf16():
        return f"this CPU ({cpu_model()}) has no native bfloat16 (none of the flags {', '.join(BF16_FLAGS)})"
    if backend == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed"
    return None


def choose_backend(backend: str, device: str, model: str | os.PathLike | None = None) -> str:
    """The engine that runs ``model``: explicit names pass (after checking this machine has them); ``auto``
    -> torch on a GPU; on CPU the fastest engine that ``model``'s backend record accepts and this machine
    has (:func:`bonexray.inference.backend_check.accepted_backends`), else ``onnx`` (else ``torch``)."""
    if backend not in BACKENDS:
        raise BonexrayError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        if backend.startswith("openvino") and str(device).startswith("cuda"):
            raise BonexrayError(f"--backend {backend} runs on the CPU; use --device cpu (or --backend torch on a GPU)")
        why = backend_unavailable(backend)
        if why is not None:
            raise BonexrayError(f"--backend {backend}: {why}")
        return backend
    if str(device).startswith("cuda"):
        return "torch"
    if model is not None:
        for name in accepted_backends(model):  # fastest first, as measured by the check
            if backend_unavailable(name) is None:
                return name
    return "onnx" if backend_unavailable("onnx") is None else "torch"


def backend_record_path(model: str | os.PathLike) -> Path:
    """Where the backend check's verdict for ``model`` lives: ``<model file>.backends.json`` beside it."""
    return Path(f"{model}.backends.json")


def read_backend_record(model: str | os.PathLike | ModelFile) -> dict | None:
    """The backend record of ``model`` when there is one *for these exact bytes* (its ``model_sha256`` is the
    file's SHA-256); None otherwise. A record that cannot be read is ignored with a note. A
    :class:`~bonexray.model.hub.ModelFile` gives its hash (computed at most once per load)."""
    from ..model.hub import ModelFile

    file = model if isinstance(model, ModelFile) else ModelFile(Path(model))
    path = backend_record_path(file.path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("format") != RECORD_FORMAT:
            raise ValueError(f"format {record.get('format')!r}, want {RECORD_FORMAT!r}")
    except (OSError, ValueError, AttributeError) as err:
        warn(f"{path}: unreadable backend record ({err}); ignored")
        return None
    return record if record.get("model_sha256") == file.sha256 else None


#: Another engine replaces the onnxruntime reference only when the check measured it at least this much
#: faster: a smaller gain is within what two runs of the same check differ by (bench/RESULTS.md, Backend
#: check), and the reference is the engine every other test of the project runs on.
MIN_SPEEDUP = 1.25


def ranked_engines(record: dict) -> list[str]:
    """The engines a backend record accepts, fastest first as its check measured them: the float32
    onnxruntime reference, and another engine only when :data:`MIN_SPEEDUP` x faster than it."""
    rows = record.get("backends") or {}
    speed = {name: float(r.get("img_s") or 0.0) for name, r in rows.items()}
    ok = [name for name, r in rows.items() if name in ONNX_ENGINES and r.get("accepted") is True
          and (name == "onnx" or speed[name] >= MIN_SPEEDUP * speed.get("onnx", 0.0))]
    return sorted(ok, key=lambda name: speed[name], reverse=True)


def accepted_backends(model: str | os.PathLike | ModelFile) -> list[str]:
    """:func:`ranked_engines` of ``model``'s backend record; [] without a record for this file."""
    record = read_backend_record(model)
    return [] if record is None else ranked_engines(record)


def checkpoint_digest(path: str | os.PathLike | ModelFile) -> str:
    """SHA-256 over the export format tag and the checkpoint's SHA-256 (hex)."""
    from ..model.hub import ModelFile

    file = path if isinstance(path, ModelFile) else ModelFile(Path(path))
    return hashlib.sha256(f"{EXPORT_FORMAT}\0{file.sha256}".encode()).hexdigest()


def user_onnx_cache() -> Path:
    base = os.environ.get("BONEXRAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bonexray")
    return Path(base) / "onnx"


def onnx_cache_locations(checkpoint: Path, digest: str) -> list[Path]:
    """Where the export of ``checkpoint`` may live, in order of preference."""
    short = digest[:DIGEST_CHARS]
    return [checkpoint.with_name(f"{checkpoint.name}.{short}.onnx"), user_onnx_cache() / f"{checkpoint.stem}.{short}.onnx"]


class ExportedModel:
    """The ONNX file of a checkpoint: ``path`` to open; ``temporary`` when it must be deleted after loading;
    ``verified``: the cached file as read and checked (inference/onnx_file.py), passed on to the engine."""

    def __init__(self, path: Path, temporary: bool = False, verified: OnnxFile | None = None) -> None:
        self.path, self.temporary, self.verified = path, temporary, verified

    def discard(self) -> None:
        if self.temporary:
            self.path.unlink(missing_ok=True)
            try:
                self.path.parent.rmdir()
            except OSError:
                pass


def exported_onnx(checkpoint: str | os.PathLike | ModelFile) -> ExportedModel:
    """The cached ONNX export of ``checkpoint``, exporting it on first use (see the module doc)."""
    from ..model.hub import ModelFile
    from .export import export_onnx

    file = checkpoint if isinstance(checkpoint, ModelFile) else ModelFile(Path(checkpoint))
    ckpt = file.path
    if not ckpt.is_file():
        from ..errors import CheckpointError

        if ckpt.is_dir():
            raise CheckpointError(f"{ckpt}: is a folder; give the checkpoint file (.ckpt) or ONNX file (.onnx) in it")
        raise CheckpointError(f"{ckpt}: checkpoint file not found")
    locations = onnx_cache_locations(ckpt, checkpoint_digest(file))
    for path in locations:
        if path.is_file():
            verified = _intact_export(path)
            if verified is not None:
                return ExportedModel(path, verified=verified)
            break  # rebuilt below, in the first place that takes it
    from ..errors import BonexrayError, CheckpointError

    for path in locations:
        try:
            return ExportedModel(export_onnx(ckpt, path))
        except OSError:  # read-only folder, full disk: try the next place
            continue
        except CheckpointError:
            raise
        except BonexrayError:  # the output guard refuses this place (a file where the folder should be)
            continue
    scratch = Path(tempfile.mkdtemp(prefix="bonexray-onnx-"))
    return ExportedModel(export_onnx(ckpt, scratch / "model.onnx"), temporary=True)


def _intact_export(path: Path) -> OnnxFile | None:
    """A cached export is bonexray's own file, not the user's: a damaged one (disk error, killed copy) is
    removed and rebuilt with a note, never reported as the user's corrupt model (None)."""
    from ..errors import CheckpointError
    from .onnx_file import read_onnx

    try:
        return read_onnx(path, require_hash=True)
    except CheckpointError as err:
        reason = str(err).removeprefix(f"{path}: ")
        warn(f"{path}: cached ONNX export is damaged ({reason}); rebuilding it")
        try:
            path.unlink()
        except OSError:
            pass
        return None


def warn(message: str) -> None:
    print(f"bonexray: {message}", file=sys.stderr, flush=True)
