"""The MURA paper's class-weighted BCE (per body part) plus cross-entropy for the body part."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def abnormal_class_weights(body_parts: Sequence[str], record_parts: Sequence[str], labels: Sequence[int]) -> list[list[float]]:
    """Per body part T: [w_normal, w_abnormal] = [|A_T|, |N_T|] / (|A_T| + |N_T|) (Rajpurkar et al., 2017).

    Rare labels weigh more. Parts without training images (or with one class only) fall back to the
    weights of the whole training set, so they never get a zero weight.
    """
    n_abn = sum(1 for y in labels if y == 1)
    n_all = sum(1 for y in labels if y in (0, 1))
    overall = [n_abn / n_all, 1 - n_abn / n_all] if n_all and 0 < n_abn < n_all else [0.5, 0.5]
    weights = []
    for part in body_parts:
        ys = [y for p, y in zip(record_parts, labels) if p == part and y in (0, 1)]
        a = sum(ys)
        weights.append([a / len(ys), 1 - a / len(ys)] if ys and 0 < a < len(ys) else list(overall))
    return weights


def multitask_loss(
    abnormal_logit: torch.Tensor,
    part_logits: torch.Tensor,
    abnormal: torch.Tensor,
    part: torch.Tensor,
    class_weights: torch.Tensor,
    body_part_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (total, abnormality loss, body-part loss). ``class_weights``: (K, 2) as above."""
    y = abnormal.float()
    w = class_weights[part]  # (B,2) chosen by the true body part
    weight = torch.where(y > 0.5, w[:, 1], w[:, 0])
    # The paper's weights sum to 1 per part; x2 keeps the loss on the usual BCE scale.
    loss_abn = (2 * weight * F.binary_cross_entropy_with_logits(abnormal_logit.float(), y, reduction="none")).mean()
    loss_part = F.cross_entropy(part_logits.float(), part)
    return loss_abn + body_part_weight * loss_part, loss_abn, loss_part


def boxes_to_mask(boxes: torch.Tensor, valid: torch.Tensor, size: int) -> torch.Tensor:
    """Padded boxes (B, M, 4) xyxy tile pixels -> (B, 1, size, size) float mask, 1 inside any real box.
    A box covers at least one pixel, so a tiny box never vanishes."""
    idx = torch.arange(size, device=boxes.device, dtype=torch.float32)
    b = boxes.float()
    # Pixel i is covered when floor(x0) <= i < max(floor(x0) + 1, ceil(x1)): the data loader's old rule.
    c0, r0 = b[..., 0].floor(), b[..., 1].floor()
    c1, r1 = torch.maximum(c0 + 1, b[..., 2].ceil()), torch.maximum(r0 + 1, b[..., 3].ceil())
    in_x = (idx >= c0[..., None]) & (idx < c1[..., None])  # (B, M, S)
    in_y = (idx >= r0[..., None]) & (idx < r1[..., None])
    cover = (in_y[..., :, None] & in_x[..., None, :] & valid[..., None, None]).any(dim=1)  # (B, S, S)
    return cover[:, None].float()


def localization_loss(map_logits: torch.Tensor, mask: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Auxiliary fracture-localisation loss on the backbone's feature grid.

    ``map_logits`` (B,1,h,w) from a 1x1 conv on the last feature map; ``mask`` (B,1,H,W) in [0,1] at
    image resolution; ``known`` (B,) bool: images whose fracture location is known (annotated
    fractures, and images without a fracture, whose mask is empty). A grid cell is positive when a
    box covers any of its pixels. Fracture cells are a small minority of all cells, so positives and
    negatives are averaged separately and weigh half each. Returns 0 when nothing is known.
    """
    if not bool(known.any()):
        return map_logits.sum() * 0.0  # keeps the graph (DDP needs every parameter used)
    logits = map_logits[known].float()
    target = (F.adaptive_max_pool2d(mask[known].float(), logits.shape[-2:]) > 0.5).float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pos, neg = target > 0.5, target <= 0.5
    parts = [bce[sel].mean() for sel in (pos, neg) if bool(sel.any())]
    return torch.stack(parts).mean()
