"""Localisation metrics for predicted fracture boxes: AP (COCO), FROC and the pointing game.

Inputs, one entry per image, all in the same pixel frame (the original image's pixels):

* ``pred_boxes[i]``: an (n, 5) array ``[x0, y0, x1, y1, score]``, any order; (0, 5) (or ``[]``)
  when the model drew no box. For AP and FROC pass the detections *before* the operating-threshold
  cut (a curve needs the low-scoring boxes too).
* ``gt_boxes[i]``: an (m, 4) xyxy array of fracture boxes; (0, 4) for an image without a fracture;
  ``None`` when nobody annotated the image (a fractured image left out by the annotators): such
  an image is left out of everything here and counted in ``n_unannotated_excluded``.
* ``groups[i]``: the exam group (study or patient); the bootstrap resamples groups, the images of a
  drawn group follow it (as :mod:`bonexray.evaluation.metrics` does for AUROC).

Conventions:

* **AP50, AP50:95** come from torchmetrics' ``MeanAveragePrecision`` (COCO evaluation by
  pycocotools, ``box_format="xyxy"``, one class, at most 100 boxes per image as in COCO). Every
  evaluated image is passed, normal ones included, so a box on a normal image is a false positive.
  COCO matches greedily by score, one detection per ground-truth box: a duplicate box on an
  already-matched fracture is a false positive for AP.
* **FROC** (DeepLesion convention, Yan et al. 2018): detections of all images are taken in global
  score order; a detection is a true positive when its IoU is >= 0.5 with a fracture box of its own
  image that no earlier detection hit (it hits the one of those it overlaps most); a detection whose
  only IoU >= 0.5 matches are already-hit boxes is neither TP nor FP; every other detection, and
  every detection on a normal image, is a false positive. Sensitivity = hit boxes / all fracture
  boxes; FP/image = false positives / all evaluated images (normal ones included). Each operating
  point is a score threshold (ties enter together). ``froc_sensitivity[f]`` is the **best
  sensitivity among operating points with at most f FP/image** (no interpolation: a point a threshold
  can reach); past the last detection it stays at the final sensitivity. Two differences from the
  DeepLesion script (rsummers11/CADLab, MULAN ``detection_eval.py``): there a detection marks every
  box it overlaps at IoU >= 0.5 (here one box, as in COCO), and sensitivity at f is interpolated
  linearly between detections.
* **Pointing**: on images with fracture boxes, is the centre of the top-scoring box inside a
  fracture box (edges included)? An image without a predicted box is a miss.
* Undefined values (no fracture boxes, no images) are ``None``, never NaN. CIs are 95% percentile
  bootstrap intervals over groups; a resample where a value is undefined is skipped for that value.
  AP is recomputed by torchmetrics for every resample, which is slow (0.2-0.3 s per resample for
  523 images with 10 boxes each on one CPU core), so AP uses ``n_bootstrap_ap`` resamples (the first ones of the same
  draws); ``ci95_resamples`` says how many each CI used.
"""
from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import _clean, _percentile_ci

__all__ = ["FROC_FP_RATES", "pointing_hits", "localization_metrics", "plot_froc", "report_section"]

FROC_FP_RATES = (0.5, 1.0, 2.0)
IOU_THRESHOLD = 0.5
# (resamples x detections) float matrices in the FROC bootstrap; keep each chunk around 40 MB.
_BOOT_CHUNK_ELEMS = 5_000_000
_TP, _FP, _IGNORED = 1, 0, -1


def _rate_key(f: float) -> str:
    return f"{f:g}"


# --------------------------------------------------------------------------- pointing


