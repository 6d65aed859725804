"""Model-independent evaluation metrics for bonexray predictions.

Input is a per-image prediction table (a pandas DataFrame, or anything ``pd.DataFrame()``
accepts) with columns ``path, study_id, body_part, abnormal, prob_abnormal, pred_body_part``
and optionally one ``prob_<part>`` column per body-part class.

Conventions used throughout:

* an image/study is called abnormal when ``prob >= threshold``;
* a study's probability is the **mean** of its images' probabilities and its label is the
  study label (MURA's official protocol); its body part is the majority of its images' true
  body parts (ties: the part seen first in the study);
* metrics that are mathematically undefined for the data at hand (AUROC with one class,
  precision with no predicted positives, kappa when chance agreement is 1, ...) are ``None``,
  never NaN, so the result serialises to strict JSON.

Point estimates use scikit-learn (an independent, well-kept implementation). The bootstrap
uses small vectorised re-implementations of AUROC and kappa because calling scikit-learn
1000 times is too slow; tests check them against scikit-learn.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    roc_auc_score,
)

from .intervals import finite_or_none, percentile_ci

__all__ = ["compute_metrics", "choose_threshold", "study_table", "binary_metrics", "report_section"]

REQUIRED_COLUMNS = ("study_id", "body_part", "abnormal", "prob_abnormal")
IMAGE_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "auroc",
              "average_precision", "kappa", "n")
STUDY_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "auroc", "kappa", "n")

# Bootstrap works on (resamples x images) float matrices; keep each chunk around 40 MB.
_BOOT_CHUNK_ELEMS = 5_000_000


# --------------------------------------------------------------------------- helpers


from ..training.threshold import choose_threshold  # noqa: E402,F401 - re-exported for evaluate


def _quiet(fn, *args, **kwargs):
    """Call a scikit-learn metric without letting its numpy/sklearn warnings leak."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _as_frame(pred_table: Any) -> pd.DataFrame:
    df = pred_table if isinstance(pred_table, pd.DataFrame) else pd.DataFrame(pred_table)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"prediction table lacks column(s): {', '.join(missing)}")
    return df


def _prepare(pred_table: Any) -> pd.DataFrame:
    """Validate and normalise the prediction table (copy; original untouched)."""
    df = _as_frame(pred_table).copy()
    prob = pd.to_numeric(df["prob_abnormal"], errors="coerce")
    bad = prob.isna()
    if bad.any():
        # Unreadable images may come through with no probability; they cannot be scored.
        warnings.warn(f"{int(bad.sum())} image(s) without a valid prob_abnormal are ignored",
                      UserWarning, stacklevel=3)
        df = df.loc[~bad].copy()
        prob = prob.loc[~bad]
    if len(df) == 0:
        raise ValueError("prediction table has no scorable images")
    if ((prob < 0) | (prob > 1)).any():
        raise ValueError("prob_abnormal must lie in [0, 1]")
    df["prob_abnormal"] = prob.astype(float)
    lab = pd.to_numeric(df["abnormal"], errors="coerce")
    if lab.isna().any() or not lab.isin([0, 1]).all():
        raise ValueError("abnormal must be 0/1 for every image")
    df["abnormal"] = lab.astype(int)
    no_study = df["study_id"].isna()
    if no_study.any():
        # groupby would silently drop these images; score each as a study of its own.
        warnings.warn(f"{int(no_study.sum())} image(s) without study_id are treated as "
                      "single-image studies", UserWarning, stacklevel=3)
        df["study_id"] = df["study_id"].astype(object)
        df.loc[no_study, "study_id"] = [f"__image_{i}" for i in df.index[no_study]]
    df["body_part"] = df["body_part"].astype(str)
    if "pred_body_part" not in df.columns:
        prob_cols = [c for c in df.columns if str(c).startswith("prob_") and c != "prob_abnormal"]
        if prob_cols:
            # Fall back to the arg-max of the per-class probabilities.
            names = np.array([str(c)[len("prob_"):] for c in prob_cols])
            df["pred_body_part"] = names[np.argmax(df[prob_cols].to_numpy(float), axis=1)]
    if "pred_body_part" in df.columns:
        df["pred_body_part"] = df["pred_body_part"].astype(str)
    return df


