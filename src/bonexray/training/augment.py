"""Radiograph augmentation on batched tensors with kornia, so it runs wherever the batch is (GPU included).

Horizontal flip, then one affine warp per image (rotation, scale, shift), then mild gamma, contrast and
brightness; every image of a batch draws its own parameters. The ``standard`` preset changes no
anatomy: no vertical flips or large rotations. The ``robust`` preset adds what radiographs go through
on their way to the model: a quarter turn (a film read in the wrong orientation; with the horizontal
flip, every rotation and flip of the square tile) and JPEG re-compression (PIL, on the CPU, before
the warp, as it happens to a stored image), so that verdicts do not change under them. Fracture boxes, when given, go through the
same flip and warp as their image and are clipped to the tile: with each fracture's outline (polygon
points), the new box is the one around the warped outline, which stays tight under rotation; without
one, kornia's ``bbox_xyxy`` key makes it the axis-aligned box around the warped corners, which a
rotation enlarges.
"""
from __future__ import annotations

import io
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


@dataclass(frozen=True)
class AugmentConfig:
    hflip: float = 0.5  # probability
    max_rotation_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.025  # largest shift, as a fraction of the image side
    contrast: float = 0.15  # factor in [1 - c, 1 + c], around each image's mean
    brightness: float = 0.08  # added, in [-b, b]
    gamma: float = 0.15  # exponent in [exp(-g), exp(g)]
    quarter_turn: float = 0.0  # probability of a turn by 90, 180 or 270 degrees (equally likely)
    jpeg: float = 0.0  # probability of JPEG re-compression
    jpeg_quality: tuple[int, int] = (30, 95)  # quality drawn uniformly in this range (inclusive)


@lru_cache(maxsize=8)
def _pipeline(cfg: AugmentConfig, with_boxes: bool, with_points: bool = False):
    import kornia.augmentation as K

    steps = []
    if cfg.hflip > 0:
        steps.append(K.RandomHorizontalFlip(p=cfg.hflip))
    steps.append(K.RandomAffine(degrees=cfg.max_rotation_deg, translate=(cfg.translate, cfg.translate),
                                scale=cfg.scale, padding_mode="zeros", align_corners=False, p=1.0))
    if cfg.gamma > 0:
        steps.append(K.RandomGamma(gamma=(float(torch.tensor(-cfg.gamma).exp()), float(torch.tensor(cfg.gamma).exp())), p=1.0))
    if cfg.contrast > 0:  # ColorJitter's contrast blends with the mean (RandomContrast would only multiply)
        steps.append(K.ColorJitter(contrast=cfg.contrast, order=[1], p=1.0))
    if cfg.brightness > 0:
        steps.append(K.RandomBrightness(brightness=(1 - cfg.brightness, 1 + cfg.brightness), p=1.0))
    keys = ["input"] + (["keypoints"] if with_points else ["bbox_xyxy"] if with_boxes else [])
    return K.AugmentationSequential(*steps, data_keys=keys)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig = AugmentConfig(), generator: torch.Generator | None = None,
                  boxes: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                  polygons: torch.Tensor | None = None):
    """x: (B,1,H,W) float in [0,1] -> augmented batch, same shape, clamped to [0,1].

    With ``boxes`` (B,M,4) xyxy tile pixels (padded; ``valid`` (B,M) bool says which are real), returns
    (x, boxes, valid): the boxes get the same flip and warp as their image, clipped to the tile; a box
    pushed out of the tile (under 2 px on a side after clipping) becomes invalid. With ``polygons``
    (B,M,P,2) x, y outline points of each box in tile pixels (datamodule's ``outline_points``), the
    boxes returned are those around the warped outlines instead. Random parameters
    come from the global torch RNG (seeded by training's ``--seed``), or from ``generator`` (a CPU
    generator) when given.
    """
    pipeline = _pipeline(cfg, boxes is not None, polygons is not None and boxes is not None)
    if cfg.jpeg > 0 or cfg.quarter_turn > 0:
        with _rng(generator):
            if cfg.jpeg > 0:
                x = _recompress(x, cfg)
            if cfg.quarter_turn > 0:
                x, boxes, polygons = _quarter_turns(x, cfg.quarter_turn, boxes, polygons)
    if boxes is not None and polygons is not None:
        # kornia's points are pixel-centre coordinates (a flip maps x to w - 1 - x); ours are continuous
        # (pixel edges at integers), hence the half-pixel shifts.
        b, m, p = polygons.shape[:3]
        inputs = (x, polygons.to(x.dtype).reshape(b, m * p, 2) - 0.5)
    elif boxes is not None:
        # kornia treats xyxy as inclusive pixel corners (width = x1 - x0 + 1); ours are exclusive edges.
        # Padding rows get a harmless 2-px box: kornia refuses zero-size boxes.
        pad = torch.tensor([0.0, 0.0, 2.0, 2.0], device=boxes.device, dtype=x.dtype)
        b = torch.where(valid[..., None], boxes.to(x.dtype), pad)
        b = b - torch.tensor([0.0, 0.0, 1.0, 1.0], device=b.device, dtype=b.dtype)
        inputs = (x, b)
    else:
        inputs = (x,)
    with _rng(generator):
        out = pipeline(*inputs)
    if boxes is None:
        return out.clamp(0, 1)
    h, w = x.shape[-2:]
    if polygons is not None:
        pts = (out[1] + 0.5).reshape(polygons.shape)
        b = torch.cat([pts.amin(dim=2), pts.amax(dim=2)], -1)
    else:
        b = out[1] + torch.tensor([0.0, 0.0, 1.0, 1.0], device=out[1].device, dtype=out[1].dtype)
    b = torch.stack([b[..., 0].clamp(0, w), b[..., 1].clamp(0, h), b[..., 2].clamp(0, w), b[..., 3].clamp(0, h)], -1)
    valid = valid & ((b[..., 2] - b[..., 0]) >= 2) & ((b[..., 3] - b[..., 1]) >= 2)
    return out[0].clamp(0, 1), b, valid


