"""BoneXrayNet: one backbone, two heads (abnormal yes/no, body part).

Input is (B, 1, H, W) float grayscale in [0, 1]. Channel replication and the backbone's
normalisation happen inside ``forward`` (as registered buffers), so training, predict, ONNX
and the web app all feed the network the same thing.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from bonexray.errors import BonexrayError, WeightsUnavailableError
from bonexray.model import weights as _weights
from bonexray.model.registry import DEFAULT_BACKBONE, get_backbone_spec


class BoneXrayNet(nn.Module):
    """Backbone + abnormality head (1 logit) + body-part head (K logits).

    Args:
        backbone: registry name (see ``list_backbones()``) or any timm model name.
        num_body_parts: K, size of the body-part head (MURA has 7 body parts).
        pretrained: ``"imagenet"`` or ``None``/``"none"`` (random init). Ignored when
            ``weights`` is given, so a local file never triggers a download.
        weights: local state_dict file: of the timm backbone, or of a whole BoneXrayNet
            (also accepted inside ``{"state_dict": ...}`` with Lightning's ``net.`` prefix).
        dropout: dropout on the pooled features before both heads.
        mean, std: override the backbone's normalisation (load_model passes the model card's).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        num_body_parts: int = 7,
        pretrained: str | bool | None = "imagenet",
        weights: str | os.PathLike | None = None,
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        localization_head: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(num_body_parts, int) or num_body_parts < 1:
            raise BonexrayError(f"num_body_parts must be a positive integer, got {num_body_parts!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise BonexrayError(f"dropout must be in [0, 1), got {dropout!r}")
        spec = get_backbone_spec(backbone)
        self.backbone_name = spec.name
        self.num_body_parts = num_body_parts
        self.mean = [float(v) for v in (mean if mean is not None else spec.mean)]
        self.std = [float(v) for v in (std if std is not None else spec.std)]
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise BonexrayError(f"mean/std must be 3 values (std > 0), got {self.mean} / {self.std}")

        self.backbone = spec.build(None if weights is not None else pretrained, num_classes=0)
        self.num_features = int(self.backbone.num_features)
        self.dropout = nn.Dropout(float(dropout)) if dropout > 0 else nn.Identity()
        self.abnormal_head = nn.Linear(self.num_features, 1)
        self.body_part_head = nn.Linear(self.num_features, num_body_parts)
        # Fracture map, present in models trained with the localisation loss (--localization-weight):
        # a 1x1 conv on the last feature map. Not part of ``forward``, so ONNX and predict outputs stay two.
        self.localization_head = nn.Conv2d(self.num_features, 1, 1) if localization_head else None

        # Shape (1, 3, 1, 1): broadcasting a (B, 1, H, W) input against them replicates the
        # gray channel to 3 and normalises in one op. Not persistent: they follow from the
        # backbone/model card, so state dicts stay "backbone + heads" only; ONNX still bakes
        # them in as constants.
        self.register_buffer("pixel_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self._cam_target_name = ""

        if weights is not None:
            self.load_weights_file(weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, H, W) in [0, 1] -> (abnormal_logit (B,), body_part_logits (B, K))."""
        return self.forward_heads(self.forward_features(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> the backbone's last feature map (B, C, h, w), before pooling.

        Training uses it for auxiliary heads on the map (fracture localisation).
        """
        return self.backbone.forward_features((x - self.pixel_mean) / self.pixel_std)

    def forward_heads(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.dropout(self.backbone.forward_head(feature_map, pre_logits=True))
        # Index instead of squeeze: keeps shape (B,) for B == 1 too.
        return self.abnormal_head(pooled)[:, 0], self.body_part_head(pooled)

    def localization_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> fracture probability per feature-grid cell (B, 1, h, w)."""
        if self.localization_head is None:
            raise BonexrayError("this model has no localisation head (train it with --localization-weight on data with boxes)")
        return torch.sigmoid(self.localization_head(self.forward_features(x)))

    def cam_target_layer(self) -> nn.Module:
        """The backbone module to hook for Grad-CAM (last conv block / feature stage)."""
        if not self._cam_target_name:
            target = get_backbone_spec(self.backbone_name).cam_target(self.backbone)
            # Cache by name: storing the module itself would register it twice.
            names = {id(m): n for n, m in self.named_modules()}
            if id(target) not in names:
                raise BonexrayError(f"CAM target of '{self.backbone_name}' is not part of the network")
            self._cam_target_name = names[id(target)]
        return self.get_submodule(self._cam_target_name)

    def load_weights_file(self, path: str | os.PathLike) -> None:
        """Load a local state_dict: the timm backbone's, or a whole BoneXrayNet's.

        The backbone must fit exactly. Heads from a whole-net file are loaded when their
        shapes fit; otherwise (e.g. a different number of body parts) they stay freshly
        initialised, with a warning, so a trained model can seed fine-tuning.
        """
        source = str(path)
        state = _weights.read_state_dict_file(path)
        if any(k.startswith("net.") for k in state):  # Lightning / bonexray checkpoint
            state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        if "abnormal_head.weight" in state or all(k.startswith("backbone.") for k in state):
            backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
            head_state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
            _weights.load_backbone_state(self.backbone, backbone_state, source)
            self._load_heads(head_state, source)
        else:
            _weights.load_backbone_state(self.backbone, state, source)

    def _load_heads(self, head_state: Mapping[str, torch.Tensor], source: str) -> None:
        if not head_state:
            return
        # The fracture map is optional on either side: one the file has and this net lacks is
        # dropped, one this net has and the file lacks stays freshly initialised.
        loc = "localization_head."
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
        head_state = {k: v for k, v in head_state.items() if not k.startswith(loc) or k in own}
        own = {k: v for k, v in own.items() if not k.startswith(loc) or k in head_state}
        unexpected = [k for k in head_state if k not in own]
        if unexpected:
            raise WeightsUnavailableError(
                f"{source}: does not fit BoneXrayNet: unexpected keys {', '.join(unexpected[:5])}"
            )
        fits = set(head_state) == set(own) and all(
            tuple(head_state[k].shape) == tuple(v.shape) for k, v in own.items()
        )
        if fits:
            self.load_state_dict(head_state, strict=False)
        else:
            warnings.warn(
                f"{source}: head shapes differ from this network "
                f"({self.num_body_parts} body parts); loaded the backbone only",
                stacklevel=3,
            )

    def extra_repr(self) -> str:
        return f"backbone={self.backbone_name!r}, num_body_parts={self.num_body_parts}"
