"""Plots, ``report.md`` and ``metrics.json`` for ``bonexray evaluate``.

Everything here consumes the dict produced by :func:`bonexray.evaluation.metrics.compute_metrics`
(or plain arrays) and is independent of the model.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: evaluation runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..atomic import atomic_write_text  # noqa: E402

__all__ = ["plot_confusion", "plot_roc", "plot_curves", "write_report", "write_metrics_json"]

PLOT_FILES = {
    "confusion_abnormality": "confusion_abnormality.png",
    "confusion_body_part": "confusion_body_part.png",
    "roc": "roc.png",
    "curves": "curves.png",
    "reliability": "reliability.png",
}


def _save(fig: plt.Figure, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)  # long evaluations make many figures; don't leak them


# --------------------------------------------------------------------------- plots


def plot_confusion(matrix: Any, labels: Sequence[str], path: str | os.PathLike,
                   title: str) -> None:
    """Confusion matrix (rows = truth): counts as text, colour = row-normalised fraction."""
    m = np.asarray(matrix, dtype=float).reshape(len(labels), len(labels))
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    k = len(labels)
    side = max(3.8, 0.75 * k + 2.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("fraction of true class (row)")
    fontsize = 11 if k <= 6 else 9 if k <= 10 else 7
    for i in range(k):
        for j in range(k):
            # No percentage for a class never seen in the truth (its row is empty).
            label = f"{int(m[i, j])}\n{frac[i, j]:.0%}" if rows[i, 0] > 0 else f"{int(m[i, j])}"
            ax.text(j, i, label, ha="center", va="center",
                    fontsize=fontsize, color="white" if frac[i, j] > 0.55 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    # Rotate only when labels would collide, so short ones stay easy to read.
    rotate = k > 4 or max((len(str(lb)) for lb in labels), default=0) > 8
    ax.set_xticklabels(labels, rotation=40 if rotate else 0, ha="right" if rotate else "center")
    ax.set_yticklabels(labels)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title)
    _save(fig, path)


def plot_roc(image_y: Any, image_p: Any, study_y: Any, study_p: Any,
             path: str | os.PathLike) -> bool:
    """Image- and study-level ROC curves on one axes. Returns False (no file) if neither
    level has both classes."""
    from sklearn.metrics import roc_auc_score, roc_curve

    curves = []
    for name, y, p in (("Image", image_y, image_p), ("Study", study_y, study_p)):
        y, p = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        curves.append((name, fpr, tpr, roc_auc_score(y, p), len(y)))
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 5.2))
    for (name, fpr, tpr, auc, n), style in zip(curves, ("-", "--")):
        ax.plot(fpr, tpr, style, lw=2, label=f"{name} (AUROC {auc:.3f}, n={n})")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title("Abnormality ROC")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    _save(fig, path)
    return True


def _epoch_series(df: pd.DataFrame, name: str) -> pd.Series | None:
    """Per-epoch mean of a logged metric; accepts Lightning's ``_epoch``/``_step`` variants."""
    for col in (name, f"{name}_epoch", f"{name}_step"):
        if col in df.columns:
            s = pd.to_numeric(df[col], errors="coerce")
            s = s.groupby(df["epoch"]).mean().dropna()
            if len(s):
                return s
    return None


