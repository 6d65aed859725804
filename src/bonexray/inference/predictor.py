"""Model backends behind one interface: :class:`Predictor` (a checkpoint on torch or its cached ONNX
export, or an ONNX file, on onnxruntime or OpenVINO) and :class:`Ensemble` (several, probabilities averaged).

Both engines return *logits*; the probabilities are computed here by the same numpy code, so a
checkpoint and its export give the same answers. Used by predict, evaluate, serve and the Python API.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.card import TTA_MODES
from ..errors import BonexrayError, CheckpointError
from .onnx_format import ONNX_INPUT, ONNX_OUTPUTS

if TYPE_CHECKING:
    from .onnx_file import OnnxFile

BOX_MAPS = ("box_logits", "box_ltrb", "box_centerness")



def tta_views(batch: np.ndarray, tta: str) -> list[np.ndarray]:
    """The extra views of a (N, S, S) batch that test-time augmentation ``tta`` averages over (the batch
    itself not included): its mirror for "flip"; its 3 other quarter turns and the mirrors of all 4 for "d4"."""
    if tta == "flip":
        return [np.ascontiguousarray(batch[:, :, ::-1])]
    if tta != "d4":
        return []
    views = [np.ascontiguousarray(batch[:, :, ::-1])]
    for k in (1, 2, 3):
        turned = np.rot90(batch, k, axes=(1, 2))
        views += [np.ascontiguousarray(turned), np.ascontiguousarray(turned[:, :, ::-1])]
    return views


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


@dataclass
class BatchPrediction:
    """What a model says about a batch of tiles: ``prob`` (N,), ``parts`` (N, K), ``embedding`` (N, C)
    or None (ONNX files exported before bonexray had it), and ``boxes``: per image an (n, 5) array
    [x0, y0, x1, y1, score] in *tile* pixels at the card's operating point, or None for a model
    without a box head (callers map tiles back to the original image: data/preprocess.py Letterbox)."""

    prob: np.ndarray
    parts: np.ndarray
    embedding: np.ndarray | None = None
    boxes: list[np.ndarray] | None = None
    #: The network's raw outputs by name (logits and box maps) for the batch as given.
    outputs: dict[str, np.ndarray] | None = None


def decode_output_boxes(out: dict[str, np.ndarray], settings) -> list[np.ndarray]:
    """The box maps of a batch (numpy, from any engine) -> per image (n, 5) boxes in tile pixels (core/boxes.py: numpy,
    no torch)."""
    from ..core.boxes import decode_boxes

    return [b.astype(np.float64) for b in decode_boxes(*(out[k] for k in BOX_MAPS), settings)]


# --------------------------------------------------------------------------- predictor


class Predictor:
    """A loaded model: a checkpoint (torch, or its cached ONNX export) or an ONNX file.

    ``model``: a file, or a bundled model's name (model/hub.py ``resolve_model``; None = the default).
    ``predict_arrays(uint8 (N, S, S))`` -> ``(prob_abnormal (N,), body_part_probs (N, K))`` with
    S = ``card.image_size``; the arrays are what :func:`load_for_model` returns. ``backend``
    (``auto``, ``torch``, ``onnx``, ``openvino``, ``openvino-bf16``; see
    :mod:`bonexray.inference.backends`) picks the engine; ``self.backend`` says which one runs.
    ``net`` (the torch network, for CAMs) is loaded on first use when a checkpoint runs on an ONNX
    engine. ``threads``: the ONNX engine's threads (default one per physical core; several processes
    on one machine share the cores).
    """

    def __init__(self, model: str | os.PathLike | None, device: str = "auto", tta: str | None = None,
                 backend: str = "auto", threads: int | None = None) -> None:
        from ..model.hub import ModelFile, resolve_model_file
        from .backends import BACKENDS, ONNX_ENGINES, choose_backend, exported_onnx, warn
        from .onnx_file import read_onnx

        if tta is not None and tta not in TTA_MODES:
            raise BonexrayError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA_MODES)}")
        if backend not in BACKENDS:
            raise BonexrayError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.tta = tta
        # Each file is read and verified once here and the verified object passed on: a bundled model's
        # pinned-hash check gives the hash that the backend record and the export cache key use; an ONNX
        # file's bytes are checked once and handed to the engine.
        model_file = resolve_model_file(model)  # a path, or a bundled model's name (hash-checked)
        self.path = model_file.path
        self._net = None
        self.session = None
        self.checkpoint: Path | None = None  # the torch checkpoint behind this model, if any
        verified = None
        if is_onnx_file(self.path):
            if backend == "torch":
                raise BonexrayError(f"{self.path}: --backend torch needs a checkpoint (.ckpt), not an ONNX file")
            _check_model_file(self.path)
            verified = read_onnx(self.path)
            model_file = ModelFile(self.path, model_file.known_sha256, data=verified.data)
            # On a GPU, auto keeps an ONNX file on onnxruntime (its CUDA provider); _load_onnx says when
            # onnxruntime is missing.
            chosen = choose_backend(backend, _onnx_device(device), model_file)
            self.backend = "onnx" if chosen == "torch" else chosen
        else:
            self.checkpoint = self.path
            self.backend = choose_backend(backend, resolve_device(device), model_file)
        if self.backend in ONNX_ENGINES:
            exported = None
            if self.checkpoint is not None:
                try:
                    exported = exported_onnx(model_file)
                except BonexrayError as err:
                    if backend != "auto" or isinstance(err, CheckpointError):
                        raise
                    warn(f"{self.path}: ONNX export failed ({err}); running it with PyTorch")
                    self.backend = "torch"
                else:
                    verified = exported.verified or exported.path
            if self.backend in ONNX_ENGINES:
                try:
                    self.card, self.session = self._load_engine(verified, device, threads, chosen_by_auto=backend == "auto")
                finally:
                    if exported is not None:
                        exported.discard()
                self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        if self.backend == "torch":
            self.device = resolve_device(device)
            self.net, self.card = self._load_net()
        # None: the card's, the setting its calibration and operating points were fitted under.
        self.tta = tta if tta is not None else (self.card.tta or "none")

    def _load_engine(self, onnx_path: Path | OnnxFile, device: str, threads: int | None, chosen_by_auto: bool):
        """(card, session) on ``self.backend``; an OpenVINO engine that ``auto`` chose but that fails to
        compile here falls back to onnxruntime with a note (an explicit choice fails with one line)."""
        from .backends import warn

        if self.backend == "onnx":
            return _load_onnx(onnx_path, device, threads)
        from .openvino_engine import OpenVinoCompileError

        try:
            return _load_onnx(onnx_path, "cpu", threads, engine=self.backend)
        except OpenVinoCompileError as err:  # a damaged file is not retried: it fails on every engine
            if not chosen_by_auto:
                raise
            warn(f"{err}; running it on onnxruntime")
            self.backend = "onnx"
            return _load_onnx(onnx_path, device, threads)

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

    @property
    def has_boxes(self) -> bool:
        """The model has a box head (its card says how boxes are reported)."""
        return self.card.boxes is not None and (self.session is None or BOX_MAPS[0] in self._onnx_outputs)

    @property
    def box_settings(self):
        from ..core.boxes import BoxSettings

        return BoxSettings.from_card(self.card.boxes) if self.has_boxes else None

    @property
    def _onnx_outputs(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the network for a uint8 (N, S, S) batch, by name (logits, embedding, box maps)."""
        batch = self._check(batch)
        if self.session is not None:
            x = (batch.astype(np.float32) / np.float32(255.0))[:, None]
            names = self._onnx_outputs
            out = dict(zip(names, self.session.run(names, {ONNX_INPUT: x})))
        else:
            import torch

            with torch.inference_mode():
                out = {k: v.float().cpu().numpy() for k, v in self._net.forward_outputs(self.to_tensor(batch)).items()}
        out["abnormal_logit"] = np.asarray(out["abnormal_logit"]).reshape(-1)
        return out

    def logits(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.outputs(batch)
        return out["abnormal_logit"], np.asarray(out["body_part_logits"])

    def predict_arrays(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pred = self.predict_batch(batch, boxes=False)
        return pred.prob, pred.parts

    def predict_batch(self, batch: np.ndarray, boxes: bool = True, box_settings=None,
                      tta: str | None = None) -> BatchPrediction:
        """Probabilities, embedding and (with a box head, when ``boxes``) boxes for a uint8 (N, S, S) batch.

        ``box_settings`` (core/boxes.py BoxSettings) overrides the card's operating point
        (evaluation traces FROC and AP from a low threshold and more detections per image). Under test-time
        augmentation (``tta``: this predictor's unless given) the probabilities average the views
        (:func:`tta_views`); boxes and the embedding come from the image as given.
        """
        out = self.outputs(batch)
        prob, parts = sigmoid(out["abnormal_logit"]), softmax(out["body_part_logits"])
        views = tta_views(np.asarray(batch), self.tta if tta is None else tta)
        # Mirrored and turned images are equally plausible radiographs (left and right limbs, films
        # scanned on their side); average the probabilities over the views, one engine call per view
        # so that the engine's arena stays at one batch.
        for view in views:
            abn_v, bp_v = self.logits(view)
            prob, parts = prob + sigmoid(abn_v), parts + softmax(bp_v)
        if views:
            prob, parts = prob / (len(views) + 1), parts / (len(views) + 1)
        found = None
        if boxes and self.has_boxes:
            found = decode_output_boxes(out, box_settings or self.box_settings)
        return BatchPrediction(prob, parts, out.get("embedding"), found, out)

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

    def __init__(self, models: Sequence[str | os.PathLike], device: str = "auto", tta: str | None = None,
                 backend: str = "auto", threads: int | None = None) -> None:
        if not models:
            raise BonexrayError("an ensemble needs at least one model")
        first = Predictor(models[0], device=device, tta=tta, backend=backend, threads=threads)
        # Every member reads the same views: the first one's TTA (its card's, unless given).
        self.members = [first] + [Predictor(m, device=device, tta=first.tta, backend=backend, threads=threads)
                                  for m in models[1:]]
        for m in self.members[1:]:
            if m.image_size != first.image_size or m.body_parts != first.body_parts:
                raise BonexrayError(
                    f"{m.path}: cannot ensemble with {first.path}: image size {m.image_size} vs {first.image_size}, "
                    f"body parts {m.body_parts} vs {first.body_parts}"
                )
        self.tta, self.card, self.path, self.device = first.tta, first.card, first.path, first.device

    @property
    def image_size(self) -> int:
        return self.members[0].image_size

    @property
    def body_parts(self) -> list[str]:
        return self.members[0].body_parts

    @property
    def threshold(self) -> float:
        return float(np.mean([m.threshold for m in self.members]))

    @property
    def has_boxes(self) -> bool:
        return all(m.has_boxes for m in self.members)

    @property
    def box_settings(self):
        return self.members[0].box_settings if self.has_boxes else None

    def predict_arrays(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pred = self.predict_batch(batch, boxes=False)
        return pred.prob, pred.parts

    def predict_batch(self, batch: np.ndarray, boxes: bool = True, box_settings=None,
                      tta: str | None = None) -> BatchPrediction:
        """Members' probabilities averaged; boxes decoded from the members' averaged box maps (score and
        centre-ness probabilities and distances averaged cell by cell: every member has the same grid).
        The embedding is the first member's (the members' feature spaces differ)."""
        preds = [m.predict_batch(batch, boxes=False, tta=tta) for m in self.members]
        outs = [p.outputs for p in preds]
        found = None
        if boxes and self.has_boxes:
            def logit(p):
                p = np.clip(p, 1e-7, 1 - 1e-7)
                return np.log(p) - np.log1p(-p)

            mean = {k: np.mean([sigmoid(o[k]) for o in outs], axis=0) for k in ("box_logits", "box_centerness")}
            avg = {"box_logits": logit(mean["box_logits"]), "box_centerness": logit(mean["box_centerness"]),
                   "box_ltrb": np.mean([o["box_ltrb"] for o in outs], axis=0)}
            found = decode_output_boxes(avg, box_settings or self.box_settings)
        return BatchPrediction(np.mean([p.prob for p in preds], axis=0), np.mean([p.parts for p in preds], axis=0),
                               preds[0].embedding, found)


def _onnx_device(device: str | None) -> str:
    """Where an ONNX file runs: ``auto`` -> cuda when onnxruntime has its CUDA provider, else cpu."""
    if device not in (None, "", "auto"):
        return str(device)
    try:
        import onnxruntime as ort
    except ImportError:
        return "cpu"
    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def _check_model_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: model file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")


def _load_onnx(path: Path | OnnxFile, device: str, threads: int | None = None, engine: str = "onnx"):
    """(card, session) for an ONNX file on ``engine``: ``onnx`` (onnxruntime) or an OpenVINO engine
    (inference/openvino_engine.py, the same session interface); the card is checked against the graph.
    ``path``: a file, or one already read and verified (inference/onnx_file.py), which is not read again."""
    from .onnx_file import OnnxFile, read_onnx

    if not isinstance(path, OnnxFile):
        _check_model_file(path)
        path = read_onnx(path)
    verified: OnnxFile = path
    path = verified.path
    if engine != "onnx":
        from .openvino_engine import PRECISIONS, OpenVinoSession

        return _card_of_session(verified, OpenVinoSession(path, PRECISIONS[engine], threads, verified.metadata))
    try:
        import onnxruntime as ort
    except ImportError as err:  # a declared dependency, but say so clearly
        raise CheckpointError(f"{path}: ONNX model, but onnxruntime is not installed") from err
    providers = ["CPUExecutionProvider"]
    if device not in ("cpu",) and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    elif str(device).startswith("cuda"):
        raise BonexrayError(f"--device {device}: onnxruntime has no CUDA provider here")
    from .backends import ort_session_options

    opts = ort_session_options(threads)
    try:
        session = ort.InferenceSession(verified.data, sess_options=opts, providers=providers)
    except Exception as err:
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"{path}: not a readable ONNX model ({first})") from err
    return _card_of_session(verified, session)


def _card_of_session(verified: OnnxFile, session):
    """The verified file's model card, checked against the session's signature and graph."""
    path = verified.path
    card = verified.card
    names_in = [i.name for i in session.get_inputs()]
    names_out = [o.name for o in session.get_outputs()]
    if names_in != [ONNX_INPUT] or any(n not in names_out for n in ONNX_OUTPUTS):
        raise CheckpointError(
            f"{path}: unexpected ONNX signature inputs={names_in} outputs={names_out} "
            f"(want {ONNX_INPUT} -> {', '.join(ONNX_OUTPUTS)})"
        )
    _check_card_against_graph(path, card, session)
    return card, session


def _check_card_against_graph(path: Path, card, session) -> None:
    """The card must describe the graph: its image size is the graph's input, its class names the body-part
    outputs (fewer names than outputs would drop probabilities; none would fail per image)."""
    shape_in = list(session.get_inputs()[0].shape)
    fixed = [d for d in shape_in[2:] if isinstance(d, int)]
    if len(shape_in) != 4 or any(d != card.image_size for d in fixed):
        raise CheckpointError(f"{path}: the model card says image_size {card.image_size} but the graph takes input "
                              f"{shape_in}")
    out = {o.name: list(o.shape) for o in session.get_outputs()}
    k = out[ONNX_OUTPUTS[1]][-1] if out[ONNX_OUTPUTS[1]] else None
    if isinstance(k, int) and k != len(card.body_parts):
        raise CheckpointError(f"{path}: the model card names {len(card.body_parts)} body parts but the graph has {k} "
                              "body-part outputs")
