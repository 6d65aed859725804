"""``bonexray predict``: abnormality + body part for images, folders, studies and DICOM files.

A MODEL is either a bonexray checkpoint or an ONNX file written by ``bonexray export`` (run with
onnxruntime; the model card comes from the ONNX metadata). Every image goes through
:mod:`bonexray.pipeline` (one decode, the scope gate, the verdict of every front end), so predict
gives what the Python API, ``serve`` and ``pacs`` give for the same file.

Output (stdout), one record per image, in input order:

* JSON lines (default): :meth:`bonexray.core.findings.ImageFinding.record`: ``{"type": "image", "path",
  "prob_abnormal", "abnormal", "finding", "body_part", "confidence", "in_scope", "scope_reason",
  "prob_<part>" for every class, "truncated", "boxes"}`` (+ ``"study"`` when the image belongs to an
  aggregated study, + ``"cam"`` with ``--cam``).
* With ``--study``, or for a PATH that is a MURA-style study folder (``studyN[_positive|_negative]``),
  one more line per study after all image lines (:class:`bonexray.core.findings.StudyFinding`:
  ``n_images``, ``n_out_of_scope``, ``n_assessed``, ``n_positive/suspicious/negative``,
  ``prob_abnormal`` (mean of its in-scope images), ``abnormal``, ``finding`` (the worst),
  ``body_part`` (majority vote; ties: highest mean probability), ``body_parts``,
  ``mixed_body_parts``, ``prob_<part>`` (mean)). A DICOM image belongs to the study of its
  StudyInstanceUID (the study is named by it), so a study never mixes two; any other image's study
  is its parent folder.
* CSV (``--format csv``): ONE table with a header, a ``type`` column (``image`` / ``study``) and
  the union of the fields above; study rows come after the image rows, empty cells where a field
  does not apply (``path`` for studies, ``n_images`` for images). Booleans are written 1/0, lists
  (boxes, body_parts) as one JSON cell. File names that are not valid UTF-8 are written with each
  undecodable byte as ``\\xNN``.

Unreadable inputs (PATHs that do not exist, symlink loops, broken links, images that cannot be
decoded, images for which the model's output is not a finite number) give one line on stderr,
``bonexray predict: <path>: <reason>``; the others are still predicted and the exit status is 1.
Every file met in a folder is either predicted or named on stderr: files that are not images,
DICOM objects without pixel data (DICOMDIR, SR, RT plan, encapsulated PDF) and hidden files/folders as ``bonexray predict: <path>: skipped: <why>`` (these do not change the
exit status). A ``--cam`` folder that cannot be written (read-only, disk full) is one line naming it;
the records are still written, without ``cam``, and the exit status is 1.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

import numpy as np

from .errors import BonexrayError, ImageReadError, NotAnImageError
from .pipeline import study_keys
from .inference.inputs import InputItem, InputPlan, collect_inputs
from .inference.predictor import BatchPrediction, Predictor, is_onnx_file
from .inference.writers import Writer

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
    tta: str | None = None,
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
    as one process would (the scope gate too: each rank decides it for the images it reads); the other
    ranks write nothing and return 0.
    A bad model file raises :class:`CheckpointError` (the CLI turns it into exit status 2).
    """
    from .inference.distributed import wants_distributed

    _check_options(model, batch_size, fmt, cam_dir)
    distributed = wants_distributed(devices, num_nodes)
    if distributed and cam_dir is not None:
        raise BonexrayError("--cam runs in one process: drop --devices/--num-nodes, or write heatmaps in a second run")
    stream = stream or sys.stdout
    predictor = _load_predictor(model, device, tta, backend, distributed, devices)
    plan = collect_inputs(paths, study=study)
    if distributed:
        outcomes = _predict_across_processes(predictor, plan.items, batch_size, scope_check, devices=devices,
                                             num_nodes=num_nodes, strategy=strategy)
        if outcomes is None:  # not global rank 0: rank 0 writes everything
            return 0
    failed = _report_plan(plan)
    cam_writer = _cam_writer(cam_dir, predictor, cam_method)
    try:
        writer = Writer(fmt, predictor.body_parts, stream, with_cam=cam_writer is not None)
        if distributed:
            failed += _write_outcomes(predictor, plan.items, outcomes, writer, batch_size, scope_check)
        else:
            failed += _predict_items(predictor, plan.items, writer, cam_writer, batch_size, scope_check)
    except BrokenPipeError:
        # `bonexray predict ... | head`: the reader is gone; stop quietly like other CLI tools.
        _discard_output(stream)
    return 1 if failed else 0


