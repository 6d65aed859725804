"""The one exception family, importable from its old place: the classes live in :mod:`bonexray.core.errors`
(the torch-free core raises them too)."""
from __future__ import annotations

from .core.errors import (BonexrayError, BonexrayWarning, CheckpointError, DatasetError, ImageReadError,
                          MissingDecoderError, NotAnImageError, WeightsUnavailableError)

__all__ = ["BonexrayError", "BonexrayWarning", "CheckpointError", "DatasetError", "ImageReadError",
           "MissingDecoderError", "NotAnImageError", "WeightsUnavailableError"]
