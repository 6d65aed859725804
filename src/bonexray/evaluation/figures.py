"""Figures of ``bonexray evaluate``: confusion matrices, ROC, training curves, and the saving helper the
metric modules draw with (localization's FROC plot, calibration's reliability diagram).

Figures are made with matplotlib's object-oriented API (``matplotlib.figure.Figure``), not pyplot: saving
a Figure renders with the Agg canvas for PNG, so nothing here selects or changes the process's matplotlib
backend (a notebook keeps its own) and no figure is left registered with pyplot.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["new_figure", "save_figure", "plot_confusion", "plot_roc", "plot_curves"]


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], squeeze: bool = True):
    """``(figure, axes)`` as ``pyplot.subplots`` gives them, on a Figure that pyplot does not track."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG (120 dpi, tight box) to ``path``, making its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_confusion(matrix: Any, labels: Sequence[str], path: str | os.PathLike,
                   title: str) -> None:
    """Confusion matrix (rows = truth): counts as text, colour = row-normalised fraction."""
    m = np.asarray(matrix, dtype=float).reshape(len(labels), len(labels))
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    k = len(labels)
    side = max(3.8, 0.75 * k + 2.0)
    fig, ax = new_figure(figsize=(side + 1.0, side))
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
    save_figure(fig, path)


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
    fig, ax = new_figure(figsize=(5.5, 5.2))
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
    save_figure(fig, path)
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

    fig, axes = new_figure(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
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
    save_figure(fig, path)
    return True
