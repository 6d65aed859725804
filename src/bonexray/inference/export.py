"""``bonexray export``: a checkpoint as one self-contained ONNX file.

The graph: input ``image`` float32 (batch, 1, S, S) in [0, 1] (S = the card's image_size, batch
dynamic); outputs ``BoneXrayNet.forward_outputs`` in its order (normalisation inside):
``abnormal_logit`` (batch,), ``body_part_logits`` (batch, K), ``embedding`` (batch, C) and, for a
model with a box head, the dense box maps ``box_logits``, ``box_ltrb``, ``box_centerness``. Logits
and maps, not probabilities or boxes: the consumer applies sigmoid / softmax and decodes boxes, as
:class:`bonexray.inference.predictor.Predictor` does for both backends.
The model card (JSON) is stored in ``metadata_props`` under ``bonexray_model_card``, so the ONNX
file is all ``bonexray predict`` needs. ``bonexray_graph_sha256`` holds a SHA-256 of the graph
(nodes and weights) and the card; :func:`bonexray.inference.onnx_file.read_onnx` checks it before the model is used.

Exporter: the TorchScript-based one (``dynamo=False``). The dynamo exporter, the default since
torch 2.9, needs ``onnxscript``, which bonexray does not depend on; the TorchScript path exports
these CNNs exactly (checked below against onnxruntime). Its DeprecationWarnings are silenced here.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..errors import BonexrayError
from ..output_folder import claim_file
from .onnx_file import onnx_graph_sha256, read_onnx, verify_onnx_integrity  # noqa: F401 (re-exported)
from .onnx_format import ONNX_CARD_KEY, ONNX_HASH_KEY, ONNX_INPUT

#: Largest |torch - onnxruntime| logit difference accepted by the post-export check.
PARITY_TOL = 1e-3


def _target_path(checkpoint: Path, out: str | os.PathLike) -> Path:
    o = Path(out)
    if o.is_dir() or str(out).endswith(os.sep):
        return o / f"{checkpoint.stem}.onnx"
    return o


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, opset: int = 17, overwrite: bool = False) -> Path:
    """Export ``checkpoint`` to ``out`` (a ``.onnx`` path or an existing folder); returns the path.

    An existing ``out`` is replaced only when it is a bonexray export (or with ``overwrite``), and never
    when it is the checkpoint itself (bonexray/output_folder.py).

    Writes atomically (:func:`bonexray.atomic.atomic_write`), runs ``onnx.checker`` and
    compares onnxruntime's outputs with torch's on a batch of 2 before the file appears.
    """
    import onnx
    import torch

    from ..model.checkpoint import load_model
    from ..model.hub import resolve_model

    if not 7 <= int(opset) <= 23:
        raise BonexrayError(f"--opset {opset}: use an ONNX opset between 7 and 23 (default 17)")
    ckpt = resolve_model(checkpoint)  # a path or a bundled model's name
    target = claim_file(_target_path(ckpt, out), "export", overwrite=overwrite, inputs=[ckpt], ours=_is_bonexray_onnx)
    net, card = load_model(ckpt, map_location="cpu")
    net = net.float().eval()
    s = int(card.image_size)
    dummy = torch.rand(2, 1, s, s, generator=torch.Generator().manual_seed(0))

    names = list(net.output_names())
    graph = _OutputsInOrder(net, names)
    with atomic_write(target) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                graph,
                (dummy,),
                str(tmp),
                input_names=[ONNX_INPUT],
                output_names=names,
                dynamic_axes={ONNX_INPUT: {0: "batch"}, **{n: {0: "batch"} for n in names}},
                opset_version=int(opset),
                do_constant_folding=True,
                dynamo=False,
            )
        model = onnx.load(str(tmp))
        _describe(model, card, has_boxes=net.box_head is not None)
        onnx.checker.check_model(model)
        entry = model.metadata_props.add()
        entry.key, entry.value = ONNX_HASH_KEY, onnx_graph_sha256(model)
        onnx.save(model, str(tmp))
        _check_parity(tmp, graph, names, dummy)
    return target


def _describe(model, card, has_boxes: bool) -> None:
    """The model card and a description of the outputs into the ONNX model's metadata and doc string."""
    s = int(card.image_size)
    meta = {p.key: p.value for p in model.metadata_props}
    meta[ONNX_CARD_KEY] = json.dumps(card.to_dict())
    meta["bonexray_outputs"] = ("logits: sigmoid(abnormal_logit), softmax(body_part_logits); embedding: pooled features"
                                + ("; box maps: see bonexray.model.detection.decode_boxes" if has_boxes else ""))
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    model.producer_name = "bonexray"
    model.doc_string = (
        f"bonexray {card.backbone}: image (batch,1,{s},{s}) float in [0,1] -> "
        f"abnormal_logit (batch,), body_part_logits (batch,{len(card.body_parts)}) "
        f"[{', '.join(card.body_parts)}]"
    )


def _is_bonexray_onnx(path: Path) -> bool:
    """An ONNX file that carries a bonexray model card: what ``bonexray export`` writes."""
    try:
        return ONNX_CARD_KEY in read_onnx(path).metadata
    except BonexrayError:
        return False


def _OutputsInOrder(net, names: list[str]):
    """The network's named outputs as a tuple in a fixed order (what the ONNX graph returns)."""
    import torch

    class OutputsInOrder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            out = self.net.forward_outputs(x)
            return tuple(out[n] for n in names)

    return OutputsInOrder().eval()


def _check_parity(path: Path, graph, names: list[str], x) -> None:
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    got = sess.run(names, {ONNX_INPUT: x.numpy()})
    with torch.inference_mode():
        want = [t.numpy() for t in graph(x)]
    # Non-finite outputs are compared by position (a NaN model exports as a NaN model; predict then
    # refuses a verdict per image), finite ones by value.
    same_nan = all(np.array_equal(~np.isfinite(g), ~np.isfinite(w)) for g, w in zip(got, want))
    diff = max(float(np.max(np.abs(np.where(np.isfinite(w), g - w, 0.0)), initial=0.0)) for g, w in zip(got, want))
    if not same_nan or not np.isfinite(diff) or diff > PARITY_TOL:
        raise BonexrayError(f"ONNX export differs from the torch model (max logit difference {diff:.2e})")
