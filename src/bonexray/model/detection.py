"""Fracture boxes: a small FCOS-style detection head on the backbone's intermediate and final features.

One forward pass of :class:`~bonexray.model.network.BoneXrayNet` gives abnormality, body part and,
with this head, three dense maps on one grid (stride 8 by default, or stride 4 for small fractures;
the model card's ``boxes.stride`` says which): a fracture score logit, the distances from
each cell centre to the box's left, top, right and bottom edges (tile pixels), and a centre-ness
logit (Tian et al., "FCOS", 2019). The maps are what the network (and its ONNX export) outputs;
:func:`decode_boxes` turns them into scored, non-maximum-suppressed boxes the same way for every
engine, so a checkpoint and its export give the same boxes.

Training targets follow FCOS with centre sampling on one level: a cell is positive when its centre
lies inside a box and within ``CENTER_RADIUS`` strides of the box centre (the smallest box wins);
a box too small to hold any cell centre gets the cell nearest its centre.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.boxes import BOX_STRIDE, BoxSettings

#: Grid strides a box head can predict on; the head fuses the backbone's levels from this stride to 32.
BOX_STRIDES = (4, 8)
#: Tower width per grid stride: the stride-4 grid has 4x the cells, so a quarter of the channels'
#: square keeps the head's convolution cost per image the same as at stride 8.
BOX_WIDTH = {4: 32, 8: 64}
#: Centre sampling radius, in strides (FCOS's "center sampling").
CENTER_RADIUS = 1.5
#: Names of the box maps among the network's outputs (ONNX output names too).
BOX_OUTPUTS = ("box_logits", "box_ltrb", "box_centerness")


def level_strides(stride: int) -> tuple[int, ...]:
    """Strides of the backbone levels a box head of this grid stride fuses: ``stride`` up to 32."""
    return tuple(s for s in (4, 8, 16, 32) if s >= stride)


def _conv_gn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.GroupNorm(8, c_out), nn.ReLU(inplace=True))


class BoxHead(nn.Module):
    """A top-down feature pyramid (torchvision-style lateral 1x1 + nearest upsampling) fused at the
    head's stride, then a two-layer tower and FCOS's three outputs.

    ``in_channels``: channels of the backbone's feature maps from the head's stride to the final
    (stride-32) map, shallow to deep: (stride 8, 16, 32) for ``stride=8``, (4, 8, 16, 32) for ``stride=4``.
    """

    def __init__(self, in_channels: tuple[int, ...], width: int | None = None, stride: int = BOX_STRIDE) -> None:
        super().__init__()
        if stride not in BOX_STRIDES:
            raise ValueError(f"box head stride must be one of {BOX_STRIDES} (got {stride})")
        if len(in_channels) != len(level_strides(stride)):
            raise ValueError(f"a stride-{stride} box head takes {len(level_strides(stride))} feature maps (got {len(in_channels)})")
        width = BOX_WIDTH[stride] if width is None else int(width)
        self.stride = int(stride)
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.smooth = _conv_gn(width, width)
        self.tower = nn.Sequential(_conv_gn(width, width), _conv_gn(width, width))
        self.cls = nn.Conv2d(width, 1, 3, padding=1)
        self.ltrb = nn.Conv2d(width, 4, 3, padding=1)
        self.centerness = nn.Conv2d(width, 1, 3, padding=1)
        # Start with few positives (focal-loss prior, FCOS/RetinaNet): p = 0.01 everywhere.
        nn.init.constant_(self.cls.bias, -4.595)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.normal_(self.ltrb.weight, std=0.01)
        # exp(b) * stride: about a fracture's half-size at 320 px (22 px at stride 8, 9 px at stride 4).
        nn.init.constant_(self.ltrb.bias, 1.0 if stride == 8 else 0.8)

    def forward(self, *features: torch.Tensor):
        """Feature maps shallow to deep (the finest at the head's stride) -> (logits, ltrb, centre-ness)."""
        p = self.lateral[-1](features[-1])
        for k in range(len(features) - 2, -1, -1):
            p = self.lateral[k](features[k]) + F.interpolate(p, size=features[k].shape[-2:], mode="nearest")
        t = self.tower(self.smooth(p))
        # Distances in tile pixels; exp keeps them positive, the clamp keeps fp16/bf16 finite.
        ltrb = torch.exp(self.ltrb(t).float().clamp(max=6.0)) * self.stride
        return self.cls(t), ltrb, self.centerness(t)


def cell_centres(h: int, w: int, stride: int, device=None) -> torch.Tensor:
    """(h*w, 2) x, y of each grid cell's centre in tile pixels, row-major."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)


def decode_boxes(box_logits: torch.Tensor, box_ltrb: torch.Tensor, box_centerness: torch.Tensor,
                 settings: BoxSettings, threshold: float | None = None) -> list[torch.Tensor]:
    """Dense maps of a batch -> per image an (n, 5) tensor [x0, y0, x1, y1, score] in tile pixels,
    after NMS, sorted by score (highest first), at most ``settings.max_detections``.

    score = sqrt(sigmoid(cls) * sigmoid(centerness)) (FCOS's ranking score). ``threshold``
    overrides the operating point (evaluation uses a low one to trace FROC and AP).
    """
    from torchvision.ops import nms

    thr = settings.threshold if threshold is None else float(threshold)
    b, _, h, w = box_logits.shape
    centres = cell_centres(h, w, settings.stride, box_logits.device)
    scores = torch.sqrt(torch.sigmoid(box_logits.float()) * torch.sigmoid(box_centerness.float())).reshape(b, -1)
    ltrb = box_ltrb.float().reshape(b, 4, -1).transpose(1, 2)
    out = []
    for i in range(b):
        s = scores[i]
        keep = torch.nonzero(torch.isfinite(s) & (s >= thr)).reshape(-1)
        # Candidates before NMS: enough for max_detections survivors without sorting the whole grid.
        if keep.numel() > 1000:
            keep = keep[torch.topk(s[keep], 1000).indices]
        c, d = centres[keep], ltrb[i, keep]
        boxes = torch.stack([c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2], c[:, 1] + d[:, 3]], 1)
        size = float(h * settings.stride)
        boxes = boxes.clamp(0, size)
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, sc = boxes[ok], s[keep][ok]
        kept = nms(boxes, sc, settings.nms_iou)[: settings.max_detections]  # sorted by score
        out.append(torch.cat([boxes[kept], sc[kept, None]], 1))
    return out


def fcos_targets(boxes: torch.Tensor, valid: torch.Tensor, h: int, w: int, stride: int = BOX_STRIDE):
    """Training targets on an h x w grid for a batch of padded boxes.

    ``boxes`` (B, M, 4) xyxy tile pixels, ``valid`` (B, M) bool. Returns ``positive`` (B, N) bool,
    ``ltrb`` (B, N, 4) target distances, ``centerness`` (B, N) target in [0, 1] (N = h*w); the last two
    are meaningful on positives only.
    """
    centres = cell_centres(h, w, stride, boxes.device)  # (N, 2)
    x, y = centres[None, :, None, 0], centres[None, :, None, 1]  # (1, N, 1)
    x0, y0, x1, y1 = (boxes[:, None, :, k] for k in range(4))  # (B, 1, M)
    l, t, r, b = x - x0, y - y0, x1 - x, y1 - y  # (B, N, M)
    inside = (torch.minimum(torch.minimum(l, r), torch.minimum(t, b)) > 0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    radius = CENTER_RADIUS * stride
    near = ((x - cx).abs() <= radius) & ((y - cy).abs() <= radius)
    match = inside & near & valid[:, None, :]
    # A box with no matching cell (smaller than a cell) gets the cell nearest its centre.
    dist = (x - cx) ** 2 + (y - cy) ** 2  # (B, N, M)
    nearest = dist.argmin(dim=1)  # (B, M)
    orphan = valid & ~match.any(dim=1)
    if bool(orphan.any()):
        bi, mi = torch.nonzero(orphan, as_tuple=True)
        match[bi, nearest[bi, mi], mi] = True
    area = ((x1 - x0) * (y1 - y0)).expand_as(match)
    area = torch.where(match, area, torch.full_like(area, float("inf")))
    best = area.argmin(dim=2)  # (B, N): the smallest matching box
    positive = match.any(dim=2)
    gather = best[..., None]
    ltrb = torch.stack([l, t, r, b], -1).gather(2, gather[..., None].expand(-1, -1, 1, 4))[:, :, 0]
    ltrb = ltrb.clamp(min=0.5)  # cells assigned as "nearest" may sit on the box edge
    lr, tb = ltrb[..., [0, 2]], ltrb[..., [1, 3]]
    centerness = torch.sqrt((lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values))
    return positive, ltrb, centerness


#: What the third map (``box_centerness``) learns: FCOS's centre-ness of the cell in its box, or the
#: IoU of the cell's predicted box with its fracture box (IoU-aware scoring: the ranking score
#: sqrt(p * quality) then favours well-fitting boxes, not just central cells).
BOX_QUALITIES = ("centerness", "iou")


def box_loss(box_logits: torch.Tensor, box_ltrb: torch.Tensor, box_centerness: torch.Tensor,
             boxes: torch.Tensor, valid: torch.Tensor, known: torch.Tensor, stride: int = BOX_STRIDE,
             quality: str = "centerness") -> torch.Tensor:
    """FCOS's loss on the images whose fracture boxes are known (annotated fractures, and images
    without a fracture, which have none): sigmoid focal loss on every cell, GIoU on positive cells
    (weighted by the centre-ness target), BCE on centre-ness at positive cells. Images with a fracture
    nobody annotated are left out (``known`` False). ``stride``: the grid's (the head's ``stride``).
    ``quality`` (:data:`BOX_QUALITIES`): the third map's target, centre-ness, or the IoU of the cell's
    predicted box with its fracture box (detached, so it only teaches the quality map).
    Returns 0 when nothing is known."""
    if quality not in BOX_QUALITIES:
        raise ValueError(f"box quality must be one of {BOX_QUALITIES} (got {quality!r})")
    from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

    if not bool(known.any()):
        return (box_logits.sum() + box_ltrb.sum() + box_centerness.sum()) * 0.0  # DDP needs every parameter used
    box_logits, box_ltrb, box_centerness = box_logits[known].float(), box_ltrb[known].float(), box_centerness[known].float()
    boxes, valid = boxes[known].float(), valid[known]
    b, _, h, w = box_logits.shape
    positive, t_ltrb, t_ctr = fcos_targets(boxes, valid, h, w, stride)
    logits = box_logits.reshape(b, -1)
    n_pos = max(1.0, float(positive.sum()))
    loss_cls = sigmoid_focal_loss(logits, positive.float(), alpha=0.25, gamma=2.0, reduction="sum") / n_pos
    if not bool(positive.any()):
        return loss_cls + (box_ltrb.sum() + box_centerness.sum()) * 0.0
    centres = cell_centres(h, w, stride, logits.device)[None].expand(b, -1, -1)[positive]
    pred = box_ltrb.reshape(b, 4, -1).transpose(1, 2)[positive]
    tgt = t_ltrb[positive]

    def xyxy(d):
        return torch.stack([centres[:, 0] - d[:, 0], centres[:, 1] - d[:, 1], centres[:, 0] + d[:, 2], centres[:, 1] + d[:, 3]], 1)

    ctr = t_ctr[positive]
    pred_boxes, tgt_boxes = xyxy(pred), xyxy(tgt)
    giou = generalized_box_iou_loss(pred_boxes, tgt_boxes, reduction="none")
    loss_box = (giou * ctr).sum() / ctr.sum().clamp(min=1e-6)
    if quality == "iou":
        target_q = paired_iou(pred_boxes.detach(), tgt_boxes)
    else:
        target_q = ctr
    loss_ctr = F.binary_cross_entropy_with_logits(box_centerness.reshape(b, -1)[positive], target_q, reduction="mean")
    return loss_cls + loss_box + loss_ctr


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of a[i] with b[i] for two (n, 4) xyxy tensors (torchvision's box_iou gives all n x n pairs)."""
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area = lambda t: (t[:, 2] - t[:, 0]).clamp(min=0) * (t[:, 3] - t[:, 1]).clamp(min=0)  # noqa: E731
    return (inter / (area(a) + area(b) - inter).clamp(min=1e-6)).clamp(0, 1)


