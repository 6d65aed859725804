"""Checkpoint writing that never leaves a half-written file under the final name."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temp file in the same folder, fsync, then os.replace (atomic on POSIX).

    Loading uses ``weights_only=True``: checkpoints hold tensors and plain data only, so loading one
    never runs arbitrary pickled code.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
