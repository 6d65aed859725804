"""The bonexray ONNX file format's names: a leaf module (no bonexray imports), so the exporter, the
loader and the backends read one definition without importing each other."""
from __future__ import annotations

ONNX_CARD_KEY = "bonexray_model_card"
ONNX_HASH_KEY = "bonexray_graph_sha256"
ONNX_INPUT = "image"
#: Outputs every bonexray ONNX file has; newer exports add ``embedding`` and, with a box head, the
#: box maps (model/detection.py BOX_OUTPUTS), all read by name.
ONNX_OUTPUTS = ("abnormal_logit", "body_part_logits")
