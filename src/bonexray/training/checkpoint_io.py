"""Checkpoint writing that never leaves a half-written file under the final name."""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..atomic import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save through :func:`bonexray.atomic.atomic_write` (temp file, fsync, rename).

    Loading uses ``weights_only=True``: checkpoints hold tensors and plain data only, so loading one
    never runs arbitrary pickled code.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_write(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
