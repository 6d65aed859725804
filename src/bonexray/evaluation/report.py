"""``report.md`` and ``metrics.json`` for ``bonexray evaluate``.

Everything here consumes the dict produced by :func:`bonexray.evaluation.metrics.compute_metrics`
(with the localization and calibration results evaluate adds) and is independent of the model. Each
metric module writes its own section (``metrics.report_section``, ``calibration.report_section``,
``localization.report_section``); this module puts them together with the header and the figures.
Figures are drawn by :mod:`bonexray.evaluation.figures`.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_text
from .markdown import fmt

__all__ = ["PLOT_FILES", "write_report", "write_metrics_json"]

PLOT_FILES = {
    "confusion_abnormality": "confusion_abnormality.png",
    "confusion_body_part": "confusion_body_part.png",
    "roc": "roc.png",
    "curves": "curves.png",
    "reliability": "reliability.png",
}


# --------------------------------------------------------------------------- report


def write_report(results_dir: str | os.PathLike, metrics: Mapping[str, Any],
                 body_parts: Sequence[str], info: Mapping[str, Any]) -> Path:
    """Write ``<results_dir>/report.md`` (GitHub-flavoured markdown); returns its path.

    ``info`` supplies the header (``checkpoint``, ``data``, ``split``; ``threshold`` falls
    back to ``metrics["threshold"]``); other keys are listed after those. PNGs named as in
    ``PLOT_FILES`` (and ``froc.png``) are embedded with relative links when they exist in ``results_dir``.
    """
    from .calibration import report_section as calibration_section
    from .localization import report_section as localization_section
    from .metrics import report_section as metrics_section

    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    threshold = info.get("threshold", metrics.get("threshold"))

    out: list[str] = ["# bonexray evaluation report", ""]
    header = [("Checkpoint", info.get("checkpoint")), ("Data", info.get("data")),
              ("Split", info.get("split")), ("Images", metrics.get("n_images")),
              ("Studies", metrics.get("n_studies")), ("Threshold", threshold)]
    header += [(str(k), v) for k, v in info.items()
               if k not in ("checkpoint", "data", "split", "threshold")]
    for name, value in header:
        shown = f"`{value}`" if name in ("Checkpoint", "Data") and value is not None \
            else fmt(value)
        out.append(f"- **{name}:** {shown}")
    out += ["", metrics_section(metrics, body_parts, threshold)]

    ab = metrics.get("abnormality", {})
    if ab.get("calibration"):
        out += [calibration_section(ab["calibration"], ab.get("borderline"))]

    if metrics.get("localization"):
        froc = "froc.png" if (results_dir / "froc.png").is_file() else None
        out += [localization_section(metrics["localization"], froc_png=froc), ""]

    figures = [("confusion_abnormality", "Abnormality confusion matrix (image level)"),
               ("confusion_body_part", "Body-part confusion matrix"),
               ("roc", "ROC curves"), ("reliability", "Reliability diagram"), ("curves", "Training curves")]
    present = [(key, title) for key, title in figures
               if (results_dir / PLOT_FILES[key]).is_file()]
    if present:
        out += ["## Figures", ""]
        for key, title in present:
            out += [f"### {title}", "", f"![{title}]({PLOT_FILES[key]})", ""]

    path = results_dir / "report.md"
    atomic_write_text(path, "\n".join(out).rstrip() + "\n")
    return path


# --------------------------------------------------------------------------- json


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None  # strict JSON: no NaN
    return x


def write_metrics_json(path: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write metrics as strict JSON with sorted keys (stable diffs), atomically."""
    path = Path(path)
    text = json.dumps(_jsonable(metrics), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_text(path, text + "\n")
    return path
