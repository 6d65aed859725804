"""Radiograph augmentation on batched tensors, so it runs wherever the batch is (GPU included).

Flip, small rotation and scale (one affine warp per image), then mild contrast/brightness/gamma.
Nothing that changes anatomy: no vertical flips or large rotations (body-part cues must survive).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    hflip: float = 0.5
    max_rotation_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    contrast: float = 0.15
    brightness: float = 0.08
    gamma: float = 0.15


def augment_batch(x: torch.Tensor, cfg: AugmentConfig = AugmentConfig(), generator: torch.Generator | None = None,
                  mask: torch.Tensor | None = None):
    """x: (B,1,H,W) float in [0,1] -> augmented batch, same shape, clamped to [0,1].

    With ``mask`` (B,1,H,W) float, returns (x, mask): the mask gets the same geometric warp (no
    intensity changes), so fracture boxes stay on the fracture.
    """
    b = x.shape[0]
    dev, dt = x.device, x.dtype

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=generator, device="cpu").to(dev, dt) * (hi - lo) + lo

    angle = u(-cfg.max_rotation_deg, cfg.max_rotation_deg) * (math.pi / 180)
    scale = u(*cfg.scale)
    flip = torch.where(u(0, 1) < cfg.hflip, -1.0, 1.0).to(dev, dt)
    tx, ty = u(-cfg.translate, cfg.translate), u(-cfg.translate, cfg.translate)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
    )  # (B,2,3): output->input sampling grid
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if mask is not None:
        warped = F.grid_sample(torch.cat([x, mask.to(dt)], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x, mask = warped[:, :1], warped[:, 1:]
    else:
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = torch.exp(u(-cfg.gamma, cfg.gamma)).view(b, 1, 1, 1)
    x = x.clamp(0, 1).pow(gamma)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(1 - cfg.contrast, 1 + cfg.contrast).view(b, 1, 1, 1) + mean
    x = x + u(-cfg.brightness, cfg.brightness).view(b, 1, 1, 1)
    return x.clamp(0, 1) if mask is None else (x.clamp(0, 1), mask)