def plot_curves(metrics_csv_path: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Training curves from a Lightning CSVLogger ``metrics.csv``.

    Train and valid values live on different NaN-padded rows, so each metric is averaged
    per epoch. Panels: loss, abnormality accuracy (+ valid AUROC), body-part accuracy;
    panels without data are dropped. Returns False (no file) if nothing can be plotted.
    """
    try:
        df = pd.read_csv(metrics_csv_path)
    except (FileNotFoundError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return False
    if "epoch" not in df.columns:
        return False
    df = df.assign(epoch=pd.to_numeric(df["epoch"], errors="coerce")).dropna(subset=["epoch"])
    if df.empty:
        return False
    df["epoch"] = df["epoch"].astype(int)

    panel_defs = [
        ("Loss", "loss", [("train_loss", "train"), ("valid_loss", "valid")]),
        ("Abnormality", "accuracy / AUROC",
         [("train_acc_abnormal", "train acc"), ("valid_acc_abnormal", "valid acc"),
          ("valid_auroc", "valid AUROC")]),
        ("Body part", "accuracy",
         [("train_acc_body_part", "train acc"), ("valid_acc_body_part", "valid acc")]),
    ]
    panels = []
    for title, ylabel, specs in panel_defs:
        series = [(label, s) for col, label in specs
                  if (s := _epoch_series(df, col)) is not None]
        if series:
            panels.append((title, ylabel, series))
    if not panels:
        return False

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    styles = {"train": "-", "valid": "--"}
    for ax, (title, ylabel, series) in zip(axes[0], panels):
        for label, s in series:
            ax.plot(s.index, s.to_numpy(), styles.get(label.split()[0], "-"), marker="o",
                    ms=3, lw=1.8, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        # Integer epochs only on the x axis.
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    _save(fig, path)
    return True


# --------------------------------------------------------------------------- report


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.3f}" if math.isfinite(float(x)) else "n/a"
    return str(x)


def _fmt_ci(point: Any, ci: Any) -> str:
    if point is None:
        return "n/a"
    if not ci or ci[0] is None or ci[1] is None:
        return _fmt(point)
    return f"{_fmt(point)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _cell(x: Any) -> str:
    """Markdown table cell: pipes would break the table."""
    return str(x).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "l") -> list[str]:
    sep = ["---" if i == 0 and align == "l" else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return lines


def write_report(results_dir: str | os.PathLike, metrics: Mapping[str, Any],
                 body_parts: Sequence[str], info: Mapping[str, Any]) -> Path:
    """Write ``<results_dir>/report.md`` (GitHub-flavoured markdown); returns its path.

    ``info`` supplies the header (``checkpoint``, ``data``, ``split``; ``threshold`` falls
    back to ``metrics["threshold"]``); other keys are listed after those. PNGs named as in
    ``PLOT_FILES`` are embedded with relative links when they exist in ``results_dir``.
    """
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    ab = metrics.get("abnormality", {})
    img, st, ci = ab.get("image", {}), ab.get("study", {}), ab.get("ci95", {}) or {}
    threshold = info.get("threshold", metrics.get("threshold"))

    out: list[str] = ["# bonexray evaluation report", ""]
    header = [("Checkpoint", info.get("checkpoint")), ("Data", info.get("data")),
              ("Split", info.get("split")), ("Images", metrics.get("n_images")),
              ("Studies", metrics.get("n_studies")), ("Threshold", threshold)]
    header += [(str(k), v) for k, v in info.items()
               if k not in ("checkpoint", "data", "split", "threshold")]
    for name, value in header:
        shown = f"`{value}`" if name in ("Checkpoint", "Data") and value is not None \
            else _fmt(value)
        out.append(f"- **{name}:** {shown}")
    out += ["", f"An image or study is called abnormal when its probability is ≥ "
            f"{_fmt(threshold)}. A study's probability is the mean over its images "
            "(MURA protocol). 95% CIs (in brackets) are percentile bootstrap intervals "
            "resampling studies.", ""]

    out += ["## Abnormality", ""]
    rows = []
    names = [("accuracy", "Accuracy"), ("precision", "Precision"),
             ("recall", "Recall (sensitivity)"), ("specificity", "Specificity"),
             ("f1", "F1"), ("auroc", "AUROC"), ("average_precision", "Average precision"),
             ("kappa", "Cohen's kappa"), ("n", "n")]
    for key, label in names:
        if key in ("auroc", "kappa"):
            rows.append([label, _fmt_ci(img.get(key), ci.get(f"image_{key}")),
                         _fmt_ci(st.get(key), ci.get(f"study_{key}"))])
        else:
            rows.append([label, _fmt(img.get(key)),
                         _fmt(st.get(key)) if key in st else "–"])
    out += _table(["Metric", "Image level", "Study level"], rows, align="l")
    out.append("")

    per = ab.get("per_body_part", {}) or {}
    if per:
        out += ["### Per body part", ""]
        rows = []
        for part in body_parts:
            pm = per.get(part)
            if pm is None:
                continue
            s, i = pm.get("study", {}), pm.get("image", {})
            rows.append([part, _fmt(s.get("n")), _fmt(i.get("n")), _fmt(s.get("kappa")),
                         _fmt(s.get("auroc")), _fmt(s.get("accuracy")),
                         _fmt(i.get("accuracy"))])
        out += _table(["Body part", "Studies", "Images", "Study kappa", "Study AUROC",
                       "Study accuracy", "Image accuracy"], rows)
        out.append("")

    bp = metrics.get("body_part", {}) or {}
    out += ["## Body-part classification (image level)", ""]
    rows = []
    pc = bp.get("per_class", {}) or {}
    for part in body_parts:
        c = pc.get(part, {})
        rows.append([part, _fmt(c.get("precision")), _fmt(c.get("recall")),
                     _fmt(c.get("support"))])
    total = sum(int(pc.get(p, {}).get("support") or 0) for p in body_parts)
    rows.append(["**macro average**", _fmt(bp.get("macro_precision")),
                 _fmt(bp.get("macro_recall")), _fmt(total)])
    out += _table(["Class", "Precision", "Recall", "Support"], rows)
    out += ["", f"Accuracy: **{_fmt(bp.get('accuracy'))}**, macro F1: "
            f"**{_fmt(bp.get('macro_f1'))}**.", ""]

    cal, band = ab.get("calibration"), ab.get("borderline")
    if cal:
        out += ["## Calibration and the borderline band", "",
                f"Expected calibration error: **{_fmt(cal.get('ece'))}** ({cal.get('n_bins')} equal-width bins; "
                "reliability diagram below)."]
        if band:
            i, o = band["inside"], band["outside"]
            out += [f"Borderline band |p - threshold| < {_fmt(band['band'])} ({band['source']}): "
                    f"error rate {_fmt(i['error_rate'])} on {i['n']} images inside, {_fmt(o['error_rate'])} on "
                    f"{o['n']} images outside."]
        out += [""]

    if metrics.get("localization"):
        from .localization import report_section

        froc = "froc.png" if (results_dir / "froc.png").is_file() else None
        out += [report_section(metrics["localization"], froc_png=froc), ""]

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
