"""LightningModule: the multi-task network, its loss, metrics, schedule and model card."""
from __future__ import annotations

import time
from dataclasses import asdict

import lightning as L
import numpy as np
import torch
from torchmetrics import CatMetric
from torchmetrics.functional.classification import binary_auroc

from .._version import __version__
from ..model.checkpoint import stamp_weights_sha256
from ..model.network import BoneXrayNet
from .augment import AugmentConfig, augment_batch
from ..model.detection import BoxSettings, box_loss, decode_boxes
from .losses import boxes_to_mask, localization_loss, multitask_loss


#: Augmentation presets (``--augment``); "flip-rotate" is the plain fine-tune baseline's; "robust" adds
#: quarter turns and JPEG re-compression to "standard".
AUGMENT_PRESETS = {
    "standard": AugmentConfig(),
    "robust": AugmentConfig(quarter_turn=0.5, jpeg=0.3),
    "flip-rotate": AugmentConfig(max_rotation_deg=15.0, scale=(1.0, 1.0), translate=0.0, contrast=0.0,
                                 brightness=0.0, gamma=0.0),
}


class BoneXrayModule(L.LightningModule):
    def __init__(
        self,
        backbone: str,
        body_parts: list[str],
        class_weights: list[list[float]] | None,
        image_size: int,
        pretrained: str | None = "imagenet",
        weights: str | None = None,
        dropout: float = 0.0,
        lr: float = 3e-4,
        weight_decay: float = 1e-4,
        warmup_epochs: float = 1.0,
        body_part_weight: float = 1.0,
        localization_weight: float = 0.0,
        box_weight: float = 0.0,
        box_threshold: float = 0.3,
        box_stride: int = 8,
        box_quality: str = "centerness",
        threshold_method: str = "youden",
        target_sensitivity: float = 0.9,
        augment: str | None = "standard",
        schedule: str = "cosine",
        split: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        # With a localisation loss the net also gets its fracture-map head (trained here, used by heatmaps).
        self.net = BoneXrayNet(backbone, num_body_parts=len(body_parts), pretrained=pretrained, weights=weights,
                               dropout=dropout, localization_head=localization_weight > 0,
                               box_head=box_weight > 0, box_stride=box_stride)
        # Usually None here: the DataModule computes them from the training split in setup() (see setup below).
        # A plain attribute, not a buffer: weight averaging (EMA) copies the module before setup() runs.
        self.class_weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.threshold = 0.5
        # Operating point of the box head: chosen on valid (max F1 of boxes at IoU 0.5) when there is a
        # valid split, else the stated default (model card ``boxes.threshold_source``).
        self.box_threshold = float(box_threshold)
        self.box_threshold_source = "default (no held-out images to choose it on)"
        self.val_boxes: list = []
        self.aug_cfg = AUGMENT_PRESETS[augment] if augment else None
        # Gathered across DDP processes on compute(): AUROC and the threshold need every image.
        self.val_probs, self.val_labels = CatMetric(), CatMetric()
        self._t_last: float | None = None

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.class_weights is None:
            if dm is None or getattr(dm, "class_weights", None) is None:
                raise RuntimeError("BoneXrayModule needs class_weights, given or from a BoneDataModule")
            self.class_weights = torch.tensor(dm.class_weights, dtype=torch.float32)

    # -- data on device -------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # loc: (boxes, valid, known, polygons) when the data carries fracture boxes
        img, abnormal, part, *loc = batch
        x = img.float().div_(255.0)  # uint8 travels; conversion happens on the device
        if self.trainer.training and self.aug_cfg is not None:
            if not loc:
                x = augment_batch(x, self.aug_cfg)
            else:
                # The fracture outlines go through the warp, so a rotated fracture keeps a tight box.
                x, boxes, valid = augment_batch(x, self.aug_cfg, boxes=loc[0], valid=loc[1], polygons=loc[3])
                loc = [boxes, valid, loc[2]]
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x, abnormal, part) if not loc else (x, abnormal, part, loc[0].float(), loc[1].bool(), loc[2].bool())

    def forward(self, x: torch.Tensor):
        return self.net(x)

    def _step(self, batch, stage: str):
        x, abnormal, part, *loc = batch
        loc_head = self.net.localization_head
        feature_map, abn_logit, part_logits, box_maps = self.net.forward_with_boxes(x)
        loss, loss_abn, loss_part = multitask_loss(abn_logit, part_logits, abnormal, part, self.class_weights.to(x.device),
                                                   self.hparams.body_part_weight)
        bs = x.shape[0]
        if loc_head is not None and loc:
            mask = boxes_to_mask(loc[0], loc[1], x.shape[-1])
            loss_loc = localization_loss(loc_head(feature_map), mask, loc[2])
            self.log(f"{stage}_loss_localization", loss_loc, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
            loss = loss + self.hparams.localization_weight * loss_loc
        if box_maps is not None and loc:
            loss_box = box_loss(*box_maps, loc[0], loc[1], loc[2], stride=self.net.box_head.stride,
                                quality=self.hparams.box_quality)
            self.log(f"{stage}_loss_boxes", loss_box, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
            loss = loss + self.hparams.box_weight * loss_box
            if stage == "valid":
                found = decode_boxes(*(m.detach() for m in box_maps), self.box_settings(), threshold=0.05)
                for i in range(bs):
                    if bool(loc[2][i]):
                        self.val_boxes.append((found[i].cpu(), loc[0][i][loc[1][i]].cpu()))
        prob = torch.sigmoid(abn_logit.float())
        acc_abn = ((prob >= (self.threshold if stage == "valid" else 0.5)).long() == abnormal).float().mean()
        acc_part = (part_logits.argmax(1) == part).float().mean()
        self.log_dict({f"{stage}_loss": loss, f"{stage}_acc_abnormal": acc_abn, f"{stage}_acc_body_part": acc_part,
                       f"{stage}_loss_abnormal": loss_abn, f"{stage}_loss_body_part": loss_part},
                      on_step=False, on_epoch=True, batch_size=bs, sync_dist=True, prog_bar=False)
        return loss, prob, abnormal

    def box_settings(self) -> BoxSettings:
        stride = self.net.box_head.stride if self.net.box_head is not None else BoxSettings.stride
        return BoxSettings(threshold=self.box_threshold, stride=stride)

    def training_step(self, batch, batch_idx: int):
        loss, _, _ = self._step(batch, "train")
        now = time.perf_counter()
        if self._t_last is not None:
            self.log("img/s", batch[0].shape[0] * self.trainer.world_size / max(1e-6, now - self._t_last),
                     on_step=True, prog_bar=True, logger=False)
        self._t_last = now
        self.log("loss", loss, on_step=True, prog_bar=True, logger=False)
        return loss

    def on_train_epoch_start(self) -> None:
        self._t_last = None

    def validation_step(self, batch, batch_idx: int):
        loss, prob, abnormal = self._step(batch, "valid")
        self.val_probs.update(prob)
        self.val_labels.update(abnormal.float())

    def on_validation_epoch_end(self) -> None:
        from .threshold import choose_threshold

        probs_t = self.val_probs.compute().detach().float().reshape(-1)
        labels_t = self.val_labels.compute().detach().long().reshape(-1)
        self.val_probs.reset()
        self.val_labels.reset()
        probs, labels = probs_t.cpu().numpy(), labels_t.cpu().numpy()
        if len(np.unique(labels)) == 2:
            self.log("valid_auroc", binary_auroc(probs_t, labels_t), sync_dist=False, prog_bar=True)
            if not self.trainer.sanity_checking:
                # Chosen on the validation split only; stored in the checkpoint, never tuned on test data.
                self.threshold = float(choose_threshold(labels, probs, method=self.hparams.threshold_method,
                                                        target=self.hparams.target_sensitivity))
        self.log("threshold", float(self.threshold), prog_bar=False)
        if self.val_boxes and not self.trainer.sanity_checking and self.trainer.world_size == 1:
            from ..model.detection import choose_box_threshold

            self.box_threshold = choose_box_threshold(self.val_boxes, default=self.box_threshold)
            self.box_threshold_source = "valid split (highest F1 of boxes at IoU 0.5)"
            self.log("box_threshold", float(self.box_threshold), prog_bar=False)
        self.val_boxes = []

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on norms and biases
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        lr_sched = torch.optim.lr_scheduler
        if self.hparams.schedule == "onecycle":
            sched = lr_sched.OneCycleLR(opt, max_lr=[self.hparams.lr] * len(opt.param_groups), total_steps=total)
        else:  # linear warm-up, then cosine decay to 1% of the peak, stepped per batch
            steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
            warmup = min(total - 1, int(self.hparams.warmup_epochs * steps_per_epoch))
            cosine = lr_sched.CosineAnnealingLR(opt, T_max=max(1, total - warmup), eta_min=0.01 * self.hparams.lr)
            sched = cosine if warmup <= 0 else lr_sched.SequentialLR(
                opt, [lr_sched.LinearLR(opt, start_factor=1.0 / (warmup + 1), total_iters=warmup), cosine],
                milestones=[warmup])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoint -----------------------------------------------------------------------------
    def model_card(self) -> dict:
        return {
            "backbone": self.hparams.backbone,
            "image_size": int(self.hparams.image_size),
            "in_chans": 1,
            "mean": [float(v) for v in self.net.mean],
            "std": [float(v) for v in self.net.std],
            "body_parts": list(self.hparams.body_parts),
            "threshold": float(self.threshold),
            "version": __version__,
            # Which images it was trained, validated and tested on: evaluate checks it (docs/ARCHITECTURE.md).
            "split": self.hparams.split,
            **({"boxes": {**asdict(self.box_settings()), "threshold_source": self.box_threshold_source}}
               if self.net.box_head is not None else {}),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["bonexray"] = self.model_card()
        stamp_weights_sha256(checkpoint)  # last: the hash must match the state dict as written

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        card = checkpoint.get("bonexray") or {}
        self.threshold = float(card.get("threshold", 0.5))
        if card.get("boxes"):
            self.box_threshold = float(card["boxes"].get("threshold", self.box_threshold))
            self.box_threshold_source = str(card["boxes"].get("threshold_source", self.box_threshold_source))
