"""``bonexray predict``: abnormality + body part for images, folders, studies and DICOM files.

A MODEL is either a bonexray checkpoint (``load_model``) or an ONNX file written by
``bonexray export`` (run with onnxruntime; the model card comes from the ONNX metadata). Both
backends return *logits*; the probabilities are computed here, by the same numpy code for both,
so a checkpoint and its export give the same answers.

Every image goes through :func:`bonexray.data.preprocess.load_for_model`, the decode path the
training cache uses, so predict sees exactly what training saw.

Output (stdout), one record per image, in input order:

* JSON lines (default): ``{"type": "image", "path", "prob_abnormal", "abnormal", "body_part",
  "prob_<part>" for every class, "truncated"}`` (+ ``"study"`` when the image belongs to an
  aggregated study, + ``"cam"`` with ``--cam``).
* With ``--study``, or for a PATH that is a MURA-style study folder (``studyN[_positive|_negative]``), one more line per
  study after all image lines: ``{"type": "study", "study", "n_images", "prob_abnormal"
  (mean of its images), "abnormal", "body_part" (majority vote; ties: highest mean
  probability), "prob_<part>" (mean)}``. A study is an image's parent folder.
* CSV (``--format csv``): ONE table with a header, a ``type`` column (``image`` / ``study``) and
  the union of the fields above; study rows come after the image rows, empty cells where a field
  does not apply (``path`` for studies, ``n_images`` for images). Booleans are written 1/0.

Unreadable inputs (PATHs that do not exist, symlink loops, broken links, images that cannot be
decoded, images for which the model's output is not a finite number) give one line on stderr,
``bonexray predict: <path>: <reason>``; the others are still predicted and the exit status is 1.
Every file met in a folder is either predicted or named on stderr: files that are not images and
hidden files/folders as ``bonexray predict: <path>: skipped: <why>`` (these do not change the
exit status).
"""
from __future__ import annotations

import csv
import errno
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..data.imageio import is_image_file
from ..errors import BonexrayError, CheckpointError, ImageReadError

ONNX_CARD_KEY = "bonexray_model_card"
ONNX_INPUT = "image"
ONNX_OUTPUTS = ("abnormal_logit", "body_part_logits")
TTA_MODES = ("none", "flip")  # test-time augmentation: "flip" averages the image and its mirror
PROG = "bonexray predict"


# --------------------------------------------------------------------------- probabilities


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))  # never overflows
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def resolve_device(device: str | None) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; anything else is passed through."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise BonexrayError(f"--device {device}: CUDA is not available on this machine")
    return str(device)


def is_onnx_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".onnx"


# --------------------------------------------------------------------------- predictor


