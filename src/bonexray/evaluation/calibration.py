"""Calibration (expected calibration error with a bootstrap CI, before and after the model card's
calibration, reliability diagram) and the borderline band's error rates."""
from __future__ import annotations

import os
from typing import Any

import numpy as np


def ece(y, p, n_bins: int = 10) -> float:
    """Expected calibration error: sum over equal-width bins of (bin share) x |observed rate - mean p|
    (L1; bin b holds lo < p <= hi, the first bin also p = 0: torchmetrics' binning)."""
    y = np.asarray(y, np.float64)
    p = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    if not len(p):
        return float("nan")
    idx = np.clip(np.ceil(p * n_bins).astype(int) - 1, 0, n_bins - 1)
    n = np.bincount(idx, minlength=n_bins)
    gap = np.abs(np.bincount(idx, weights=y, minlength=n_bins) - np.bincount(idx, weights=p, minlength=n_bins))
    return float(gap.sum() / len(p))


def ece_ci(y, p, groups=None, n_bootstrap: int = 1000, n_bins: int = 10, seed: int = 0) -> list[float] | None:
    """95% percentile bootstrap interval of :func:`ece`, resampling ``groups`` (studies) when given."""
    if n_bootstrap <= 0 or not len(p):
        return None
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.array([i]) for i in range(len(p))]
    else:
        _, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        members = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
    stats = []
    for _ in range(n_bootstrap):
        pick = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        stats.append(ece(y[pick], p[pick], n_bins))
    return [float(v) for v in np.percentile(stats, [2.5, 97.5])]


def calibration_metrics(y, p, n_bins: int = 10) -> dict[str, Any]:
    """ECE (:func:`ece`, L1, equal-width bins) and the reliability table."""
    y = np.asarray(y, np.int64)
    p = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.ceil(p * n_bins).astype(int) - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        m = idx == b
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(m.sum()),
                     "mean_prob": float(p[m].mean()) if m.any() else None,
                     "frac_abnormal": float(y[m].mean()) if m.any() else None})
    return {"ece": ece(y, p, n_bins), "n_bins": n_bins, "bins": bins,
            "method": "expected calibration error, L1 over equal-width probability bins"}


def calibration_report(y, p_raw, card=None, groups=None, n_bootstrap: int = 1000, n_bins: int = 10) -> dict[str, Any]:
    """:func:`calibration_metrics` of the probabilities the front ends report (the card's calibration
    applied, if it has one), with a bootstrap CI, and the ECE ``before`` and ``after`` calibration."""
    from ..core.decision import temperature_scaled

    p_raw = np.asarray(p_raw, np.float64)
    cal = getattr(card, "calibration", None)
    p_cal = temperature_scaled(p_raw, float(cal["temperature"]), float(cal.get("bias", 0.0))) if cal else None
    shown = p_cal if p_cal is not None else p_raw
    out = calibration_metrics(y, shown, n_bins)
    out["ece_ci95"] = ece_ci(y, shown, groups, n_bootstrap, n_bins)
    out["before"] = {"ece": ece(y, p_raw, n_bins), "ece_ci95": ece_ci(y, p_raw, groups, n_bootstrap, n_bins)}
    out["after"] = (None if p_cal is None else
                    {"ece": out["ece"], "ece_ci95": out["ece_ci95"], "calibration": dict(cal)})
    out["probabilities"] = "calibrated (model card)" if p_cal is not None else "as the network gives them"
    out["ci_method"] = (f"percentile bootstrap over {'studies' if groups is not None else 'images'}, "
                        f"{n_bootstrap} resamples" if n_bootstrap > 0 else "not computed (no bootstrap)")
    out["_curves"] = {"before": p_raw, "after": p_cal, "y": np.asarray(y, np.int64)}
    return out


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
    """Reliability diagram (scikit-learn ``calibration_curve``, equal-width bins): observed share of
    abnormal images against the mean predicted probability, before and (if any) after calibration."""
    from sklearn.calibration import calibration_curve

    from .figures import new_figure, save_figure

    fig, ax = new_figure(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", label="perfect calibration")
    curves = cal.get("_curves")
    n_bins = int(cal.get("n_bins", 10))
    if curves is not None and len(curves["y"]) and len(np.unique(curves["y"])) > 1:
        for key, colour, label in (("before", "C0", "as the network gives it"), ("after", "C1", "calibrated")):
            p = curves.get(key)
            if p is None:
                continue
            frac, mean = calibration_curve(curves["y"], np.clip(p, 0, 1), n_bins=n_bins, strategy="uniform")
            e = cal["before"]["ece"] if key == "before" else cal["after"]["ece"]
            ax.plot(mean, frac, marker="o", color=colour, label=f"{label} (ECE {e:.3f})")
    else:
        pts = [(b["mean_prob"], b["frac_abnormal"]) for b in cal["bins"] if b["n"]]
        if pts:
            x, yv = zip(*pts)
            ax.plot(x, yv, marker="o", color="C0", label=f"model (ECE {cal['ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted p(abnormal) in bin")
    ax.set_ylabel("observed share abnormal")
    ax.set_title(f"Reliability ({n_bins} equal-width bins)")
    ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path)


def report_section(cal: dict[str, Any], band: dict[str, Any] | None = None) -> str:
    """The "Calibration and the borderline band" section of report.md (``calibration_metrics`` and
    ``band_error_rates`` results)."""
    from .markdown import fmt

    before, after = cal.get("before") or cal, cal.get("after")
    ece = f"**{fmt(before.get('ece'))}** as the network gives it"
    if after:
        ece += f", **{fmt(after.get('ece'))}** after the card's calibration"
    out = ["## Calibration and the borderline band", "",
           f"Expected calibration error: {ece} ({cal.get('n_bins')} equal-width bins; reliability diagram below)."]
    if band:
        i, o = band["inside"], band["outside"]
        out += [f"Borderline band |p - threshold| < {fmt(band['band'])} ({band['source']}): "
                f"error rate {fmt(i['error_rate'])} on {i['n']} images inside, {fmt(o['error_rate'])} on "
                f"{o['n']} images outside."]
    out += [""]
    return "\n".join(out)
