"""Checkpoint writing that never leaves a half-written file under the final name."""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..atomic import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save through :func:`bonexray.atomic.atomic_write` (temp file, fsync, rename).

    Loading (``--resume``) is :func:`bonexray.model.checkpoint.read_verified_checkpoint`: ``weights_only=True``
    (tensors and plain data only, so loading never runs pickled code) and the integrity checks of ``load_model``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_write(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        # --resume goes through every check of load_model (zip CRCs, no pickled objects, card and SHA-256):
        # a damaged last.ckpt must stop the run by name, not train on.
        from ..model.checkpoint import read_verified_checkpoint

        return dict(read_verified_checkpoint(path, map_location=map_location or "cpu"))