def _check_options(model: str | os.PathLike, batch_size: int, fmt: str, cam_dir: str | os.PathLike | None) -> None:
    """Refuse a bad ``--batch-size``, an unknown format, and ``--cam`` with an ONNX model, before any loading."""
    if batch_size < 1:
        raise BonexrayError(f"--batch-size must be >= 1, got {batch_size}")
    if fmt not in ("json", "csv"):
        raise BonexrayError(f"unknown output format {fmt!r} (json or csv)")
    if cam_dir is not None and is_onnx_file(model):
        raise BonexrayError(
            "--cam needs the checkpoint (.ckpt): Grad-CAM takes gradients of the torch network, "
            "which an exported ONNX model does not provide"
        )


def _load_predictor(model: str | os.PathLike, device: str, tta: str | None, backend: str, distributed: bool,
                    devices: str | int) -> Predictor:
    """The predictor; under ``distributed``, on this rank's device, the node's cores shared among its processes."""
    from .inference.distributed import local_world_size, rank_device

    if distributed:
        return Predictor(model, device=rank_device(device), tta=tta, backend=backend,
                         threads=max(1, _cores() // local_world_size(devices)))
    return Predictor(model, device=device, tta=tta, backend=backend)


def _report_plan(plan: InputPlan) -> int:
    """One line per input that cannot be read and per input skipped; returns the number that cannot be read."""
    failed = 0
    for path, reason in plan.errors:
        _error(path, reason)
        failed += 1
    for path, why in plan.skipped:
        _error(path, f"skipped: {why}")
    return failed


def _cam_writer(cam_dir: str | os.PathLike | None, predictor: Predictor, cam_method: str):
    """The heatmap writer under ``--cam``; None without."""
    if cam_dir is None:
        return None
    from .inference.cam import CamWriter

    return CamWriter(cam_dir, predictor, method=cam_method)


def _discard_output(stream: TextIO) -> None:
    """Point ``stream``'s file descriptor at the null device, so that nothing more reaches a reader that is gone."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _cores() -> int:
    from .inference.backends import physical_cores

    return physical_cores()


def _predict_items(predictor: Predictor, items: Sequence[InputItem], writer: Writer, cam_writer, batch_size: int,
                   scope_check: bool = True) -> int:
    """Decode, predict and write ``items`` batch by batch (bonexray.pipeline); returns the number of failed files."""
    from .pipeline import Analyser, decode

    analyser = Analyser(predictor, scope_check=scope_check)
    out = _Output(writer, cam_writer)
    for chunk in _batches(items, batch_size):
        decoded, ok_items = [], []
        for item in chunk:
            try:
                decoded.append(decode(item.path, predictor.image_size))
                ok_items.append(item)
            except NotAnImageError as err:  # a DICOMDIR, SR, PDF of a DICOM media folder: named, not a failure
                _error(str(item.path), f"skipped: {err.reason}")
            except ImageReadError as err:
                out.fail(str(item.path), err.reason)
            except Exception as err:  # noqa: BLE001 - one bad file must not stop the others
                out.fail(str(item.path), f"{type(err).__name__}: {err}")
        if decoded:
            studies = study_keys(decoded, [it.study for it in ok_items])
            out.emit(analyser.interpret(decoded, analyser.run(decoded), studies), decoded)
    out.finish(analyser)
    return out.failed


def _predict_across_processes(predictor: Predictor, items: Sequence[InputItem], batch_size: int, scope_check: bool,
                              **processes):
    """What every rank found for ``items`` (inference/distributed.py), on global rank 0; None elsewhere.

    Each rank decodes its images once and takes the scope gate's decisions there, as one process takes
    them: the file checks when it reads an image (its pixels are then dropped), the embedding checks
    once its batch is predicted; only the decision travels to rank 0, as each item's ``extra``
    (geometry, DICOM tags, scope reason)."""
    from .pipeline import Analyser, decode
    from .inference.distributed import predict_distributed

    gate = Analyser(predictor, scope_check=scope_check).gate

    def load(i: int):
        d = decode(items[i].path, predictor.image_size)
        return d.tile, d.truncated, (d.geometry, d.tags, gate.file_reasons([d.pixels], [d.truncated], [d.evidence])[0])

    def annotate(extras, pred):
        reasons = gate.embedding_reasons([e[2] for e in extras], pred.embedding)
        return [(geometry, tags, why) for (geometry, tags, _), why in zip(extras, reasons, strict=True)]

    return predict_distributed(predictor, len(items), load, batch_size=batch_size, boxes=predictor.has_boxes,
                               box_settings=Analyser(predictor, scope_check=False).box_settings, annotate=annotate,
                               **processes)


def _write_outcomes(predictor: Predictor, items: Sequence[InputItem], outcomes, writer: Writer, batch_size: int,
                    scope_check: bool = True) -> int:
    """Write what the ranks found (in input order) exactly as :func:`_predict_items` writes it."""
    from .pipeline import Analyser, Decoded

    analyser = Analyser(predictor, scope_check=scope_check)
    out = _Output(writer, None)
    for start in range(0, len(items), batch_size):
        chunk = outcomes[start : start + batch_size]
        for o in chunk:
            if o.skipped:  # a DICOMDIR, SR, PDF of a DICOM media folder: named, not a failure
                _error(str(items[o.index].path), f"skipped: {o.error}")
            elif o.error is not None:
                out.fail(str(items[o.index].path), o.error)
        ok = [o for o in chunk if o.error is None]
        if not ok:
            continue
        decoded = [Decoded(str(items[o.index].path), str(items[o.index].path), None, o.truncated, o.extra[0],
                           tags=o.extra[1]) for o in ok]
        pred = BatchPrediction(np.array([o.prob for o in ok]), np.stack([o.parts for o in ok]), None,
                               [o.boxes for o in ok] if predictor.has_boxes else None)
        studies = study_keys(decoded, [items[o.index].study for o in ok])
        out.emit(analyser.interpret(decoded, pred, studies, scope_reasons=[o.extra[2] for o in ok]), decoded)
    out.finish(analyser)
    return out.failed


class _Output:
    """Writes image records as batches finish and the study records at the end; counts failed files."""

    def __init__(self, writer: Writer, cam_writer) -> None:
        self.writer, self.cam_writer = writer, cam_writer
        self.failed = 0
        self.findings: list = []

    def fail(self, path: str, reason: str) -> None:
        _error(path, reason)
        self.failed += 1

    def emit(self, result, decoded) -> None:
        for p in result.problems:
            self.fail(p.label, p.reason)
        findings = result.findings
        if self.cam_writer is not None and findings:
            findings = self._with_cams(findings, [decoded[i] for i in result.kept])
        for f in findings:
            if f.study is not None:  # the scope decision stays: a study verdict uses in-scope images only
                self.findings.append(f)
            self.writer.write(f.record())
        self.writer.flush()

    def _with_cams(self, findings, decoded):
        try:
            cams = self.cam_writer.write_batch(findings, decoded)
        except OSError as err:
            # The predictions are still written; no more pictures are tried.
            self.fail(str(self.cam_writer.out_dir), f"--cam: cannot write the heatmap pictures "
                                                    f"({err.strerror or err}); predictions are written without them")
            self.cam_writer = None
            return findings
        return [f.model_copy(update={"cam": c}) for f, c in zip(findings, cams, strict=True)]

    def finish(self, analyser) -> None:
        for study in analyser.aggregate(self.findings):
            self.writer.write(study.record())
        self.writer.flush()
