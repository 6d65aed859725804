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

One matching pass, COCO's (pycocotools ``COCOeval.evaluateImg`` for one class, bbox IoU): per image the
detections are sorted by score (stable: the input order among ties) and cut to the top
``COCO_MAX_DETECTIONS`` (100); at each IoU threshold t of 0.50:0.05:0.95 each detection in turn takes the
unmatched fracture box it overlaps most with IoU >= t (of equal IoUs, the later box, as pycocotools'
loop does), or stays unmatched. IoU is area of intersection over area of union in continuous pixel
coordinates (no +1). COCO's crowd and ignore rules change nothing for this data: fracture boxes are
never crowds, and the "all" area range ignores no box. AP, FROC and pointing are all computed from
these matches, and the bootstrap reweights them; nothing is matched again.

* **AP50, AP50:95**: COCO's all-point precision envelope read at 101 recall points, detections of all
  images in one list by descending score (ties: image order, then each image's order), as
  pycocotools' ``accumulate`` does. Every evaluated image counts, normal ones included, so a box on a
  normal image is a false positive, and a duplicate box on an already-matched fracture is one too.
  ``fractured_only`` is the same AP on the images with at least one fracture box alone (FracAtlas's
  official protocol: its test split holds fractured images only).
* **FROC** (DeepLesion convention, Yan et al. 2018), from the matches at IoU 0.5: a matched detection
  is a true positive; an unmatched one that overlaps a fracture box at IoU >= 0.5 (a box another
  detection already took) is neither TP nor FP; every other detection, and every detection on a
  normal image, is a false positive. Sensitivity = hit boxes / all fracture boxes; FP/image = false
  positives / all evaluated images (normal ones included). Each operating point is a score threshold
  (ties enter together). ``froc_sensitivity[f]`` is the **best sensitivity among operating points with
  at most f FP/image** (no interpolation: a point a threshold can reach); past the last detection it
  stays at the final sensitivity. Two differences from the DeepLesion script (rsummers11/CADLab,
  MULAN ``detection_eval.py``): there a detection marks every box it overlaps at IoU >= 0.5 (here one
  box, as in COCO), and sensitivity at f is interpolated linearly between detections.
* **Pointing**: on images with fracture boxes, is the centre of the top-scoring box inside a
  fracture box (edges included)? An image without a predicted box is a miss.
* Undefined values (no fracture boxes, no images) are ``None``, never NaN. CIs are 95% percentile
  bootstrap intervals over exam groups, ``n_bootstrap`` resamples for every value (the same draws for
  AP, FROC and pointing; ``fractured_only`` draws among the groups of its own images); a resample
  where a value is undefined is skipped for that value. A resample weights each detection and each
  fracture box by how often its group was drawn, which equals COCO's evaluation of the resampled
  images except in the order of tied scores between different detections.
"""
from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from .markdown import fmt, fmt_ci, table
from .intervals import finite_or_none, percentile_ci

__all__ = ["FROC_FP_RATES", "COCO_IOU_THRESHOLDS", "COCO_MAX_DETECTIONS", "pointing_hits", "localization_metrics",
           "plot_froc", "report_section"]

FROC_FP_RATES = (0.5, 1.0, 2.0)
#: FROC's hit rule (and AP50's threshold).
IOU_THRESHOLD = 0.5
#: pycocotools' ``Params`` for bbox evaluation: IoU thresholds, recall points, detections per image.
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
COCO_RECALL_POINTS = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1, endpoint=True)
COCO_MAX_DETECTIONS = 100
# (resamples x detections) float matrices in the bootstrap; keep each chunk around 40 MB.
_BOOT_CHUNK_ELEMS = 5_000_000


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


# --------------------------------------------------------------------------- one matching pass


def _iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(n, m) IoU of xyxy boxes; 0 where they do not overlap."""
    w = np.minimum(pred[:, None, 2], gt[None, :, 2]) - np.maximum(pred[:, None, 0], gt[None, :, 0])
    h = np.minimum(pred[:, None, 3], gt[None, :, 3]) - np.maximum(pred[:, None, 1], gt[None, :, 1])
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_g = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    union = area_p[:, None] + area_g[None, :] - inter
    with np.errstate(all="ignore"):
        return np.where(inter > 0, inter / np.where(inter > 0, union, 1.0), 0.0)


def _match_image(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO's greedy matching of one image whose detections are already in descending score order.

    Returns ``matched`` ((T, n) bool: matched at ``COCO_IOU_THRESHOLDS[t]``) and each detection's best
    IoU with any fracture box (n,).
    """
    matched = np.zeros((len(COCO_IOU_THRESHOLDS), len(pred)), dtype=bool)
    if len(pred) == 0 or len(gt) == 0:
        return matched, np.zeros(len(pred))
    iou = _iou(pred[:, :4], gt)
    best = iou.max(axis=1)
    candidates = np.flatnonzero(best >= COCO_IOU_THRESHOLDS[0])  # the others match nothing at any t
    for ti, t in enumerate(COCO_IOU_THRESHOLDS):
        floor = min(float(t), 1 - 1e-10)  # pycocotools' floor: an IoU of exactly 1 still matches at 0.95
        taken = np.zeros(len(gt), dtype=bool)
        for d in candidates:
            if best[d] < floor:
                continue
            free = np.where(taken, -1.0, iou[d])
            top = free.max()
            if top < floor:
                continue
            g = len(free) - 1 - int(np.argmax(free[::-1] == top))
            taken[g] = True
            matched[ti, d] = True
    return matched, best


class _Matches:
    """The matching pass over every image: each evaluated detection with its image, score and match at
    every IoU threshold, in COCO's global order (descending score; ties: image order, then the image's)."""

    def __init__(self, preds: list[np.ndarray], gts: list[np.ndarray]) -> None:
        det_image, scores, matched, best = [], [], [], []
        for i, (p, g) in enumerate(zip(preds, gts)):
            q = p[np.argsort(-p[:, 4], kind="mergesort")[:COCO_MAX_DETECTIONS]]
            m, b = _match_image(q, g)
            det_image.append(np.full(len(q), i))
            scores.append(q[:, 4])
            matched.append(m)
            best.append(b)
        det_image.append(np.zeros(0, int))
        scores.append(np.zeros(0))
        matched.append(np.zeros((len(COCO_IOU_THRESHOLDS), 0), bool))
        best.append(np.zeros(0))
        score = np.concatenate(scores)
        order = np.argsort(-score, kind="mergesort")
        self.det_image = np.concatenate(det_image).astype(int)[order]
        self.score = score[order]
        self.matched = np.concatenate(matched, axis=1)[:, order]
        self.best_iou = np.concatenate(best)[order]
        self.n_gt = np.array([len(g) for g in gts], dtype=np.float64)
        # Pointing: the top box (the first of equal top scores) of each image, fractured images only.
        centres = np.full((len(preds), 2), np.nan)
        for i, p in enumerate(preds):
            if len(p):
                top = p[int(np.argmax(p[:, 4]))]
                centres[i] = [(top[0] + top[2]) / 2, (top[1] + top[3]) / 2]
        self.pointing_hit = pointing_hits(centres, gts) & (self.n_gt > 0)


class _Curves:
    """What AP, FROC and pointing need for one set of images, for any weighting of its exam groups."""

    def __init__(self, m: _Matches, images: np.ndarray, image_group: np.ndarray, n_groups: int) -> None:
        """``images``: indices into the matching pass; ``image_group[j]``: group (0..n_groups-1) of ``images[j]``."""
        group_of = np.full(len(m.n_gt), -1)
        group_of[images] = image_group
        keep = group_of[m.det_image] >= 0
        self.n_groups = n_groups
        self.det_group = group_of[m.det_image[keep]]
        matched = m.matched[:, keep]
        self.n_detections = int(keep.sum())
        self.images_per_group = np.bincount(image_group, minlength=n_groups).astype(np.float64)
        self.boxes_per_group = np.bincount(image_group, weights=m.n_gt[images], minlength=n_groups)
        fractured = (m.n_gt[images] > 0).astype(np.float64)
        self.frac_per_group = np.bincount(image_group, weights=fractured, minlength=n_groups)
        self.hits_per_group = np.bincount(image_group, weights=m.pointing_hit[images].astype(np.float64),
                                          minlength=n_groups)
        # Positions (in the global order) of the true positives at each IoU threshold.
        self.tp_pos = [np.flatnonzero(matched[t]) for t in range(len(COCO_IOU_THRESHOLDS))]
        # FROC: matched at 0.5 is a hit; unmatched on an already-taken box (IoU >= 0.5) is neither.
        t50 = int(np.flatnonzero(np.isclose(COCO_IOU_THRESHOLDS, IOU_THRESHOLD))[0])
        self.froc_tp_pos = self.tp_pos[t50]
        self.froc_ignored_pos = np.flatnonzero(~matched[t50] & (m.best_iou[keep] >= IOU_THRESHOLD))
        s = m.score[keep]
        # Operating points: the last detection of each run of equal scores (a threshold takes ties together).
        self.point_ends = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1] if len(s) else np.zeros(0, int)

    def evaluate(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """For rows of group weights (B, G): ``ap`` (B, T) per IoU threshold, ``fp_per_image`` and
        ``sensitivity`` (B, P+1: the origin, then every operating point), ``pointing`` (B,)."""
        b = len(counts)
        w = counts[:, self.det_group]
        wcum = np.cumsum(w, axis=1)  # all detections ranked at or before each position
        n_pos = counts @ self.boxes_per_group
        ap = np.empty((b, len(self.tp_pos)))
        for t, pos in enumerate(self.tp_pos):
            tp = np.cumsum(w[:, pos], axis=1)
            ap[:, t] = _coco_ap(tp, wcum[:, pos] - tp, n_pos)
        # FROC at each operating point: hits and ignored detections ranked at or before it.
        tp_c = np.cumsum(w[:, self.froc_tp_pos], axis=1)
        ig_c = np.cumsum(w[:, self.froc_ignored_pos], axis=1)
        zero = np.zeros((b, 1))
        tp_at = np.hstack([zero, tp_c])[:, np.searchsorted(self.froc_tp_pos, self.point_ends, side="right")]
        ig_at = np.hstack([zero, ig_c])[:, np.searchsorted(self.froc_ignored_pos, self.point_ends, side="right")]
        fp_at = wcum[:, self.point_ends] - tp_at - ig_at
        n_img = counts @ self.images_per_group
        n_frac = counts @ self.frac_per_group
        with np.errstate(all="ignore"):
            fpr = np.hstack([zero, fp_at]) / n_img[:, None]
            sens = np.hstack([zero, tp_at]) / n_pos[:, None]
            pointing = np.where(n_frac > 0, (counts @ self.hits_per_group) / np.where(n_frac > 0, n_frac, 1), np.nan)
        return {"ap": ap, "fp_per_image": fpr, "sensitivity": sens, "pointing": pointing}


def _coco_ap(tp: np.ndarray, fp: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    """COCO's AP per row from the cumulative (B, K) TP and FP counts at each true positive; NaN where
    there is no fracture box.

    pycocotools takes precision at every detection, makes it non-increasing from the right, and reads
    it at the first detection whose recall reaches each of 101 recall points (0 past the last one).
    Between two true positives precision only falls, so the envelope's values at the true positives
    are all it needs, and the recall points that land on each true positive are counted instead of
    searched.
    """
    if tp.shape[1] == 0:
        return np.where(n_pos > 0, 0.0, np.nan)
    with np.errstate(all="ignore"):
        precision = tp / (fp + tp + np.spacing(1))
        recall = tp / n_pos[:, None]
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    reached = np.searchsorted(COCO_RECALL_POINTS, recall, side="right")  # recall points <= each recall
    landed = np.diff(reached, axis=1, prepend=0)
    ap = (envelope * landed).sum(axis=1) / len(COCO_RECALL_POINTS)
    return np.where(n_pos > 0, ap, np.nan)


def _best_sensitivity(fpr: np.ndarray, sens: np.ndarray, rate: float) -> np.ndarray:
    """Per row: the highest sensitivity among points with FP/image <= rate (the origin always qualifies)."""
    return np.where(fpr <= rate + 1e-12, sens, 0.0).max(axis=1)


def _froc_at(out: dict[str, np.ndarray], counts: np.ndarray, boxes_per_group: np.ndarray) -> np.ndarray:
    """(B, len(FROC_FP_RATES)) best sensitivity at <= rate FP/image; NaN where no fracture box is drawn."""
    res = np.stack([_best_sensitivity(out["fp_per_image"], out["sensitivity"], f) for f in FROC_FP_RATES], axis=1)
    res[counts @ boxes_per_group <= 0] = np.nan
    return res


def _group_counts(draws: np.ndarray, n_groups: int) -> np.ndarray:
    """Multiplicity of every group in every resample (rows of ``draws``): one bincount over offset indices."""
    b = len(draws)
    return np.bincount((draws + np.arange(b)[:, None] * n_groups).ravel(),
                       minlength=b * n_groups).reshape(b, n_groups).astype(np.float64)


def _bootstrap(curves: _Curves, n_boot: int, seed: int, bar: Any = None) -> dict[str, np.ndarray]:
    """Every resample's AP (B, T), FROC sensitivities (B, R) and pointing (B,)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, curves.n_groups, size=(n_boot, curves.n_groups))
    ap, froc, pointing = [], [], []
    chunk = max(1, _BOOT_CHUNK_ELEMS // max(curves.n_detections, curves.n_groups, 1))
    for start in range(0, n_boot, chunk):
        counts = _group_counts(draws[start:start + chunk], curves.n_groups)
        out = curves.evaluate(counts)
        ap.append(out["ap"])
        froc.append(_froc_at(out, counts, curves.boxes_per_group))
        pointing.append(out["pointing"])
        if bar is not None:
            bar.update(len(counts))
    return {"ap": np.concatenate(ap), "froc": np.concatenate(froc), "pointing": np.concatenate(pointing)}


# --------------------------------------------------------------------------- main API

FRACTURED_ONLY_PROTOCOL = ("AP on the images with at least one fracture box alone (FracAtlas's official protocol, "
                           "whose test split holds fractured images only): boxes on normal images are not counted")


def _no_ci() -> dict[str, Any]:
    return {"ap50": None, "ap50_95": None, "pointing": None,
            "froc_sensitivity": {_rate_key(f): None for f in FROC_FP_RATES}}


def _fractured_only(n_boot: int) -> dict[str, Any]:
    return {"ap50": None, "ap50_95": None, "n_images": 0, "n_boxes": 0, "n_detections": 0,
            "ci95": {"ap50": None, "ap50_95": None}, "ci95_resamples": n_boot, "protocol": FRACTURED_ONLY_PROTOCOL}


def _empty_result(n_excluded: int, n_boot: int) -> dict[str, Any]:
    return {
        "ap50": None, "ap50_95": None, "pointing": None,
        "froc_sensitivity": {_rate_key(f): None for f in FROC_FP_RATES},
        "n_images": 0, "n_boxes": 0, "n_fractured_images": 0, "n_detections": 0,
        "n_unannotated_excluded": n_excluded,
        "ci95": _no_ci(),
        "ci95_resamples": _resamples(n_boot),
        "froc_curve": {"fp_per_image": [], "sensitivity": [], "n_images": 0, "n_boxes": 0},
        "fractured_only": _fractured_only(n_boot),
    }


def _resamples(n_boot: int) -> dict[str, int]:
    return {"ap50": n_boot, "ap50_95": n_boot, "pointing": n_boot, "froc_sensitivity": n_boot}


def _group_index(keys: Sequence[Hashable]) -> tuple[np.ndarray, int]:
    uniq: dict[Hashable, int] = {}
    return np.array([uniq.setdefault(g, len(uniq)) for g in keys], dtype=int), len(uniq)


def _ap_pair(ap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AP50, AP50:95) per row of a (B, T) AP table."""
    t50 = int(np.flatnonzero(np.isclose(COCO_IOU_THRESHOLDS, IOU_THRESHOLD))[0])
    return ap[:, t50], ap.mean(axis=1)


def localization_metrics(pred_boxes: Sequence[Any], gt_boxes: Sequence[Any],
                         groups: Sequence[Hashable], n_bootstrap: int = 1000, seed: int = 0, *,
                         progress: bool = False) -> dict[str, Any]:
    """AP50, AP50:95, FROC, pointing game and their 95% bootstrap CIs (see the module docstring).

    Layout (JSON-ready; undefined values are None)::

        ap50, ap50_95, pointing, froc_sensitivity.{"0.5","1","2"},
        n_images, n_boxes, n_fractured_images, n_detections, n_unannotated_excluded,
        ci95.{ap50, ap50_95, pointing} -> [lo, hi] | None, ci95.froc_sensitivity.{"0.5","1","2"},
        ci95_resamples.{ap50, ap50_95, pointing, froc_sensitivity} -> int,
        froc_curve.{fp_per_image: [...], sensitivity: [...], n_images, n_boxes},
        fractured_only.{ap50, ap50_95, n_images, n_boxes, n_detections, ci95.{ap50, ap50_95},
                        ci95_resamples, protocol}

    ``n_detections`` counts the detections evaluated (at most ``COCO_MAX_DETECTIONS`` per image).
    ``froc_curve`` lists the origin, then the operating points where sensitivity rises, then the
    last operating point (all detections): the step curve "best sensitivity at <= x FP/image" is
    exact from these. ``n_bootstrap=0`` disables the CIs. ``progress`` shows a bar over the resamples
    on stderr.
    """
    if not len(pred_boxes) == len(gt_boxes) == len(groups):
        raise ValueError(f"localization_metrics: {len(pred_boxes)} predictions, {len(gt_boxes)} "
                         f"ground truths and {len(groups)} groups; one of each per image")
    preds_all, gts_all = _as_preds(pred_boxes), _as_gt(gt_boxes)
    keep = [i for i, g in enumerate(gts_all) if g is not None]
    n_excluded = len(gts_all) - len(keep)
    n_boot = max(0, int(n_bootstrap))
    if not keep:
        return _empty_result(n_excluded, n_boot)

    preds = [preds_all[i] for i in keep]
    gts: list[np.ndarray] = [gts_all[i] for i in keep]  # type: ignore[misc]
    matches = _Matches(preds, gts)
    group_idx, n_groups = _group_index([groups[i] for i in keep])
    everything = _Curves(matches, np.arange(len(preds)), group_idx, n_groups)
    fractured = np.flatnonzero(matches.n_gt > 0)
    frac_group, n_frac_groups = _group_index(group_idx[fractured].tolist())
    fractured_curves = _Curves(matches, fractured, frac_group, n_frac_groups) if len(fractured) else None

    result = _point_estimates(everything, matches, len(preds), int(len(fractured)), n_excluded, n_boot)
    frac = _fractured_only(n_boot)
    if fractured_curves is not None:
        f_point = fractured_curves.evaluate(np.ones((1, n_frac_groups)))
        f50, f = (float(a[0]) for a in _ap_pair(f_point["ap"]))
        frac.update({"ap50": finite_or_none(f50), "ap50_95": finite_or_none(f), "n_images": int(len(fractured)),
                     "n_boxes": result["n_boxes"], "n_detections": fractured_curves.n_detections})
    ci = _no_ci()
    if n_boot > 0:
        _bootstrap_cis(everything, fractured_curves, n_boot, seed, progress, ci, frac)
    _drop_undefined_cis(result, ci, frac)
    result["ci95"] = ci
    result["fractured_only"] = frac
    return result


def _point_estimates(everything: _Curves, matches: _Matches, n_images: int, n_fractured: int, n_excluded: int,
                     n_boot: int) -> dict[str, Any]:
    """The full-set values (every group weighted once) and the counts of :func:`localization_metrics`."""
    ones = np.ones((1, everything.n_groups))
    point = everything.evaluate(ones)
    ap50, ap = (float(a[0]) for a in _ap_pair(point["ap"]))
    froc = _froc_at(point, ones, everything.boxes_per_group)[0]
    n_boxes = int(matches.n_gt.sum())
    return {
        "ap50": finite_or_none(ap50), "ap50_95": finite_or_none(ap), "pointing": finite_or_none(point["pointing"][0]),
        "froc_sensitivity": {_rate_key(f): finite_or_none(v) for f, v in zip(FROC_FP_RATES, froc)},
        "n_images": n_images, "n_boxes": n_boxes,
        "n_fractured_images": n_fractured,
        "n_detections": everything.n_detections,
        "n_unannotated_excluded": n_excluded,
        "ci95_resamples": _resamples(n_boot),
        "froc_curve": _curve_corners(point["fp_per_image"][0], point["sensitivity"][0], n_images, n_boxes),
    }


def _bootstrap_cis(everything: _Curves, fractured_curves: _Curves | None, n_boot: int, seed: int, progress: bool,
                   ci: dict[str, Any], frac: dict[str, Any]) -> None:
    """Fill ``ci`` (all images) and ``frac["ci95"]`` (fractured only) from ``n_boot`` resamples each."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_boot * (2 if fractured_curves is not None else 1), desc="box CIs", unit="resample",
                   leave=False)
    try:
        boot = _bootstrap(everything, n_boot, seed, bar)
        b50, b = _ap_pair(boot["ap"])
        ci["ap50"], ci["ap50_95"] = percentile_ci(b50), percentile_ci(b)
        ci["pointing"] = percentile_ci(boot["pointing"])
        ci["froc_sensitivity"] = {_rate_key(f): percentile_ci(boot["froc"][:, j]) for j, f in enumerate(FROC_FP_RATES)}
        if fractured_curves is not None:
            f_boot = _bootstrap(fractured_curves, n_boot, seed, bar)
            f50, f = _ap_pair(f_boot["ap"])
            frac["ci95"] = {"ap50": percentile_ci(f50), "ap50_95": percentile_ci(f)}
    finally:
        if bar is not None:
            bar.close()


def _drop_undefined_cis(result: dict[str, Any], ci: dict[str, Any], frac: dict[str, Any]) -> None:
    """A CI for an undefined point estimate would be meaningless: None there."""
    for k in ("ap50", "ap50_95", "pointing"):
        if result[k] is None:
            ci[k] = None
    for k in (_rate_key(f) for f in FROC_FP_RATES):
        if result["froc_sensitivity"][k] is None:
            ci["froc_sensitivity"][k] = None
    for k in ("ap50", "ap50_95"):
        if frac[k] is None:
            frac["ci95"][k] = None


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
    from .figures import new_figure, save_figure

    lo_x, hi_x = 0.125, 8.0
    # The step curve "best sensitivity at <= x": each point holds until the next one.
    xs = np.r_[np.maximum(fp, lo_x / 2), max(hi_x, fp[-1])]
    ys = np.r_[se, se[-1]]
    fig, ax = new_figure(figsize=(5.8, 4.6))
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
    save_figure(fig, path)
    return True


def report_section(loc: Mapping[str, Any], froc_png: str | None = "froc.png") -> str:
    """The "Localization" section of report.md for ``localization_metrics(...)``'s dict.

    ``froc_png`` is the FROC plot's path relative to report.md (None: no image link).
    """
    ci = loc.get("ci95") or {}
    froc, froc_ci = loc.get("froc_sensitivity") or {}, ci.get("froc_sensitivity") or {}
    res = loc.get("ci95_resamples") or {}
    frac = loc.get("fractured_only") or {}
    frac_ci = frac.get("ci95") or {}
    rows = [["AP50 (COCO)", fmt_ci(loc.get("ap50"), ci.get("ap50")), fmt_ci(frac.get("ap50"), frac_ci.get("ap50"))],
            ["AP50:95 (COCO)", fmt_ci(loc.get("ap50_95"), ci.get("ap50_95")),
             fmt_ci(frac.get("ap50_95"), frac_ci.get("ap50_95"))],
            ["Pointing game (top box centre in a fracture box)",
             fmt_ci(loc.get("pointing"), ci.get("pointing")), "–"]]
    rows += [[f"FROC sensitivity at {k} FP/image", fmt_ci(froc.get(k), froc_ci.get(k)), "–"]
             for k in (_rate_key(f) for f in FROC_FP_RATES)]
    rows.append(["Images / fracture boxes / predicted boxes",
                 f"{fmt(loc.get('n_images'))} / {fmt(loc.get('n_boxes'))} / {fmt(loc.get('n_detections'))}",
                 f"{fmt(frac.get('n_images'))} / {fmt(frac.get('n_boxes'))} / {fmt(frac.get('n_detections'))}"])
    out = ["## Localization (fracture boxes)", "",
           f"{fmt(loc.get('n_images'))} images with known boxes "
           f"({fmt(loc.get('n_fractured_images'))} fractured, {fmt(loc.get('n_boxes'))} fracture "
           f"boxes, {fmt(loc.get('n_detections'))} predicted boxes); "
           f"{fmt(loc.get('n_unannotated_excluded'))} fractured image(s) without annotations "
           "left out.", ""]
    out += table(["Metric", "All images [95% CI]", "Fractured images only [95% CI]"], rows)
    out += ["",
            "Two protocols. **All images**: AP over every evaluated image, normal ones included, so their "
            "boxes are false positives. **Fractured images only**: the same AP on the images with at least "
            "one fracture box alone, FracAtlas's official protocol (its test split holds fractured images "
            "only), the one published FracAtlas detectors report. AP is COCO's (one class, IoU 0.5 and "
            "0.50:0.95, 101-point interpolation, at most 100 boxes per image); a duplicate box on an "
            "already-matched fracture is a false positive. FROC (DeepLesion convention): a box is a hit at "
            "IoU >= 0.5 with a fracture box not hit yet, boxes taken in score order; a box on an "
            "already-hit fracture only is neither hit nor false positive; sensitivity at f is the best "
            "reached with at most f false positives per image. Pointing: fractured images only; no box is "
            "a miss. CIs: percentile bootstrap over exam groups "
            f"({fmt(res.get('ap50'))} resamples for every value).", ""]
    if froc_png:
        out += [f"![FROC]({froc_png})", ""]
    return "\n".join(out)
