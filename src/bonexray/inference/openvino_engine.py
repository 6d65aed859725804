"""OpenVINO as an ONNX engine, behind the part of onnxruntime's session interface that
:class:`bonexray.inference.predictor.Predictor` uses (``run``, ``get_inputs``, ``get_outputs``,
``get_providers``, ``get_modelmeta``), so the outputs by name, boxes, embedding, scope gate,
ensembles and TTA work unchanged.

It reads the same ONNX file as onnxruntime (a checkpoint's cached export or the user's file) and
compiles it for the CPU with ``INFERENCE_PRECISION_HINT`` f32 or bf16, one thread per physical core
(or ``threads``), ``PERFORMANCE_HINT`` LATENCY (one batch at a time, as predict and evaluate run).
The graph keeps its dynamic batch dimension: one compilation serves every batch size (the last,
smaller batch too). Compiling costs seconds (``bench/backends.py`` records it as ``load_s``), so a
compilation per batch shape would add that for each new size; ``bench/inference.py`` times this
engine against a static-shape compilation (row f).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

#: bonexray backend name -> OpenVINO inference precision.
PRECISIONS = {"openvino": "f32", "openvino-bf16": "bf16"}


@dataclass(frozen=True)
class PortInfo:
    """What onnxruntime's NodeArg gives: the name and the shape (ints, or a name for a dynamic dimension)."""

    name: str
    shape: list


@dataclass(frozen=True)
class ModelMeta:
    custom_metadata_map: dict


def _port(port) -> PortInfo:
    dims = [d.get_length() if d.is_static else "batch" for d in port.get_partial_shape()]
    return PortInfo(port.get_any_name(), dims)


class OpenVinoCompileError(CheckpointError):
    """OpenVINO cannot read or compile a graph that passed the integrity check (``auto`` falls back)."""


class OpenVinoSession:
    """An ONNX file compiled by OpenVINO for the CPU. ``metadata``: the file's metadata_props (the model card)."""

    def __init__(self, path: Path, precision: str, threads: int | None, metadata: dict) -> None:
        import openvino as ov

        from ..hardware import physical_cores

        self.precision = precision
        core = ov.Core()
        try:
            model = core.read_model(str(path))
            self._compiled = core.compile_model(model, "CPU", {
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": precision,
                "INFERENCE_NUM_THREADS": int(threads or physical_cores()),
            })
        except RuntimeError as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise OpenVinoCompileError(f"{path}: OpenVINO cannot compile this ONNX model ({first})") from err
        self._inputs = [_port(p) for p in self._compiled.inputs]
        self._outputs = [_port(p) for p in self._compiled.outputs]
        self._index = {o.name: i for i, o in enumerate(self._outputs)}
        self._request = self._compiled.create_infer_request()
        self._meta = ModelMeta(dict(metadata))

    def get_inputs(self) -> list[PortInfo]:
        return list(self._inputs)

    def get_outputs(self) -> list[PortInfo]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [f"OpenVINO CPU ({self.precision})"]

    def get_modelmeta(self) -> ModelMeta:
        return self._meta

    def run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs ``names`` (all when None) for the one input in ``feeds``, as onnxruntime returns them."""
        (x,) = feeds.values()
        # share_outputs=False (the default) copies the results out of the request's buffers, which
        # the next call overwrites.
        result = self._request.infer({0: np.ascontiguousarray(x)})
        names = names or [o.name for o in self._outputs]
        return [np.asarray(result[self._compiled.outputs[self._index[n]]]) for n in names]