def choose_box_threshold(pairs, default: float, iou: float = 0.5) -> float:
    """The score threshold with the highest F1 of boxes on held-out images.

    ``pairs``: per image (found (n, 5) [x0, y0, x1, y1, score], truth (m, 4)), images whose boxes are
    known only. A found box is a true positive when it overlaps a not-yet-matched true box by IoU >=
    ``iou`` (greedy by score). Returns ``default`` when there is nothing to choose from.
    """
    from torchvision.ops import box_iou

    scored = []  # (score, is_true_positive)
    n_true = 0
    for found, truth in pairs:
        n_true += len(truth)
        taken = torch.zeros(len(truth), dtype=torch.bool)
        ious = box_iou(found[:, :4], truth) if len(found) and len(truth) else torch.zeros(len(found), len(truth))
        for k in range(len(found)):
            hit = False
            if len(truth):
                cand = torch.where(taken, torch.full_like(ious[k], -1.0), ious[k])
                j = int(cand.argmax())
                if float(cand[j]) >= iou:
                    taken[j], hit = True, True
            scored.append((float(found[k, 4]), hit))
    if not scored or n_true == 0:
        return float(default)
    scored.sort(key=lambda t: -t[0])
    best_f1, best_thr, tp = -1.0, float(default), 0
    for rank, (score, hit) in enumerate(scored, start=1):
        tp += int(hit)
        f1 = 2 * tp / (rank + n_true)
        if f1 > best_f1:
            best_f1, best_thr = f1, score
    return float(best_thr)