def study_table(pred_table: Any) -> pd.DataFrame:
    """One row per study: ``study_id, body_part, abnormal, prob_abnormal, n_images``.

    ``prob_abnormal`` is the mean of the images' probabilities; ``abnormal`` is the shared
    study label (if images disagree, the max is taken and a warning issued); ``body_part``
    is the majority of the images' true body parts, ties going to the part seen first.
    Studies appear in order of first appearance.
    """
    df = _as_frame(pred_table)
    df = df.assign(body_part=df["body_part"].astype(str),
                   prob_abnormal=pd.to_numeric(df["prob_abnormal"], errors="coerce"),
                   abnormal=pd.to_numeric(df["abnormal"], errors="coerce"))
    g = df.groupby("study_id", sort=False)
    out = g.agg(abnormal=("abnormal", "max"), lab_min=("abnormal", "min"),
                prob_abnormal=("prob_abnormal", "mean"), n_images=("prob_abnormal", "size"))
    mixed = out["abnormal"] != out["lab_min"]
    if mixed.any():
        warnings.warn(f"{int(mixed.sum())} stud(y/ies) have images with different abnormal "
                      f"labels; using the max (e.g. {list(out.index[mixed][:3])})",
                      UserWarning, stacklevel=2)
    # Majority body part: groupby(sort=False) lists (study, part) pairs in order of first
    # appearance, and a stable sort by count keeps that order among ties.
    counts = (df.groupby(["study_id", "body_part"], sort=False).size()
              .reset_index(name="c").sort_values("c", ascending=False, kind="stable")
              .drop_duplicates("study_id").set_index("study_id")["body_part"])
    out["body_part"] = counts.reindex(out.index)
    out = out.reset_index()[["study_id", "body_part", "abnormal", "prob_abnormal", "n_images"]]
    out["abnormal"] = out["abnormal"].astype(int)
    return out