def pointing_hits(points: Any, gt_boxes: Sequence[Any]) -> np.ndarray:
    """For each image i: is ``points[i] = (x, y)`` inside any of ``gt_boxes[i]`` ((m, 4) xyxy)?

    Edges count as inside. A NaN point (nothing to point with) or an image without boxes is a miss.
    The one hit test of the pointing game, used for box centres here and heatmap peaks in
    ``bench/pointing_game.py``. Returns a bool array of length ``len(points)``.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) != len(gt_boxes):
        raise ValueError(f"pointing_hits: {len(pts)} points but {len(gt_boxes)} box lists")
    hits = np.zeros(len(pts), dtype=bool)
    for i, ((x, y), boxes) in enumerate(zip(pts, gt_boxes)):
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        # NaN compares False, so a missing point is a miss without a special case.
        hits[i] = bool(((b[:, 0] <= x) & (x <= b[:, 2]) & (b[:, 1] <= y) & (y <= b[:, 3])).any())
    return hits


# --------------------------------------------------------------------------- inputs


def _as_preds(pred_boxes: Sequence[Any]) -> list[np.ndarray]:
    out = []
    for i, p in enumerate(pred_boxes):
        if p is None:
            raise ValueError(f"pred_boxes[{i}] is None: pass an empty (0, 5) array for an image "
                             "without boxes, or leave the image out")
        a = np.asarray(p, dtype=np.float64)
        if a.size == 0:
            a = a.reshape(0, 5)
        if a.ndim != 2 or a.shape[1] != 5:
            raise ValueError(f"pred_boxes[{i}] has shape {a.shape}; expected (n, 5) "
                             "[x0, y0, x1, y1, score]")
        if not np.isfinite(a).all():
            raise ValueError(f"pred_boxes[{i}] holds NaN or infinite values")
        if ((a[:, 2] < a[:, 0]) | (a[:, 3] < a[:, 1])).any():
            raise ValueError(f"pred_boxes[{i}] has a box with x1 < x0 or y1 < y0 (expected xyxy)")
        out.append(a)
    return out


def _as_gt(gt_boxes: Sequence[Any]) -> list[np.ndarray | None]:
    out: list[np.ndarray | None] = []
    for i, g in enumerate(gt_boxes):
        if g is None:
            out.append(None)
            continue
        a = np.asarray(g, dtype=np.float64)
        if a.size == 0:
            a = a.reshape(0, 4)
        if a.ndim != 2 or a.shape[1] != 4:
            raise ValueError(f"gt_boxes[{i}] has shape {a.shape}; expected (m, 4) xyxy, "
                             "(0, 4) for no fracture or None for unknown")
        if not np.isfinite(a).all():
            raise ValueError(f"gt_boxes[{i}] holds NaN or infinite values")
        if ((a[:, 2] < a[:, 0]) | (a[:, 3] < a[:, 1])).any():
            raise ValueError(f"gt_boxes[{i}] has a box with x1 < x0 or y1 < y0 (expected xyxy)")
        out.append(a)
    return out


# --------------------------------------------------------------------------- matching


def _match_image(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """FROC label per detection of one image (_TP/_FP/_IGNORED), in ``pred``'s row order.

    Detections are visited by descending score (input order among ties); within one image this
    is the global score order restricted to that image, so matching each image alone is exact.
    """
    labels = np.full(len(pred), _FP, dtype=np.int8)
    if len(pred) == 0 or len(gt) == 0:
        return labels
    import torch
    from torchvision.ops import box_iou

    iou = box_iou(torch.from_numpy(pred[:, :4]), torch.from_numpy(gt)).numpy()
    hit = np.zeros(len(gt), dtype=bool)
    for d in np.argsort(-pred[:, 4], kind="stable"):
        over = iou[d] >= IOU_THRESHOLD
        free = over & ~hit
        if free.any():
            g = int(np.flatnonzero(free)[np.argmax(iou[d][free])])
            hit[g] = True
            labels[d] = _TP
        elif over.any():
            labels[d] = _IGNORED
    return labels


class _Prepared:
    """Per-image matching done once; every (re)sample only re-weights it."""

    def __init__(self, preds: list[np.ndarray], gts: list[np.ndarray], group_idx: np.ndarray,
                 n_groups: int) -> None:
        self.preds, self.gts, self.group_idx, self.n_groups = preds, gts, group_idx, n_groups
        n_img = len(preds)
        det_img = np.concatenate([np.full(len(p), i) for i, p in enumerate(preds)]
                                 + [np.zeros(0, int)]).astype(int)
        scores = np.concatenate([p[:, 4] for p in preds] + [np.zeros(0)])
        labels = np.concatenate([_match_image(p, g) for p, g in zip(preds, gts)]
                                + [np.zeros(0, np.int8)])
        order = np.argsort(-scores, kind="stable")
        self.det_group = group_idx[det_img[order]]
        self.det_tp = (labels[order] == _TP).astype(np.float64)
        self.det_fp = (labels[order] == _FP).astype(np.float64)
        s = scores[order]
        # Operating points: the last detection of each run of equal scores (a threshold takes ties together).
        self.point_ends = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1] if len(s) else \
            np.zeros(0, int)
        n_boxes_img = np.array([len(g) for g in gts], dtype=np.float64)
        self.images_per_group = np.bincount(group_idx, minlength=n_groups).astype(np.float64)
        self.boxes_per_group = np.bincount(group_idx, weights=n_boxes_img, minlength=n_groups)
        # Pointing: images with fracture boxes only.
        fractured = n_boxes_img > 0
        centres = np.full((n_img, 2), np.nan)
        for i, p in enumerate(preds):
            if len(p):
                top = p[int(np.argmax(p[:, 4]))]  # first of the top scores on ties
                centres[i] = [(top[0] + top[2]) / 2, (top[1] + top[3]) / 2]
        hits = pointing_hits(centres, gts) & fractured
        self.frac_per_group = np.bincount(group_idx, weights=fractured.astype(float),
                                          minlength=n_groups)
        self.hits_per_group = np.bincount(group_idx, weights=hits.astype(float), minlength=n_groups)

    # ---- FROC for rows of group weights (B, G)

    def froc_points(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fp_per_image, sensitivity), each (B, P+1): the origin then every operating point."""
        n_img = counts @ self.images_per_group
        n_box = counts @ self.boxes_per_group
        w = counts[:, self.det_group]
        tp = np.cumsum(w * self.det_tp, axis=1)[:, self.point_ends]
        fp = np.cumsum(w * self.det_fp, axis=1)[:, self.point_ends]
        zero = np.zeros((len(counts), 1))
        with np.errstate(all="ignore"):
            fpr = np.hstack([zero, fp]) / n_img[:, None]
            sens = np.hstack([zero, tp]) / n_box[:, None]
        return fpr, sens

    def froc_at(self, counts: np.ndarray, rates: Sequence[float]) -> np.ndarray:
        """(B, len(rates)) best sensitivity at <= rate FP/image; NaN where no fracture box is drawn."""
        fpr, sens = self.froc_points(counts)
        out = np.stack([_best_sensitivity(fpr, sens, f) for f in rates], axis=1)
        n_box = counts @ self.boxes_per_group
        out[n_box <= 0] = np.nan
        return out

    def pointing(self, counts: np.ndarray) -> np.ndarray:
        n = counts @ self.frac_per_group
        with np.errstate(all="ignore"):
            return np.where(n > 0, (counts @ self.hits_per_group) / np.where(n > 0, n, 1), np.nan)


