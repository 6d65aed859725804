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
Every file met in a folder is either predicted or named on stderr: files that are not images,
DICOM objects without pixel data (DICOMDIR, SR, RT plan, encapsulated PDF) and hidden files/folders
as ``bonexray predict: <path>: skipped: <why>`` (these do not change the exit status).
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from collections.abc import Iterator, Sequence
from typing import TextIO

import numpy as np

from ..errors import BonexrayError, ImageReadError, NotAnImageError
from .inputs import InputItem, collect_inputs
from .predictor import Predictor, is_onnx_file
from .results import ImageResult, box_records, finite_rows, image_record, nonfinite_reason, original_boxes, study_records
from .writers import Writer

# The CLI runner only: the model classes live in predictor.py / loading.py, the ONNX names in onnx_format.py.
__all__ = ["run_predict"]

PROG = "bonexray predict"


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
    devices: str | int = 1,
    num_nodes: int = 1,
    strategy: str = "ddp",
    scope_check: bool = True,
) -> int:
    """Predict every image under ``paths``; returns the exit status (0 ok, 1 some input failed).

    ``model``: a file or a bundled model's name. ``scope_check=False`` (``--no-scope-check``) gives a
    verdict for every image (``in_scope`` null: not checked).

    With ``devices`` other than 1 or several ``num_nodes``, the images are shared among processes
    (:mod:`bonexray.inference.distributed`) and global rank 0 writes every record, in input order,
    as one process would; the other ranks write nothing and return 0. The scope gate does not run
    across processes yet: such a run needs ``scope_check=False``.
    A bad model file raises :class:`CheckpointError` (the CLI turns it into exit status 2).
    """
    from .distributed import local_world_size, rank_device, wants_distributed

    if batch_size < 1:
        raise BonexrayError(f"--batch-size must be >= 1, got {batch_size}")
    if fmt not in ("json", "csv"):
        raise BonexrayError(f"unknown output format {fmt!r} (json or csv)")
    if cam_dir is not None and is_onnx_file(model):
        raise BonexrayError(
            "--cam needs the checkpoint (.ckpt): Grad-CAM takes gradients of the torch network, "
            "which an exported ONNX model does not provide"
        )
    distributed = wants_distributed(devices, num_nodes)
    if distributed and cam_dir is not None:
        raise BonexrayError("--cam runs in one process: drop --devices/--num-nodes, or write heatmaps in a second run")
    if distributed and scope_check:
        # Refused rather than run without the gate: an out-of-scope image must never get a silent verdict.
        raise BonexrayError("the scope gate runs in one process only for now: drop --devices/--num-nodes, or pass "
                            "--no-scope-check to predict across processes without it")
    stream = stream or sys.stdout
    if distributed:
        predictor = Predictor(model, device=rank_device(device), tta=tta, backend=backend,
                              threads=max(1, _cores() // local_world_size(devices)))
    else:
        predictor = Predictor(model, device=device, tta=tta, backend=backend)
    plan = collect_inputs(paths, study=study)
    if distributed:
        from ..data.preprocess import read_for_model
        from .distributed import predict_distributed

        def load(i: int):
            m = read_for_model(plan.items[i].path, predictor.image_size)
            return m.tile, m.truncated, m.geometry

        outcomes = predict_distributed(predictor, len(plan.items), load, batch_size=batch_size, devices=devices,
                                       num_nodes=num_nodes, strategy=strategy, boxes=predictor.has_boxes)
        if outcomes is None:  # not global rank 0: rank 0 writes everything
            return 0
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
        if distributed:
            failed += _write_outcomes(predictor, plan.items, outcomes, writer, batch_size)
        else:
            failed += _predict_items(predictor, plan.items, writer, cam_writer, batch_size, scope_check)
    except BrokenPipeError:
        # `bonexray predict ... | head`: the reader is gone; stop quietly like other CLI tools.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError, AttributeError):
            pass
    return 1 if failed else 0


def _cores() -> int:
    from .backends import physical_cores

    return physical_cores()


def _predict_items(predictor: Predictor, items: Sequence[InputItem], writer: Writer, cam_writer, batch_size: int,
                   scope_check: bool = True) -> int:
    """Decode, predict and write ``items`` batch by batch; returns the number of failed files."""
    from ..data.preprocess import read_for_model
    from .scope import ScopeGate, borderline_band, source_evidence

    gate = ScopeGate(predictor.card, enabled=scope_check)
    band, _ = borderline_band(predictor.card)
    failed = 0
    size = predictor.image_size
    studies = _StudyAccumulator()
    for chunk in _batches(items, batch_size):
        arrays, ok_items, truncated, geometry, pixels, evidence = [], [], [], [], [], []
        for item in chunk:
            try:
                m = read_for_model(item.path, size)
            except NotAnImageError as err:  # a DICOMDIR, SR, PDF of a DICOM media folder: named, not a failure
                _error(str(item.path), f"skipped: {err.reason}")
                continue
            except ImageReadError as err:
                _error(str(item.path), err.reason)
                failed += 1
                continue
            except Exception as err:  # noqa: BLE001 - one bad file must not stop the others
                _error(str(item.path), f"{type(err).__name__}: {err}")
                failed += 1
                continue
            arrays.append(m.tile)
            ok_items.append(item)
            truncated.append(m.truncated)
            geometry.append(m.geometry)
            pixels.append(m.decoded.pixels if m.decoded is not None else None)
            evidence.append(source_evidence(item.path) if scope_check else None)
        if not arrays:
            continue
        batch = np.stack(arrays)
        pred = predictor.predict_batch(batch)
        reasons = gate.reasons(pixels, truncated, evidence, pred.embedding)
        failed += _emit(predictor, ok_items, truncated, geometry, pred.prob, pred.parts, pred.boxes, batch,
                        writer, cam_writer, studies, reasons=reasons, scope_check=scope_check, band=band)
    for rec in studies.records(predictor.body_parts, predictor.threshold, band):
        writer.write(rec)
    writer.flush()
    return failed


def _write_outcomes(predictor: Predictor, items: Sequence[InputItem], outcomes, writer: Writer, batch_size: int) -> int:
    """Write what the ranks found (in input order) exactly as :func:`_predict_items` writes it."""
    failed = 0
    studies = _StudyAccumulator()
    for start in range(0, len(items), batch_size):
        chunk = outcomes[start : start + batch_size]
        for o in chunk:
            if o.error is not None:
                _error(str(items[o.index].path), o.error)
                failed += 1
        ok = [o for o in chunk if o.error is None]
        if not ok:
            continue
        boxes = [o.boxes for o in ok] if predictor.has_boxes else None
        failed += _emit(predictor, [items[o.index] for o in ok], [o.truncated for o in ok], [o.extra for o in ok],
                        np.array([o.prob for o in ok]), np.stack([o.parts for o in ok]), boxes, None, writer, None,
                        studies)
    for rec in studies.records(predictor.body_parts, predictor.threshold):
        writer.write(rec)
    writer.flush()
    return failed


def _emit(predictor, ok_items, truncated, geometry, probs, bp_probs, tile_boxes, batch, writer, cam_writer, studies,
          reasons=None, scope_check: bool = False, band: float | None = None) -> int:
    """Write one batch's image records (no verdict for a non-finite output, nor for an image the scope gate
    refused: ``reasons`` per image, None when in scope); returns the failures."""
    failed = 0
    reasons = list(reasons) if reasons is not None else [None] * len(ok_items)
    boxes = ([original_boxes(b, g) for b, g in zip(tile_boxes, geometry)] if tile_boxes is not None
             else [None] * len(ok_items))
    finite = finite_rows(probs, bp_probs)
    if not finite.all():
        # A NaN probability compares False with the threshold: it would read "normal". No verdict (one policy:
        # inference/results.py).
        for item in (it for it, ok in zip(ok_items, finite) if not ok):
            _error(str(item.path), nonfinite_reason(predictor.path))
            failed += 1
        keep = np.flatnonzero(finite)
        ok_items, truncated = [ok_items[i] for i in keep], [truncated[i] for i in keep]
        boxes, geometry = [boxes[i] for i in keep], [geometry[i] for i in keep]
        reasons = [reasons[i] for i in keep]
        probs, bp_probs = probs[keep], bp_probs[keep]
        batch = batch[keep] if batch is not None else None
        if not ok_items:
            return failed
    cams: list[str | None] = [None] * len(ok_items)
    if cam_writer is not None:
        cams = cam_writer.write_batch([it.path for it in ok_items], batch, probs, bp_probs, boxes=boxes, geometry=geometry)
    for item, p, bp, trunc, cam_path, bx, why in zip(ok_items, probs, bp_probs, truncated, cams, boxes, reasons):
        res = ImageResult(str(item.path), float(p), np.asarray(bp), trunc, item.study, cam_path, box_records(bx),
                          scope_reason=why, scope_checked=scope_check)
        studies.add(res)
        writer.write(image_record(res, predictor.body_parts, predictor.threshold, band))
    writer.flush()
    return failed


class _StudyAccumulator:
    """The images that belong to a study, for the study lines written after all image lines."""

    def __init__(self) -> None:
        self._members: list[ImageResult] = []

    def add(self, res: ImageResult) -> None:
        if res.study is not None:  # the scope decision stays: a study verdict uses in-scope images only
            self._members.append(replace(res, cam=None, boxes=None))

    def records(self, body_parts, threshold, band=None):
        return study_records(self._members, body_parts, threshold, band)
