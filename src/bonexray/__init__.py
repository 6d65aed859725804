"""bonexray: read bone X-rays (normal/abnormal and body part).

The Python API (see README, "Python API")::

    model = bonexray.load_model("best.ckpt")      # or an exported .onnx
    result = model.predict("xray.png")            # Prediction(prob_abnormal, abnormal, body_part, ...)
    dataset = bonexray.load_dataset("data/FracAtlas")

The names below are imported on first use (PEP 562), so ``import bonexray`` stays light: torch,
timm and the rest load only when a model or dataset is asked for.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
__all__ = ["Model", "Prediction", "__version__", "load_dataset", "load_model"]

if TYPE_CHECKING:
    from .api import Model, Prediction, load_dataset, load_model


def __getattr__(name: str) -> Any:
    if name in ("Model", "Prediction", "load_dataset", "load_model"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'bonexray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