@contextmanager
def _rng(generator: torch.Generator | None):
    """Draw from the global CPU RNG, or from ``generator``'s stream (advancing it) when given: kornia
    only knows the global one."""
    if generator is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(generator.get_state())
        yield
        generator.set_state(torch.get_rng_state())


def _recompress(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """JPEG-encode and decode the images drawn (probability ``cfg.jpeg``) at a quality drawn from
    ``cfg.jpeg_quality``; PIL's codec is the one real files went through (kornia's differentiable
    codec needs three channels and costs far more)."""
    from PIL import Image

    chosen = torch.rand(x.shape[0]) < cfg.jpeg
    qualities = torch.randint(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1, (x.shape[0],))
    idx = torch.nonzero(chosen).flatten()
    if not len(idx):
        return x
    # One copy to the host and one back for all the drawn images (the codec runs on the CPU).
    tiles = (x[idx.to(x.device), 0].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    decoded = []
    for tile, quality in zip(tiles, qualities[idx].tolist(), strict=True):
        buf = io.BytesIO()
        Image.fromarray(tile).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        decoded.append(np.array(Image.open(buf).convert("L")))
    out = x.clone()
    out[idx.to(x.device), 0] = torch.from_numpy(np.stack(decoded)).to(x.device, x.dtype) / 255.0
    return out


def _turn_points(pts: torch.Tensor, k: int, side: float) -> torch.Tensor:
    """(..., 2) x, y in continuous tile pixels -> where ``torch.rot90(tile, k, dims=(-2, -1))`` puts
    them (counter-clockwise turns of a square tile of ``side`` pixels)."""
    x, y = pts[..., 0], pts[..., 1]
    for _ in range(k % 4):
        x, y = y, side - x
    return torch.stack([x, y], -1)


def _quarter_turns(x: torch.Tensor, p: float, boxes: torch.Tensor | None, polygons: torch.Tensor | None):
    """Turn each image drawn (probability ``p``) by 90, 180 or 270 degrees, with its boxes and outlines."""
    h, w = x.shape[-2:]
    if h != w:
        raise ValueError(f"quarter turns need square tiles, got {h}x{w}")
    turns = torch.where(torch.rand(x.shape[0]) < p, torch.randint(1, 4, (x.shape[0],)), torch.zeros(x.shape[0], dtype=torch.long))
    if not bool(turns.any()):
        return x, boxes, polygons
    x = x.clone()
    boxes = boxes.clone() if boxes is not None else None
    polygons = polygons.clone() if polygons is not None else None
    for k in (1, 2, 3):  # one call per turn, over every image drawn for it
        idx = torch.nonzero(turns == k).flatten().to(x.device)
        if not len(idx):
            continue
        x[idx] = torch.rot90(x[idx], k, dims=(-2, -1))
        if boxes is not None:
            corners = _turn_points(boxes[idx].to(torch.float32).unflatten(-1, (2, 2)), k, float(w))
            boxes[idx] = torch.cat([corners.amin(-2), corners.amax(-2)], -1).to(boxes.dtype)
        if polygons is not None:
            polygons[idx] = _turn_points(polygons[idx].to(torch.float32), k, float(w)).to(polygons.dtype)
    return x, boxes, polygons
