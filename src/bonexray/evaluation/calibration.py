"""Calibration (expected calibration error, reliability diagram) and the borderline band's error rates."""
from __future__ import annotations

import os
from typing import Any

import numpy as np


def calibration_metrics(y, p, n_bins: int = 10) -> dict[str, Any]:
    """ECE (torchmetrics ``binary_calibration_error``, L1, equal-width bins) and the reliability table."""
    import torch
    from torchmetrics.functional.classification import binary_calibration_error

    y = np.asarray(y, np.int64)
    p = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    ece = float(binary_calibration_error(torch.tensor(p, dtype=torch.float32), torch.tensor(y), n_bins=n_bins, norm="l1"))
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=True), 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        m = idx == b
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(m.sum()),
                     "mean_prob": float(p[m].mean()) if m.any() else None,
                     "frac_abnormal": float(y[m].mean()) if m.any() else None})
    return {"ece": ece, "n_bins": n_bins, "bins": bins,
            "method": "expected calibration error, L1 over equal-width probability bins (torchmetrics)"}


def band_error_rates(y, p, threshold: float, band: float, source: str) -> dict[str, Any]:
    """Error rate at the threshold for images inside the borderline band (|p - t| < band) and outside it."""
    y = np.asarray(y, np.int64)
    p = np.asarray(p, np.float64)
    wrong = (p >= threshold).astype(int) != y
    inside = np.abs(p - threshold) < band

    def part(m):
        return {"n": int(m.sum()), "error_rate": float(wrong[m].mean()) if m.any() else None}

    return {"band": float(band), "source": source, "inside": part(inside), "outside": part(~inside)}


def plot_reliability(cal: dict[str, Any], path: str | os.PathLike) -> None:
    """Reliability diagram: observed share of abnormal images against the mean predicted probability per bin."""
    from .figures import new_figure, save_figure

    fig, ax = new_figure(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", label="perfect calibration")
    pts = [(b["mean_prob"], b["frac_abnormal"], b["n"]) for b in cal["bins"] if b["n"]]
    if pts:
        x, yv, n = zip(*pts)
        ax.plot(x, yv, marker="o", color="C0", label=f"model (ECE {cal['ece']:.3f})")
        for xi, yi, ni in pts:
            ax.annotate(str(ni), (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7, color="0.3")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted p(abnormal) in bin")
    ax.set_ylabel("observed share abnormal")
    ax.set_title(f"Reliability ({cal['n_bins']} bins; numbers: images)")
    ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path)


def report_section(cal: dict[str, Any], band: dict[str, Any] | None = None) -> str:
    """The "Calibration and the borderline band" section of report.md (``calibration_metrics`` and
    ``band_error_rates`` results)."""
    from .markdown import fmt

    out = ["## Calibration and the borderline band", "",
           f"Expected calibration error: **{fmt(cal.get('ece'))}** ({cal.get('n_bins')} equal-width bins; "
           "reliability diagram below)."]
    if band:
        i, o = band["inside"], band["outside"]
        out += [f"Borderline band |p - threshold| < {fmt(band['band'])} ({band['source']}): "
                f"error rate {fmt(i['error_rate'])} on {i['n']} images inside, {fmt(o['error_rate'])} on "
                f"{o['n']} images outside."]
    out += [""]
    return "\n".join(out)