class Predictor:
    """A loaded model: a checkpoint (torch, or its cached ONNX export) or an ONNX file (onnxruntime).

    ``predict_arrays(uint8 (N, S, S))`` -> ``(prob_abnormal (N,), body_part_probs (N, K))`` with
    S = ``card.image_size``; the arrays are what :func:`load_for_model` returns. ``backend``
    (``auto``, ``torch``, ``onnx``; see :mod:`bonexray.inference.backends`) picks the engine for a
    checkpoint; ``self.backend`` says which one runs. ``net`` (the torch network, for CAMs) is
    loaded on first use when a checkpoint runs on onnxruntime.
    """

    def __init__(self, model: str | os.PathLike, device: str = "auto", tta: str = "none", backend: str = "auto") -> None:
        from .backends import BACKENDS, choose_backend, exported_onnx, warn

        if tta not in TTA_MODES:
            raise BonexrayError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA_MODES)}")
        if backend not in BACKENDS:
            raise BonexrayError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.tta = tta
        self.path = Path(model)
        self._net = None
        self.session = None
        self.checkpoint: Path | None = None  # the torch checkpoint behind this model, if any
        if is_onnx_file(self.path):
            if backend == "torch":
                raise BonexrayError(f"{self.path}: --backend torch needs a checkpoint (.ckpt), not an ONNX file")
            self.backend = "onnx"
        else:
            self.checkpoint = self.path
            self.backend = choose_backend(backend, resolve_device(device))
        if self.backend == "onnx":
            onnx_path, exported = self.path, None
            if self.checkpoint is not None:
                try:
                    exported = exported_onnx(self.checkpoint)
                except BonexrayError as err:
                    if backend == "onnx" or isinstance(err, CheckpointError):
                        raise
                    warn(f"{self.path}: ONNX export failed ({err}); running it with PyTorch")
                    self.backend = "torch"
                else:
                    onnx_path = exported.path
            if self.backend == "onnx":
                try:
                    self.card, self.session = _load_onnx(onnx_path, device)
                finally:
                    if exported is not None:
                        exported.discard()
                self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        if self.backend == "torch":
            self.device = resolve_device(device)
            self.net, self.card = self._load_net()

    def _load_net(self):
        from ..model.checkpoint import load_model

        net, card = load_model(self.checkpoint, map_location=self.device)
        return net.eval(), card

    @property
    def net(self):
        """The torch network (None for an ONNX file); loaded on first use for a checkpoint on onnxruntime."""
        if self._net is None and self.checkpoint is not None:
            self._net, _ = self._load_net()
        return self._net

    @net.setter
    def net(self, value) -> None:
        self._net = value

    @property
    def image_size(self) -> int:
        return int(self.card.image_size)

    @property
    def body_parts(self) -> list[str]:
        return list(self.card.body_parts)

    @property
    def threshold(self) -> float:
        return float(self.card.threshold)

    def to_tensor(self, batch: np.ndarray):
        """uint8 (N, S, S) -> float tensor (N, 1, S, S) in [0, 1] on the model's device."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.uint8))
        return x.to(self.device).float().div_(255.0).unsqueeze(1)

    def logits(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = self._check(batch)
        if self.session is not None:
            x = (batch.astype(np.float32) / np.float32(255.0))[:, None]
            abn, bp = self.session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: x})
            return np.asarray(abn).reshape(-1), np.asarray(bp)
        import torch

        with torch.inference_mode():
            abn, bp = self._net(self.to_tensor(batch))
        return abn.float().cpu().numpy(), bp.float().cpu().numpy()

    def predict_arrays(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        abn, bp = self.logits(batch)
        prob, parts = sigmoid(abn), softmax(bp)
        if self.tta == "flip":
            # Mirror images are equally plausible radiographs (left and right limbs); average the
            # probabilities of both views.
            abn_f, bp_f = self.logits(np.ascontiguousarray(np.asarray(batch)[:, :, ::-1]))
            prob, parts = (prob + sigmoid(abn_f)) / 2, (parts + softmax(bp_f)) / 2
        return prob, parts

    def _check(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        s = self.image_size
        if batch.ndim != 3 or batch.shape[1:] != (s, s):
            raise ValueError(f"expected a uint8 batch of shape (N, {s}, {s}), got {batch.shape}")
        return batch


class Ensemble:
    """Several models of the same task (e.g. seeds of one recipe): each reads the same tile, and the
    probabilities are averaged. Same interface as :class:`Predictor` for evaluation.

    ``threshold`` is the members' mean; evaluation re-chooses it on the runs' valid split.
    """

    def __init__(self, models: Sequence[str | os.PathLike], device: str = "auto", tta: str = "none",
                 backend: str = "auto") -> None:
        if not models:
            raise BonexrayError("an ensemble needs at least one model")
        self.members = [Predictor(m, device=device, tta=tta, backend=backend) for m in models]
        first = self.members[0]
        for m in self.members[1:]:
            if m.image_size != first.image_size or m.body_parts != first.body_parts:
                raise BonexrayError(
                    f"{m.path}: cannot ensemble with {first.path}: image size {m.image_size} vs {first.image_size}, "
                    f"body parts {m.body_parts} vs {first.body_parts}"
                )
        self.tta, self.card, self.path = tta, first.card, first.path

    @property
    def image_size(self) -> int:
        return self.members[0].image_size

    @property
    def body_parts(self) -> list[str]:
        return self.members[0].body_parts

    @property
    def threshold(self) -> float:
        return float(np.mean([m.threshold for m in self.members]))

    def predict_arrays(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outs = [m.predict_arrays(batch) for m in self.members]
        return np.mean([o[0] for o in outs], axis=0), np.mean([o[1] for o in outs], axis=0)


def _load_onnx(path: Path, device: str):
    from ..model.checkpoint import ModelCard

    if not path.exists():
        raise CheckpointError(f"{path}: model file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        import onnxruntime as ort
    except ImportError as err:  # a declared dependency, but say so clearly
        raise CheckpointError(f"{path}: ONNX model, but onnxruntime is not installed") from err
    from .export import verify_onnx_integrity

    verify_onnx_integrity(path)
    providers = ["CPUExecutionProvider"]
    if device not in ("cpu",) and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    elif str(device).startswith("cuda"):
        raise BonexrayError(f"--device {device}: onnxruntime has no CUDA provider here")
    from .backends import ort_session_options

    opts = ort_session_options()
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as err:
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"{path}: not a readable ONNX model ({first})") from err
    meta = session.get_modelmeta().custom_metadata_map
    if ONNX_CARD_KEY not in meta:
        raise CheckpointError(f"{path}: ONNX file has no bonexray model card (not made by `bonexray export`?)")
    try:
        card = ModelCard.from_dict(json.loads(meta[ONNX_CARD_KEY]))
    except ValueError as err:
        raise CheckpointError(f"{path}: malformed model card in ONNX metadata: {err}") from err
    except BonexrayError as err:
        raise CheckpointError(f"{path}: {err}") from err
    names_in = [i.name for i in session.get_inputs()]
    names_out = [o.name for o in session.get_outputs()]
    if names_in != [ONNX_INPUT] or any(n not in names_out for n in ONNX_OUTPUTS):
        raise CheckpointError(
            f"{path}: unexpected ONNX signature inputs={names_in} outputs={names_out} "
            f"(want {ONNX_INPUT} -> {', '.join(ONNX_OUTPUTS)})"
        )
    return card, session


# --------------------------------------------------------------------------- inputs


@dataclass
class InputItem:
    path: Path  # as the user spelled it (joined with the relative path inside a folder)
    study: str | None = None  # parent folder, when this image belongs to an aggregated study


@dataclass
class InputPlan:
    items: list[InputItem] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): counted as failures
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why): named, not failures


_STUDY_DIR = re.compile(r"^study\d+(_(positive|negative))?$", re.IGNORECASE)


def _unreachable(p: Path) -> str | None:
    """Why ``p`` cannot be opened (symlink loop, broken link, missing), or None when it can."""
    try:
        os.stat(p)
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop (too many levels of symbolic links)"
        if os.path.islink(p):
            return f"broken symlink (its target {os.readlink(p)} does not exist)"
        if err.errno == errno.ENOENT:
            return "no such file or directory"
        return err.strerror or str(err)


def _walk_images(folder: Path, plan: InputPlan) -> list[Path]:
    """Images under ``folder`` (sorted); every other file is recorded in ``plan`` as skipped or failed.

    Folder symlinks are followed once; one that points back to a folder it is in is a loop (failed).
    """
    found: list[Path] = []
    visited: set[str] = set()

    def unreadable_folder(err: OSError) -> None:
        plan.errors.append((str(err.filename or folder), f"cannot read folder ({err.strerror or err})"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable_folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # reached again through a link: its files are already in the list
            dirnames[:] = []
            continue
        visited.add(real)
        keep = []
        for d in sorted(dirnames):
            sub = Path(dirpath) / d
            if d.startswith("."):
                plan.skipped.append((str(sub), "hidden folder, not searched"))
            elif os.path.islink(sub) and (real + os.sep).startswith(os.path.realpath(sub) + os.sep):
                plan.errors.append((str(sub), f"symlink loop (points back to {os.path.realpath(sub)}, a folder it is in)"))
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            p = Path(dirpath) / name
            problem = _unreachable(p)
            if problem is not None:
                plan.errors.append((str(p), problem))
            elif name.startswith("."):
                plan.skipped.append((str(p), "hidden file"))
            elif p.is_file() and is_image_file(p):
                found.append(p)
            else:
                plan.skipped.append((str(p), f"not an image file ({p.suffix or 'no suffix'})"))
    return sorted(found, key=lambda p: p.parts)


def collect_inputs(paths: Sequence[str | os.PathLike], study: bool = False) -> InputPlan:
    """Expand PATHs into images (files as given, folders recursively and sorted).

    A MURA-style study folder (``studyN`` or ``studyN_positive/negative``, holding its images
    directly) is aggregated even without ``study``; with ``study`` every image is aggregated by
    its parent folder. Other folders (e.g. FracAtlas' ``images/Fractured``) are not studies.
    The same file reached twice is predicted once.
    """
    plan = InputPlan()
    seen: set[str] = set()

    def add(p: Path, study_key: str | None) -> None:
        key = os.path.realpath(p)
        if key in seen:
            return
        seen.add(key)
        plan.items.append(InputItem(p, study_key))

    for raw in paths:
        p = Path(raw)
        problem = _unreachable(p)
        if problem is not None:
            plan.errors.append((str(raw), problem))
        elif p.is_dir():
            images = _walk_images(p, plan)
            if not images:
                plan.errors.append((str(raw), "no image files in this folder"))
                continue
            leaf = bool(_STUDY_DIR.match(p.name)) and all(img.parent == p for img in images)
            for img in images:
                add(img, str(img.parent) if (study or leaf) else None)
        else:
            add(p, str(p.parent) if study else None)
    return plan


# --------------------------------------------------------------------------- output


def _r(x: float) -> float:
    return round(float(x), 6)


@dataclass
class ImageResult:
    path: str
    prob_abnormal: float
    body_part_probs: np.ndarray
    truncated: bool
    study: str | None = None
    cam: str | None = None


def image_record(res: ImageResult, body_parts: Sequence[str], threshold: float) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "type": "image",
        "path": res.path,
        "prob_abnormal": _r(res.prob_abnormal),
        "abnormal": bool(res.prob_abnormal >= threshold),
        "body_part": body_parts[int(np.argmax(res.body_part_probs))],
    }
    rec.update({f"prob_{b}": _r(p) for b, p in zip(body_parts, res.body_part_probs)})
    rec["truncated"] = bool(res.truncated)
    if res.study is not None:
        rec["study"] = res.study
    if res.cam is not None:
        rec["cam"] = res.cam
    return rec


def study_records(results: Iterable[ImageResult], body_parts: Sequence[str], threshold: float) -> list[dict[str, Any]]:
    """One aggregate per study, in order of first appearance."""
    groups: dict[str, list[ImageResult]] = {}
    for r in results:
        if r.study is not None:
            groups.setdefault(r.study, []).append(r)
    out = []
    for study, members in groups.items():
        prob = float(np.mean([m.prob_abnormal for m in members]))
        mean_bp = np.mean(np.stack([m.body_part_probs for m in members]), axis=0)
        votes = Counter(int(np.argmax(m.body_part_probs)) for m in members)
        top = max(votes.values())
        tied = [k for k, v in votes.items() if v == top]
        winner = max(tied, key=lambda k: mean_bp[k])  # ties: highest mean probability
        rec: dict[str, Any] = {
            "type": "study",
            "study": study,
            "n_images": len(members),
            "prob_abnormal": _r(prob),
            "abnormal": bool(prob >= threshold),
            "body_part": body_parts[winner],
        }
        rec.update({f"prob_{b}": _r(p) for b, p in zip(body_parts, mean_bp)})
        out.append(rec)
    return out


class Writer:
    """JSON lines or one CSV table (with a ``type`` column) on ``stream``, flushed per batch."""

    def __init__(self, fmt: str, body_parts: Sequence[str], stream: TextIO, with_cam: bool = False) -> None:
        if fmt not in ("json", "csv"):
            raise BonexrayError(f"unknown output format {fmt!r} (json or csv)")
        self.fmt = fmt
        self.stream = stream
        self.columns = ["type", "path", "study", "n_images", "prob_abnormal", "abnormal", "body_part",
                        *[f"prob_{b}" for b in body_parts], "truncated"] + (["cam"] if with_cam else [])
        self._csv = None
        if fmt == "csv":
            self._csv = csv.DictWriter(stream, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
            self._csv.writeheader()

    def write(self, rec: dict[str, Any]) -> None:
        if self._csv is None:
            self.stream.write(json.dumps(rec, allow_nan=False) + "\n")  # strict JSON: never a bare NaN
        else:
            self._csv.writerow({k: (int(v) if isinstance(v, bool) else v) for k, v in rec.items()})

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            pass


def _error(path: str, reason: str) -> None:
    print(f"{PROG}: {path}: {reason}", file=sys.stderr, flush=True)


def _batches(items: Sequence[InputItem], n: int) -> Iterator[Sequence[InputItem]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


# --------------------------------------------------------------------------- run


def run_predict(
    model: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    study: bool = False,
    cam_dir: str | os.PathLike | None = None,
    fmt: str = "json",
    device: str = "auto",
    batch_size: int = 16,
    stream: TextIO | None = None,
    tta: str = "none",
    cam_method: str = "gradcam++",
    backend: str = "auto",
) -> int:
    """Predict every image under ``paths``; returns the exit status (0 ok, 1 some input failed).

    A bad model file raises :class:`CheckpointError` (the CLI turns it into exit status 2).
    """
    if batch_size < 1:
        raise BonexrayError(f"--batch-size must be >= 1, got {batch_size}")
    if fmt not in ("json", "csv"):
        raise BonexrayError(f"unknown output format {fmt!r} (json or csv)")
    if cam_dir is not None and is_onnx_file(model):
        raise BonexrayError(
            "--cam needs the checkpoint (.ckpt): Grad-CAM takes gradients of the torch network, "
            "which an exported ONNX model does not provide"
        )
    stream = stream or sys.stdout
    predictor = Predictor(model, device=device, tta=tta, backend=backend)
    plan = collect_inputs(paths, study=study)
    failed = 0
    for path, reason in plan.errors:
        _error(path, reason)
        failed += 1
    for path, why in plan.skipped:
        _error(path, f"skipped: {why}")

    cam_writer = None
    if cam_dir is not None:
        from .cam import CamWriter

        cam_writer = CamWriter(cam_dir, predictor, method=cam_method)

    try:
        writer = Writer(fmt, predictor.body_parts, stream, with_cam=cam_writer is not None)
        failed += _predict_items(predictor, plan.items, writer, cam_writer, batch_size)
    except BrokenPipeError:
        # `bonexray predict ... | head`: the reader is gone; stop quietly like other CLI tools.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError, AttributeError):
            pass
    return 1 if failed else 0


def _predict_items(predictor: Predictor, items: Sequence[InputItem], writer: Writer, cam_writer, batch_size: int) -> int:
    """Decode, predict and write ``items`` batch by batch; returns the number of failed files."""
    from ..data.preprocess import load_for_model

    failed = 0
    size = predictor.image_size
    results: list[ImageResult] = []
    for chunk in _batches(items, batch_size):
        arrays, ok_items, truncated = [], [], []
        for item in chunk:
            try:
                arr, trunc = load_for_model(item.path, size)
            except ImageReadError as err:
                _error(str(item.path), err.reason)
                failed += 1
                continue
            except Exception as err:  # noqa: BLE001 - one bad file must not stop the others
                _error(str(item.path), f"{type(err).__name__}: {err}")
                failed += 1
                continue
            arrays.append(arr)
            ok_items.append(item)
            truncated.append(trunc)
        if not arrays:
            continue
        batch = np.stack(arrays)
        probs, bp_probs = predictor.predict_arrays(batch)
        finite = np.isfinite(probs) & np.isfinite(bp_probs).all(axis=1)
        if not finite.all():
            # A NaN probability compares False with the threshold: it would read "normal". No verdict.
            for item in (it for it, ok in zip(ok_items, finite) if not ok):
                _error(str(item.path), "the model's output is not a finite number (NaN/inf); no verdict given "
                                       f"(is {predictor.path} damaged?)")
                failed += 1
            keep = np.flatnonzero(finite)
            ok_items, truncated = [ok_items[i] for i in keep], [truncated[i] for i in keep]
            batch, probs, bp_probs = batch[keep], probs[keep], bp_probs[keep]
            if not ok_items:
                continue
        cams: list[str | None] = [None] * len(ok_items)
        if cam_writer is not None:
            cams = cam_writer.write_batch([it.path for it in ok_items], batch, probs, bp_probs)
        for item, p, bp, trunc, cam_path in zip(ok_items, probs, bp_probs, truncated, cams):
            res = ImageResult(str(item.path), float(p), np.asarray(bp), trunc, item.study, cam_path)
            results.append(res)
            writer.write(image_record(res, predictor.body_parts, predictor.threshold))
        writer.flush()
    for rec in study_records(results, predictor.body_parts, predictor.threshold):
        writer.write(rec)
    writer.flush()
    return failed
