"""Exponential moving average of the weights that stays out of the way until it has started.

Lightning's ``EMAWeightAveraging`` swaps the averaged copy in for every validation and writes it into
every checkpoint, even before its first update, when the copy still holds the starting weights. With
averaging that starts late (after one-cycle's warm-up), early validation curves and ``last.ckpt``
would then show the ImageNet start instead of the model being trained.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import EMAWeightAveraging


class DelayedEMA(EMAWeightAveraging):
    def _started(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._swapped = self._started()
        if self._swapped:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if getattr(self, "_swapped", False):
            super().on_validation_epoch_end(trainer, pl_module)
        self._swapped = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self._started():
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
