"""One family of exceptions so the CLI can print a clear message instead of a traceback."""
from __future__ import annotations

import os


class BonexrayError(Exception):
    """Base class: every error bonexray raises on purpose for bad input or setup."""


class ImageReadError(BonexrayError):
    """An image file could not be decoded. Names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DatasetError(BonexrayError):
    """A dataset folder/CSV is missing, malformed or of an unknown layout."""


class CheckpointError(BonexrayError):
    """A model file is missing, corrupt or not a bonexray model."""


class WeightsUnavailableError(BonexrayError):
    """Pretrained weights could not be obtained (e.g. offline)."""
