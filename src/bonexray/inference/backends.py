"""Which engine runs a checkpoint: PyTorch, or its ONNX export in onnxruntime (faster on CPU).

``--backend auto`` (the default) runs a checkpoint on the CPU through onnxruntime: the export is
made once and cached beside the checkpoint as ``<name>.<digest>.onnx``, where the digest is the
SHA-256 of the checkpoint's bytes, so a retrained or edited checkpoint never reuses a stale graph.
Where that folder is not writable the export goes to the per-user cache
(``$BONEXRAY_CACHE/onnx``, default ``~/.cache/bonexray/onnx``), and where that fails too it is
made in a temporary folder, loaded into memory and deleted. On a GPU, ``auto`` keeps PyTorch.
``bench/inference.py`` measures the engines against plain eager PyTorch.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

from ..errors import BonexrayError

BACKENDS = ("auto", "torch", "onnx")
#: Part of the cache key: bump when the export itself changes (opset, graph), so old files are not reused.
EXPORT_FORMAT = "bonexray-onnx-3"  # 2: graph SHA-256 in the metadata; 3: embedding and box outputs
DIGEST_CHARS = 16


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings count once); onnxruntime's thread count."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in allowed:
        base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((base / "physical_package_id").read_text().strip(), (base / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def ort_session_options():
    """onnxruntime session options: one intra-op thread per physical core, quiet logs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: no provider chatter on stderr
    opts.intra_op_num_threads = physical_cores()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def choose_backend(backend: str, device: str) -> str:
    """``auto`` -> ``onnx`` on CPU when onnxruntime is installed, else ``torch``; explicit names pass."""
    if backend not in BACKENDS:
        raise BonexrayError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if str(device).startswith("cuda"):
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnx"


def checkpoint_digest(path: str | os.PathLike) -> str:
    """SHA-256 over the export format tag and the checkpoint's bytes (hex)."""
    h = hashlib.sha256(EXPORT_FORMAT.encode() + b"\0")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def user_onnx_cache() -> Path:
    base = os.environ.get("BONEXRAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bonexray")
    return Path(base) / "onnx"


def onnx_cache_locations(checkpoint: Path, digest: str) -> list[Path]:
    """Where the export of ``checkpoint`` may live, in order of preference."""
    short = digest[:DIGEST_CHARS]
    return [checkpoint.with_name(f"{checkpoint.name}.{short}.onnx"), user_onnx_cache() / f"{checkpoint.stem}.{short}.onnx"]


class ExportedModel:
    """The ONNX file of a checkpoint: ``path`` to open; ``temporary`` when it must be deleted after loading."""

    def __init__(self, path: Path, temporary: bool = False) -> None:
        self.path, self.temporary = path, temporary

    def discard(self) -> None:
        if self.temporary:
            self.path.unlink(missing_ok=True)
            try:
                self.path.parent.rmdir()
            except OSError:
                pass


def exported_onnx(checkpoint: str | os.PathLike) -> ExportedModel:
    """The cached ONNX export of ``checkpoint``, exporting it on first use (see the module doc)."""
    from .export import export_onnx

    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        from ..errors import CheckpointError

        if ckpt.is_dir():
            raise CheckpointError(f"{ckpt}: is a folder; give the checkpoint file (.ckpt) or ONNX file (.onnx) in it")
        raise CheckpointError(f"{ckpt}: checkpoint file not found")
    locations = onnx_cache_locations(ckpt, checkpoint_digest(ckpt))
    for path in locations:
        if path.is_file():
            if _intact_export(path):
                return ExportedModel(path)
            break  # rebuilt below, in the first place that takes it
    for path in locations:
        try:
            return ExportedModel(export_onnx(ckpt, path))
        except OSError:  # read-only folder, full disk: try the next place
            continue
    scratch = Path(tempfile.mkdtemp(prefix="bonexray-onnx-"))
    return ExportedModel(export_onnx(ckpt, scratch / "model.onnx"), temporary=True)


def _intact_export(path: Path) -> bool:
    """A cached export is bonexray's own file, not the user's: a damaged one (disk error, killed copy) is
    removed and rebuilt with a note, never reported as the user's corrupt model."""
    from ..errors import CheckpointError
    from .export import verify_onnx_integrity

    try:
        verify_onnx_integrity(path, require_hash=True)
        return True
    except CheckpointError as err:
        reason = str(err).removeprefix(f"{path}: ")
        warn(f"{path}: cached ONNX export is damaged ({reason}); rebuilding it")
        try:
            path.unlink()
        except OSError:
            pass
        return False


def warn(message: str) -> None:
    print(f"bonexray: {message}", file=sys.stderr, flush=True)