def _kappa_from_cells(tn, fp, fn, tp):
    """Cohen's kappa from (arrays of) binary confusion cells; NaN where undefined.

    Written as integer-valued numerator/denominator so "chance agreement == 1" is an exact
    zero test rather than a floating-point near-miss.
    """
    tn, fp, fn, tp = (np.asarray(a, dtype=float) for a in (tn, fp, fn, tp))
    n = tn + fp + fn + tp
    chance = (tp + fn) * (tp + fp) + (tn + fp) * (tn + fn)
    num = n * (tn + tp) - chance
    den = n * n - chance
    with np.errstate(all="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def binary_metrics(y_true: Any, prob: Any, threshold: float, *, with_ap: bool = True
                   ) -> dict[str, float | int | None]:
    """Abnormality metrics for one set of (label, probability) pairs at ``threshold``."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob, dtype=float)
    keys = IMAGE_KEYS if with_ap else STUDY_KEYS
    out: dict[str, float | int | None] = {k: None for k in keys}
    out["n"] = int(len(y))
    if len(y) == 0:
        return out
    pred = (p >= threshold).astype(int)
    both = len(np.unique(y)) == 2
    nan = np.nan
    out["accuracy"] = finite_or_none(_quiet(accuracy_score, y, pred))
    out["precision"] = finite_or_none(_quiet(precision_score, y, pred, labels=[0, 1], pos_label=1,
                                     zero_division=nan))
    out["recall"] = finite_or_none(_quiet(recall_score, y, pred, labels=[0, 1], pos_label=1,
                                  zero_division=nan))
    out["specificity"] = finite_or_none(_quiet(recall_score, y, pred, labels=[0, 1], pos_label=0,
                                       zero_division=nan))
    out["f1"] = finite_or_none(_quiet(f1_score, y, pred, labels=[0, 1], pos_label=1, zero_division=nan))
    out["auroc"] = finite_or_none(_quiet(roc_auc_score, y, p)) if both else None
    if with_ap:
        out["average_precision"] = finite_or_none(_quiet(average_precision_score, y, p)) if y.any() \
            else None
    tn, fp, fn, tp = _quiet(confusion_matrix, y, pred, labels=[0, 1]).ravel()
    # sklearn divides by zero (warning + NaN) when chance agreement is 1; test it ourselves.
    if np.isfinite(_kappa_from_cells(tn, fp, fn, tp)):
        out["kappa"] = finite_or_none(_quiet(cohen_kappa_score, y, pred, labels=[0, 1]))
    return out


# --------------------------------------------------------------------------- bootstrap


def _weighted_auroc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC for each row of weights ``w`` (B, n) over the same (y, p); NaN if undefined.

    Mann-Whitney form with ties counted as 1/2, identical to the trapezoidal ROC area that
    scikit-learn computes (with ``sample_weight=w[b]``).
    """
    order = np.argsort(p, kind="stable")
    ps = p[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ps)) + 1]
    ws = w[:, order]
    pos = y[order].astype(bool)
    gpos = np.add.reduceat(np.where(pos, ws, 0.0), starts, axis=1)
    gneg = np.add.reduceat(np.where(pos, 0.0, ws), starts, axis=1)
    neg_below = np.cumsum(gneg, axis=1) - gneg
    num = np.sum(gpos * (neg_below + 0.5 * gneg), axis=1)
    den = gpos.sum(axis=1) * gneg.sum(axis=1)
    with np.errstate(all="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _cells(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """One-hot (n, 4) of confusion cell [tn, fp, fn, tp] per item."""
    idx = 2 * y.astype(int) + pred.astype(int)
    return np.eye(4)[idx]


def _bootstrap_ci(img_study: np.ndarray, y_img: np.ndarray, p_img: np.ndarray,
                  y_st: np.ndarray, p_st: np.ndarray, threshold: float,
                  n_bootstrap: int, seed: int) -> dict[str, list[float] | None]:
    """95% percentile bootstrap CIs resampling studies (images follow their study).

    A resample where a metric is undefined (e.g. no abnormal study drawn) is skipped for
    that metric only.
    """
    n_st = len(y_st)
    rng = np.random.default_rng(seed)
    pred_img = (p_img >= threshold).astype(int)
    pred_st = (p_st >= threshold).astype(int)
    st_cells = _cells(y_st, pred_st)                                # (S, 4)
    img_cells = np.zeros((n_st, 4))
    np.add.at(img_cells, img_study, _cells(y_img, pred_img))        # image cells per study
    order = np.argsort(p_img, kind="stable")                        # sort once, reuse
    y_sorted, p_sorted, st_sorted = y_img[order], p_img[order], img_study[order]

    res = {k: [] for k in ("image_auroc", "study_auroc", "image_kappa", "study_kappa")}
    chunk = max(1, _BOOT_CHUNK_ELEMS // max(len(y_img), 1))
    done = 0
    while done < n_bootstrap:
        b = min(chunk, n_bootstrap - done)
        draws = rng.integers(0, n_st, size=(b, n_st))
        # Multiplicity of every study in every resample: one bincount over offset indices.
        counts = np.bincount((draws + np.arange(b)[:, None] * n_st).ravel(),
                             minlength=b * n_st).reshape(b, n_st).astype(float)
        res["study_auroc"].append(_weighted_auroc(y_st, p_st, counts))
        res["image_auroc"].append(_weighted_auroc(y_sorted, p_sorted, counts[:, st_sorted]))
        sc = counts @ st_cells
        ic = counts @ img_cells
        res["study_kappa"].append(_kappa_from_cells(*sc.T))
        res["image_kappa"].append(_kappa_from_cells(*ic.T))
        done += b
    return {k: percentile_ci(np.concatenate(v)) for k, v in res.items()}


# --------------------------------------------------------------------------- main API


def _body_part_metrics(df: pd.DataFrame, body_parts: Sequence[str]) -> tuple[dict, list]:
    labels = list(body_parts)
    k = len(labels)
    empty_cls = {p: {"precision": None, "recall": None, "support": 0} for p in labels}
    if "pred_body_part" not in df.columns:
        warnings.warn("no pred_body_part column: body-part metrics are n/a", UserWarning,
                      stacklevel=3)
        return ({"accuracy": None, "macro_precision": None, "macro_recall": None,
                 "macro_f1": None, "per_class": empty_cls}, [[0] * k for _ in range(k)])
    y, pr = df["body_part"].to_numpy(str), df["pred_body_part"].to_numpy(str)
    prec, rec, f1, sup = _quiet(precision_recall_fscore_support, y, pr, labels=labels,
                                average=None, zero_division=np.nan)

    def macro(a: np.ndarray) -> float | None:
        # Classes where the score is undefined (no support / no predictions) are left out,
        # as scikit-learn does with zero_division=nan.
        a = np.asarray(a, dtype=float)
        return finite_or_none(a[np.isfinite(a)].mean()) if np.isfinite(a).any() else None

    per_class = {p: {"precision": finite_or_none(prec[i]), "recall": finite_or_none(rec[i]),
                     "support": int(sup[i])} for i, p in enumerate(labels)}
    cm = _quiet(confusion_matrix, y, pr, labels=labels) if k else np.zeros((0, 0), int)
    return ({"accuracy": finite_or_none(_quiet(accuracy_score, y, pr)), "macro_precision": macro(prec),
             "macro_recall": macro(rec), "macro_f1": macro(f1), "per_class": per_class},
            cm.astype(int).tolist())


def compute_metrics(pred_table: Any, threshold: float, body_parts: Sequence[str],
                    n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """All evaluation metrics as a JSON-ready nested dict (see module docstring).

    Layout::

        threshold, n_images, n_studies
        abnormality.image.{accuracy,precision,recall,specificity,f1,auroc,average_precision,kappa,n}
        abnormality.study.{accuracy,precision,recall,specificity,f1,auroc,kappa,n}
        abnormality.per_body_part.<part>.image.{...} / .study.{...}
        abnormality.ci95.{image_auroc,study_auroc,image_kappa,study_kappa} -> [low, high] | None
        body_part.{accuracy,macro_precision,macro_recall,macro_f1,per_class.<part>.{precision,recall,support}}
        confusion.abnormality (image level), confusion.abnormality_study, confusion.body_part

    Confusion matrices are lists of lists, rows = truth, columns = prediction
    ([normal, abnormal], or ``body_parts`` order). ``n_bootstrap=0`` disables the CIs (None).
    """
    threshold = float(threshold)
    df = _prepare(pred_table)
    body_parts = [str(b) for b in body_parts]
    unknown = sorted(set(df["body_part"]) - set(body_parts))
    if unknown:
        warnings.warn(f"true body part(s) not in body_parts: {unknown}; they are left out of "
                      "per-body-part and body-part confusion results", UserWarning, stacklevel=2)
    st = study_table(df)

    y_img, p_img = df["abnormal"].to_numpy(int), df["prob_abnormal"].to_numpy(float)
    y_st, p_st = st["abnormal"].to_numpy(int), st["prob_abnormal"].to_numpy(float)
    img_m = binary_metrics(y_img, p_img, threshold, with_ap=True)
    st_m = binary_metrics(y_st, p_st, threshold, with_ap=False)
    ci = _abnormality_cis(df, st, threshold, n_bootstrap, seed, img_m, st_m)
    bp, bp_cm = _body_part_metrics(df, body_parts)
    return {
        "threshold": threshold,
        "n_images": int(len(df)),
        "n_studies": int(len(st)),
        "abnormality": {"image": img_m, "study": st_m, "per_body_part": _per_body_part(df, st, body_parts, threshold),
                        "ci95": ci},
        "body_part": bp,
        "confusion": {
            "abnormality": _quiet(confusion_matrix, y_img, (p_img >= threshold).astype(int),
                                  labels=[0, 1]).tolist(),
            "abnormality_study": _quiet(confusion_matrix, y_st, (p_st >= threshold).astype(int),
                                        labels=[0, 1]).tolist(),
            "body_part": bp_cm,
        },
    }


def _per_body_part(df: pd.DataFrame, st: pd.DataFrame, body_parts: Sequence[str], threshold: float) -> dict[str, Any]:
    """Image- and study-level abnormality metrics of each body part (its studies: by majority part)."""
    y_img, p_img = df["abnormal"].to_numpy(int), df["prob_abnormal"].to_numpy(float)
    y_st, p_st = st["abnormal"].to_numpy(int), st["prob_abnormal"].to_numpy(float)
    per_part: dict[str, Any] = {}
    for part in body_parts:
        im = df["body_part"].to_numpy() == part
        sm = st["body_part"].to_numpy() == part
        per_part[part] = {
            "image": binary_metrics(y_img[im], p_img[im], threshold, with_ap=True),
            "study": binary_metrics(y_st[sm], p_st[sm], threshold, with_ap=False),
        }
    return per_part


def _abnormality_cis(df: pd.DataFrame, st: pd.DataFrame, threshold: float, n_bootstrap: int, seed: int,
                     img_m: dict, st_m: dict) -> dict[str, list[float] | None]:
    """The study bootstrap's AUROC and kappa CIs; None for a point estimate that is undefined."""
    if n_bootstrap > 0:
        study_index = pd.Index(st["study_id"]).get_indexer(df["study_id"])
        ci = _bootstrap_ci(study_index, df["abnormal"].to_numpy(int), df["prob_abnormal"].to_numpy(float),
                           st["abnormal"].to_numpy(int), st["prob_abnormal"].to_numpy(float), threshold,
                           int(n_bootstrap), seed)
    else:
        ci = {k: None for k in ("image_auroc", "study_auroc", "image_kappa", "study_kappa")}
    # A CI for an undefined point estimate would be meaningless.
    for key, point in (("image_auroc", img_m["auroc"]), ("study_auroc", st_m["auroc"]),
                       ("image_kappa", img_m["kappa"]), ("study_kappa", st_m["kappa"])):
        if point is None:
            ci[key] = None
    return ci


# --------------------------------------------------------------------------- report section


def report_section(metrics: dict[str, Any], body_parts: Sequence[str], threshold: float | None = None) -> str:
    """The abnormality and body-part sections of report.md for ``compute_metrics(...)``'s dict."""
    from .markdown import fmt, fmt_ci, table

    ab = metrics.get("abnormality", {})
    img, st, ci = ab.get("image", {}), ab.get("study", {}), ab.get("ci95", {}) or {}
    threshold = metrics.get("threshold") if threshold is None else threshold
    out = [f"An image or study is called abnormal when its probability is ≥ "
           f"{fmt(threshold)}. A study's probability is the mean over its images "
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
            rows.append([label, fmt_ci(img.get(key), ci.get(f"image_{key}")),
                         fmt_ci(st.get(key), ci.get(f"study_{key}"))])
        else:
            rows.append([label, fmt(img.get(key)),
                         fmt(st.get(key)) if key in st else "–"])
    out += table(["Metric", "Image level", "Study level"], rows, align="l")
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
            rows.append([part, fmt(s.get("n")), fmt(i.get("n")), fmt(s.get("kappa")),
                         fmt(s.get("auroc")), fmt(s.get("accuracy")),
                         fmt(i.get("accuracy"))])
        out += table(["Body part", "Studies", "Images", "Study kappa", "Study AUROC",
                      "Study accuracy", "Image accuracy"], rows)
        out.append("")

    bp = metrics.get("body_part", {}) or {}
    out += ["## Body-part classification (image level)", ""]
    rows = []
    pc = bp.get("per_class", {}) or {}
    for part in body_parts:
        c = pc.get(part, {})
        rows.append([part, fmt(c.get("precision")), fmt(c.get("recall")),
                     fmt(c.get("support"))])
    total = sum(int(pc.get(p, {}).get("support") or 0) for p in body_parts)
    rows.append(["**macro average**", fmt(bp.get("macro_precision")),
                 fmt(bp.get("macro_recall")), fmt(total)])
    out += table(["Class", "Precision", "Recall", "Support"], rows)
    out += ["", f"Accuracy: **{fmt(bp.get('accuracy'))}**, macro F1: "
            f"**{fmt(bp.get('macro_f1'))}**.", ""]
    return "\n".join(out)