def _best_sensitivity(fpr: np.ndarray, sens: np.ndarray, rate: float) -> np.ndarray:
    """Per row: the highest sensitivity among points with FP/image <= rate (the origin always qualifies)."""
    return np.where(fpr <= rate + 1e-12, sens, 0.0).max(axis=1)


# --------------------------------------------------------------------------- AP (torchmetrics)


def _torch_inputs(preds: list[np.ndarray], gts: list[np.ndarray]) -> tuple[list[dict], list[dict]]:
    import torch

    tp = [{"boxes": torch.from_numpy(np.ascontiguousarray(p[:, :4])),
           "scores": torch.from_numpy(np.ascontiguousarray(p[:, 4])),
           "labels": torch.zeros(len(p), dtype=torch.long)} for p in preds]
    tt = [{"boxes": torch.from_numpy(np.ascontiguousarray(g)),
           "labels": torch.zeros(len(g), dtype=torch.long)} for g in gts]
    return tp, tt


def _coco_ap(tm_preds: list[dict], tm_targets: list[dict]) -> tuple[float, float]:
    """(AP50, AP50:95) from torchmetrics' MeanAveragePrecision; NaN when undefined (no GT box)."""
    from torchmetrics.detection import MeanAveragePrecision

    if not any(len(t["boxes"]) for t in tm_targets):
        return math.nan, math.nan
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    # COCO keeps the top 100 boxes per image (documented above); the warning would repeat per resample.
    metric.warn_on_many_detections = False
    metric.update(tm_preds, tm_targets)
    res = metric.compute()
    ap50, ap = float(res["map_50"]), float(res["map"])
    # torchmetrics reports -1 for "undefined".
    return (ap50 if ap50 >= 0 else math.nan), (ap if ap >= 0 else math.nan)


