"""BoneXrayNet: one backbone, two heads (abnormal yes/no, body part).

Input is (B, 1, H, W) float grayscale in [0, 1]. Channel replication and the backbone's
normalisation happen inside ``forward`` (as registered buffers), so training, predict, ONNX
and the web app all feed the network the same thing.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from bonexray.errors import BonexrayError
from bonexray.model import weights as _weights
from bonexray.model.registry import DEFAULT_BACKBONE, cam_target_name, get_backbone_spec


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
        box_head: bool = False,
        box_stride: int = 8,
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
        # a 1x1 conv on the last feature map. Not part of ``forward`` nor of ``forward_outputs`` (ONNX).
        self.localization_head = nn.Conv2d(self.num_features, 1, 1) if localization_head else None
        # Fracture boxes (model/detection.py), present in models trained with --box-weight: an FCOS-style
        # head on the intermediate features (stride 8 and 16, or 4, 8 and 16 with ``box_stride=4``) and the
        # final map. ``forward`` never runs it;
        # ``forward_outputs`` (predict, ONNX) does.
        self.box_head = None
        if box_head:
            from .detection import BOX_STRIDES, BoxHead, level_strides

            if box_stride not in BOX_STRIDES:
                raise BonexrayError(f"box stride must be one of {', '.join(map(str, BOX_STRIDES))} (got {box_stride})")
            # The intermediate levels from the head's stride to 16; the final map stands for stride 32.
            self.box_feature_indices = _stride_indices(self.backbone, level_strides(box_stride)[:-1])
            info = self.backbone.feature_info
            chans = tuple(int(info[i]["num_chs"]) for i in self.box_feature_indices)
            self.box_head = BoxHead((*chans, self.num_features), stride=box_stride)

        # Shape (1, 3, 1, 1): broadcasting a (B, 1, H, W) input against them replicates the
        # gray channel to 3 and normalises in one op. Not persistent: they follow from the
        # backbone/model card, so state dicts stay "backbone + heads" only; ONNX still bakes
        # them in as constants.
        self.register_buffer("pixel_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

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

    def forward_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output of one forward pass, by name (the ONNX export's outputs, in this order):
        ``abnormal_logit`` (B,), ``body_part_logits`` (B, K), ``embedding`` (B, C) (the pooled features
        both heads read), and with a box head ``box_logits`` (B,1,h,w), ``box_ltrb`` (B,4,h,w),
        ``box_centerness`` (B,1,h,w) on the box head's grid (stride ``box_head.stride``: 8 or 4; see
        model/detection.py)."""
        normed = (x - self.pixel_mean) / self.pixel_std
        if self.box_head is None:
            feature_map, inter = self.backbone.forward_features(normed), None
        else:
            feature_map, inter = self.backbone.forward_intermediates(normed, indices=list(self.box_feature_indices), norm=False)
        pooled = self.backbone.forward_head(feature_map, pre_logits=True)
        out = {"abnormal_logit": self.abnormal_head(self.dropout(pooled))[:, 0],
               "body_part_logits": self.body_part_head(self.dropout(pooled)), "embedding": pooled}
        if inter is not None:
            out["box_logits"], out["box_ltrb"], out["box_centerness"] = self.box_head(*inter, feature_map)
        return out

    def forward_with_boxes(self, x: torch.Tensor):
        """Training: (feature_map, abnormal_logit, body_part_logits, (box maps) or None) in one pass."""
        normed = (x - self.pixel_mean) / self.pixel_std
        if self.box_head is None:
            feature_map = self.backbone.forward_features(normed)
            return (feature_map, *self.forward_heads(feature_map), None)
        feature_map, inter = self.backbone.forward_intermediates(normed, indices=list(self.box_feature_indices), norm=False)
        return (feature_map, *self.forward_heads(feature_map), self.box_head(*inter, feature_map))

    def localization_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> fracture probability per feature-grid cell (B, 1, h, w)."""
        if self.localization_head is None:
            raise BonexrayError("this model has no localisation head (train it with --localization-weight on data with boxes)")
        return torch.sigmoid(self.localization_head(self.forward_features(x)))

    def cam_target_layer(self) -> nn.Module:
        """The backbone module to hook for Grad-CAM: the one that outputs the last feature map."""
        return self.backbone.get_submodule(cam_target_name(self.backbone))

    def load_weights_file(self, path: str | os.PathLike) -> None:
        """Load a local state_dict (``--weights FILE``): see :func:`bonexray.model.weights.load_weights_file`."""
        _weights.load_weights_file(self, path)

    def output_names(self) -> tuple[str, ...]:
        from .detection import BOX_OUTPUTS

        return ("abnormal_logit", "body_part_logits", "embedding") + (BOX_OUTPUTS if self.box_head is not None else ())

    def extra_repr(self) -> str:
        return f"backbone={self.backbone_name!r}, num_body_parts={self.num_body_parts}"


def _stride_indices(backbone: nn.Module, strides: Sequence[int]) -> tuple[int, ...]:
    """Indices into timm's ``feature_info`` (as ``forward_intermediates`` takes them) of the last stage
    at each stride."""
    info = list(backbone.feature_info)
    if not hasattr(backbone, "forward_intermediates"):
        raise BonexrayError(f"{type(backbone).__name__}: this timm model has no forward_intermediates, so it cannot carry a box head")
    out = []
    for stride in strides:
        hits = [i for i, f in enumerate(info) if int(f["reduction"]) == stride]
        if not hits:
            raise BonexrayError(f"{type(backbone).__name__} has no stride-{stride} features for the box head")
        out.append(hits[-1])
    return tuple(out)
