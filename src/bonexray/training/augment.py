"""Radiograph augmentation on batched tensors with kornia, so it runs wherever the batch is (GPU included).

Horizontal flip, then one affine warp per image (rotation, scale, shift), then mild gamma, contrast and
brightness; every image of a batch draws its own parameters. Nothing that changes anatomy: no vertical
flips or large rotations (body-part cues must survive). A fracture mask, when given, goes through the
same flip and warp as its image (kornia's ``AugmentationSequential`` with data keys input + mask) and
skips the intensity steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

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


@lru_cache(maxsize=8)
def _pipeline(cfg: AugmentConfig, with_mask: bool):
    import kornia.augmentation as K
    from kornia.constants import DataKey, Resample

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
    if not with_mask:
        return K.AugmentationSequential(*steps, data_keys=["input"])
    # Bilinear, not kornia's default nearest, for the mask: it is a float map whose cells count
    # as fracture above 0.5 after pooling (losses.localization_loss), so edges stay where the image's are.
    return K.AugmentationSequential(*steps, data_keys=["input", "mask"],
                                    extra_args={DataKey.MASK: {"resample": Resample.BILINEAR, "align_corners": False}})


def augment_batch(x: torch.Tensor, cfg: AugmentConfig = AugmentConfig(), generator: torch.Generator | None = None,
                  mask: torch.Tensor | None = None):
    """x: (B,1,H,W) float in [0,1] -> augmented batch, same shape, clamped to [0,1].

    With ``mask`` (B,1,H,W) float, returns (x, mask): the mask gets the same geometric warp (no
    intensity changes), so fracture boxes stay on the fracture. Random parameters come from the
    global torch RNG (seeded by training's ``--seed``), or from ``generator`` (a CPU generator) when given.
    """
    pipeline = _pipeline(cfg, mask is not None)
    inputs = (x,) if mask is None else (x, mask.to(x.dtype))
    if generator is None:
        out = pipeline(*inputs)
    else:
        # kornia draws from the global CPU RNG; run it on the generator's stream and advance that instead.
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(generator.get_state())
            out = pipeline(*inputs)
            generator.set_state(torch.get_rng_state())
    if mask is None:
        return out.clamp(0, 1)
    return out[0].clamp(0, 1), out[1]