# --------------------------------------------------------------------------- main API


def _empty_result(n_excluded: int, resamples: dict[str, int]) -> dict[str, Any]:
    keys = [_rate_key(f) for f in FROC_FP_RATES]
    return {
        "ap50": None, "ap50_95": None, "pointing": None,
        "froc_sensitivity": {k: None for k in keys},
        "n_images": 0, "n_boxes": 0, "n_fractured_images": 0, "n_detections": 0,
        "n_unannotated_excluded": n_excluded,
        "ci95": {"ap50": None, "ap50_95": None, "pointing": None,
                 "froc_sensitivity": {k: None for k in keys}},
        "ci95_resamples": resamples,
        "froc_curve": {"fp_per_image": [], "sensitivity": [], "n_images": 0, "n_boxes": 0},
    }


def localization_metrics(pred_boxes: Sequence[Any], gt_boxes: Sequence[Any],
                         groups: Sequence[Hashable], n_bootstrap: int = 1000, seed: int = 0, *,
                         n_bootstrap_ap: int = 200) -> dict[str, Any]:
    """AP50, AP50:95, FROC, pointing game and their 95% bootstrap CIs (see the module docstring).

    Layout (JSON-ready; undefined values are None)::

        ap50, ap50_95, pointing, froc_sensitivity.{"0.5","1","2"},
        n_images, n_boxes, n_fractured_images, n_detections, n_unannotated_excluded,
        ci95.{ap50, ap50_95, pointing} -> [lo, hi] | None, ci95.froc_sensitivity.{"0.5","1","2"},
        ci95_resamples.{ap50, ap50_95, pointing, froc_sensitivity} -> int,
        froc_curve.{fp_per_image: [...], sensitivity: [...], n_images, n_boxes}

    ``froc_curve`` lists the origin, then the operating points where sensitivity rises, then the
    last operating point (all detections): the step curve "best sensitivity at <= x FP/image" is
    exact from these. ``n_bootstrap=0`` disables the CIs; AP's CI uses
    ``min(n_bootstrap, n_bootstrap_ap)`` resamples.
    """
    if not len(pred_boxes) == len(gt_boxes) == len(groups):
        raise ValueError(f"localization_metrics: {len(pred_boxes)} predictions, {len(gt_boxes)} "
                         f"ground truths and {len(groups)} groups; one of each per image")
    preds_all, gts_all = _as_preds(pred_boxes), _as_gt(gt_boxes)
    keep = [i for i, g in enumerate(gts_all) if g is not None]
    n_excluded = len(gts_all) - len(keep)
    n_boot = max(0, int(n_bootstrap))
    n_boot_ap = min(n_boot, max(0, int(n_bootstrap_ap)))
    resamples = {"ap50": n_boot_ap, "ap50_95": n_boot_ap, "pointing": n_boot,
                 "froc_sensitivity": n_boot}
    if not keep:
        return _empty_result(n_excluded, resamples)

    preds = [preds_all[i] for i in keep]
    gts: list[np.ndarray] = [gts_all[i] for i in keep]  # type: ignore[misc]
    group_keys = [groups[i] for i in keep]
    uniq: dict[Hashable, int] = {}
    group_idx = np.array([uniq.setdefault(g, len(uniq)) for g in group_keys], dtype=int)
    n_groups = len(uniq)
    prep = _Prepared(preds, gts, group_idx, n_groups)
    n_boxes = int(sum(len(g) for g in gts))
    rates = FROC_FP_RATES
    keys = [_rate_key(f) for f in rates]

    ones = np.ones((1, n_groups))
    tm_preds, tm_targets = _torch_inputs(preds, gts)
    ap50, ap = _coco_ap(tm_preds, tm_targets)
    point_froc = prep.froc_at(ones, rates)[0]
    point_pointing = prep.pointing(ones)[0]
    fpr, sens = (a[0] for a in prep.froc_points(ones))

    result: dict[str, Any] = {
        "ap50": _clean(ap50), "ap50_95": _clean(ap), "pointing": _clean(point_pointing),
        "froc_sensitivity": {k: _clean(v) for k, v in zip(keys, point_froc)},
        "n_images": len(preds), "n_boxes": n_boxes,
        "n_fractured_images": int(sum(len(g) > 0 for g in gts)),
        "n_detections": int(sum(len(p) for p in preds)),
        "n_unannotated_excluded": n_excluded,
        "ci95_resamples": resamples,
        "froc_curve": _curve_corners(fpr, sens, len(preds), n_boxes),
    }

    ci: dict[str, Any] = {"ap50": None, "ap50_95": None, "pointing": None,
                          "froc_sensitivity": {k: None for k in keys}}
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
        froc_vals, pointing_vals = [], []
        chunk = max(1, _BOOT_CHUNK_ELEMS // max(len(prep.det_tp), n_groups, 1))
        for start in range(0, n_boot, chunk):
            d = draws[start:start + chunk]
            b = len(d)
            counts = np.bincount((d + np.arange(b)[:, None] * n_groups).ravel(),
                                 minlength=b * n_groups).reshape(b, n_groups).astype(np.float64)
            froc_vals.append(prep.froc_at(counts, rates))
            pointing_vals.append(prep.pointing(counts))
        froc_b = np.concatenate(froc_vals)
        ci["pointing"] = _percentile_ci(np.concatenate(pointing_vals))
        ci["froc_sensitivity"] = {k: _percentile_ci(froc_b[:, j]) for j, k in enumerate(keys)}
        if n_boot_ap > 0 and not math.isnan(ap50):
            members = [np.flatnonzero(group_idx == g) for g in range(n_groups)]
            ap_b = np.full((n_boot_ap, 2), np.nan)
            for r in range(n_boot_ap):
                idx = np.concatenate([members[g] for g in draws[r]])
                ap_b[r] = _coco_ap([tm_preds[i] for i in idx], [tm_targets[i] for i in idx])
            ci["ap50"], ci["ap50_95"] = _percentile_ci(ap_b[:, 0]), _percentile_ci(ap_b[:, 1])
    # A CI for an undefined point estimate would be meaningless.
    for k in ("ap50", "ap50_95", "pointing"):
        if result[k] is None:
            ci[k] = None
    for k in keys:
        if result["froc_sensitivity"][k] is None:
            ci["froc_sensitivity"][k] = None
    result["ci95"] = ci
    return result


def _curve_corners(fpr: np.ndarray, sens: np.ndarray, n_images: int, n_boxes: int) -> dict[str, Any]:
    """The origin, the points where sensitivity rises, and the last point (see localization_metrics)."""
    if n_boxes == 0 or not np.isfinite(sens).all():
        return {"fp_per_image": [], "sensitivity": [], "n_images": n_images, "n_boxes": n_boxes}
    rise = np.r_[True, np.diff(sens) > 0]
    rise[-1] = True
    return {"fp_per_image": [float(x) for x in fpr[rise]],
            "sensitivity": [float(x) for x in sens[rise]],
            "n_images": n_images, "n_boxes": n_boxes}


# --------------------------------------------------------------------------- plot and report


def plot_froc(froc_curve: Mapping[str, Any], path: str | os.PathLike,
              ci: Mapping[str, Any] | None = None) -> bool:
    """Draw ``froc.png``: sensitivity against FP/image (log axis, 0.125 to 8), markers at 0.5/1/2.

    ``froc_curve`` is ``localization_metrics(...)["froc_curve"]``; ``ci`` optionally its
    ``["ci95"]["froc_sensitivity"]`` (error bars at the markers). Returns False (no file) when the
    curve is empty (no fracture boxes).
    """
    fp = np.asarray(froc_curve.get("fp_per_image") or [], dtype=float)
    se = np.asarray(froc_curve.get("sensitivity") or [], dtype=float)
    if fp.size == 0:
        return False
    import matplotlib

    matplotlib.use("Agg")  # headless: evaluation runs on servers and in CI
    import matplotlib.pyplot as plt

    lo_x, hi_x = 0.125, 8.0
    # The step curve "best sensitivity at <= x": each point holds until the next one.
    xs = np.r_[np.maximum(fp, lo_x / 2), max(hi_x, fp[-1])]
    ys = np.r_[se, se[-1]]
    fig, ax = plt.subplots(figsize=(5.8, 4.6))
    ax.step(xs[:-1], ys[:-1], where="post", lw=2, color="C0", label="FROC")
    if fp[-1] < hi_x:
        ax.plot(xs[-2:], ys[-2:], ":", lw=2, color="C0", label="beyond the last detection")
    for n, f in enumerate(FROC_FP_RATES):
        label = "at 0.5, 1, 2 FP/image" + (" (95% CI)" if ci else "") if n == 0 else None
        s = float(_best_sensitivity(fp[None], se[None], f)[0])
        band = (ci or {}).get(_rate_key(f))
        if band and band[0] is not None and band[1] is not None:
            ax.errorbar([f], [s], yerr=[[s - band[0]], [band[1] - s]], fmt="o", color="C3",
                        capsize=4, zorder=3, label=label)
        else:
            ax.plot([f], [s], "o", color="C3", zorder=3, label=label)
        ax.annotate(f"{s:.2f}", (f, s), textcoords="offset points", xytext=(6, -14), fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_xlim(lo_x, hi_x)
    ticks = [0.125, 0.25, 0.5, 1, 2, 4, 8]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("False positives per image")
    ax.set_ylabel("Sensitivity (per fracture box)")
    ax.set_title(f"FROC: {froc_curve.get('n_images')} images, "
                 f"{froc_curve.get('n_boxes')} fracture boxes")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def report_section(loc: Mapping[str, Any], froc_png: str | None = "froc.png") -> str:
    """The "Localization" section of report.md for ``localization_metrics(...)``'s dict.

    ``froc_png`` is the FROC plot's path relative to report.md (None: no image link).
    """
    from .report import _fmt, _fmt_ci, _table

    ci = loc.get("ci95") or {}
    froc, froc_ci = loc.get("froc_sensitivity") or {}, ci.get("froc_sensitivity") or {}
    res = loc.get("ci95_resamples") or {}
    rows = [["AP50 (COCO)", _fmt_ci(loc.get("ap50"), ci.get("ap50"))],
            ["AP50:95 (COCO)", _fmt_ci(loc.get("ap50_95"), ci.get("ap50_95"))],
            ["Pointing game (top box centre in a fracture box)",
             _fmt_ci(loc.get("pointing"), ci.get("pointing"))]]
    rows += [[f"FROC sensitivity at {k} FP/image", _fmt_ci(froc.get(k), froc_ci.get(k))]
             for k in (_rate_key(f) for f in FROC_FP_RATES)]
    out = ["## Localization (fracture boxes)", "",
           f"{_fmt(loc.get('n_images'))} images with known boxes "
           f"({_fmt(loc.get('n_fractured_images'))} fractured, {_fmt(loc.get('n_boxes'))} fracture "
           f"boxes, {_fmt(loc.get('n_detections'))} predicted boxes); "
           f"{_fmt(loc.get('n_unannotated_excluded'))} fractured image(s) without annotations "
           "left out.", ""]
    out += _table(["Metric", "Value [95% CI]"], rows)
    out += ["",
            "AP from torchmetrics' MeanAveragePrecision (COCO, one class, normal images included, "
            "so their boxes are false positives). FROC (DeepLesion convention): a box is a hit at "
            "IoU >= 0.5 with a fracture box not hit yet, boxes taken in score order; a box on an "
            "already-hit fracture only is neither hit nor false positive; sensitivity at f is the "
            "best reached with at most f false positives per image. Pointing: fractured images "
            "only; no box is a miss. CIs: percentile bootstrap over exam groups "
            f"({_fmt(res.get('ap50'))} resamples for AP, {_fmt(res.get('pointing'))} for the "
            "others).", ""]
    if froc_png:
        out += [f"![FROC]({froc_png})", ""]
    return "\n".join(out)
