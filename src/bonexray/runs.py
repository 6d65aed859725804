"""Training run folders: where a checkpoint's run (its config.yaml, splits.csv) is found."""
from __future__ import annotations

from pathlib import Path


def find_run_dir(checkpoint: str | Path) -> Path | None:
    """RUN/checkpoints/x.ckpt -> RUN when RUN looks like a bonexray run directory (holds config.yaml)."""
    run = Path(checkpoint).resolve().parent.parent
    return run if (run / "config.yaml").is_file() else None
