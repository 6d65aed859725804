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


class MissingDecoderError(ImageReadError):
    """A file needs a decoder that is not installed (e.g. a DICOM transfer syntax): a setup
    problem, not a bad image, so callers that record bad images stop on it instead."""


class NotAnImageError(ImageReadError):
    """A readable file of another kind (a DICOMDIR, a structured report, an RT plan, an encapsulated PDF):
    front ends list it as skipped, not as a failed image."""


class DatasetError(BonexrayError):
    """A dataset folder/CSV is missing, malformed or of an unknown layout."""


class CheckpointError(BonexrayError):
    """A model file is missing, corrupt or not a bonexray model."""


class WeightsUnavailableError(BonexrayError):
    """Pretrained weights could not be obtained (e.g. offline)."""


class BonexrayWarning(UserWarning):
    """Something the user should know that does not stop the command; the CLI prints it as one line."""
