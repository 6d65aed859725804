"""Fracture boxes from the box head's dense maps, in numpy: what the ONNX engines use, so they need no torch.

The same decoding as :func:`bonexray.model.detection.decode_boxes` (which training and the torch
engine use): score = sqrt(sigmoid(cls) * sigmoid(centerness)) per stride-``stride`` cell, cells at or
above the threshold (at most 1000 best before NMS), boxes from the cell centre and the ``ltrb``
distances, clipped to the tile, empty boxes dropped, greedy non-maximum suppression at ``nms_iou``
(torchvision's rule: a box is dropped when its IoU with a kept, better box is above the limit), at
most ``max_detections`` per image, best first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Stride of the grid the boxes are predicted on, in tile pixels.
BOX_STRIDE = 8
#: Candidates kept before NMS: enough for max_detections survivors without sorting the whole grid.
MAX_CANDIDATES = 1000


@dataclass(frozen=True)
class BoxSettings:
    """How dense maps become reported boxes; stored in the model card under ``boxes``.

    ``threshold``: the operating point (a box is reported when its score reaches it); ``nms_iou``:
    boxes overlapping a better one by more than this are dropped; ``max_detections``: per image.
    """

    threshold: float = 0.3
    nms_iou: float = 0.5
    max_detections: int = 10
    stride: int = BOX_STRIDE

    @classmethod
    def from_card(cls, d: dict | None) -> "BoxSettings":
        d = dict(d or {})
        return cls(threshold=float(d.get("threshold", cls.threshold)), nms_iou=float(d.get("nms_iou", cls.nms_iou)),
                   max_detections=int(d.get("max_detections", cls.max_detections)), stride=int(d.get("stride", BOX_STRIDE)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def cell_centres(h: int, w: int, stride: int) -> np.ndarray:
    """(h*w, 2) x, y of each grid cell's centre in tile pixels, row-major."""
    ys = (np.arange(h, dtype=np.float32) + 0.5) * stride
    xs = (np.arange(w, dtype=np.float32) + 0.5) * stride
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx.reshape(-1), gy.reshape(-1)], 1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_limit: float, limit: int | None = None) -> np.ndarray:
    """Indices of the boxes kept by greedy NMS, best score first; with ``limit``, the first ``limit`` of
    them (the greedy pass stops there: later boxes never change which better ones are kept)."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    x0, y0, x1, y1 = (np.ascontiguousarray(boxes[:, k]) for k in range(4))
    kept = []
    while order.size and (limit is None or len(kept) < limit):
        i = order[0]
        kept.append(i)
        rest = order[1:]
        w = np.maximum(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0)
        h = np.maximum(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0)
        inter = w * h
        iou = inter / (area[i] + area[rest] - inter)
        order = rest[~(iou > iou_limit)]
    return np.asarray(kept, dtype=np.int64)


def decode_boxes(box_logits: np.ndarray, box_ltrb: np.ndarray, box_centerness: np.ndarray,
                 settings: BoxSettings) -> list[np.ndarray]:
    """Dense maps of a batch ((B, 1, H, W), (B, 4, H, W), (B, 1, H, W)) -> per image an (n, 5) float32 array
    [x0, y0, x1, y1, score] in tile pixels, best first, at ``settings``."""
    threshold, stride = settings.threshold, settings.stride
    b, _, h, w = box_logits.shape
    centres = cell_centres(h, w, stride)
    logits = np.asarray(box_logits, dtype=np.float32).reshape(b, -1)
    centerness = np.asarray(box_centerness, dtype=np.float32).reshape(b, -1)
    scores = np.sqrt(_sigmoid(logits) * _sigmoid(centerness)).astype(np.float32)
    ltrb = np.asarray(box_ltrb, dtype=np.float32).reshape(b, 4, -1).transpose(0, 2, 1)
    size = float(h * stride)
    out = []
    for i in range(b):
        s = scores[i]
        keep = np.flatnonzero(np.isfinite(s) & (s >= threshold))
        if keep.size > MAX_CANDIDATES:
            keep = keep[np.argsort(-s[keep], kind="stable")[:MAX_CANDIDATES]]
        c, d = centres[keep], ltrb[i, keep]
        boxes = np.clip(np.stack([c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2], c[:, 1] + d[:, 3]], 1), 0, size)
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, sc = boxes[ok], s[keep][ok]
        kept = nms(boxes, sc, settings.nms_iou, limit=settings.max_detections)
        out.append(np.concatenate([boxes[kept], sc[kept, None]], 1).astype(np.float32))
    return out
