"""Metrics are checked against hand-worked values and against scikit-learn."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    cohen_kappa_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from bonexray.evaluation.metrics import (
    IMAGE_KEYS,
    STUDY_KEYS,
    _kappa_from_cells,
    _weighted_auroc,
    choose_threshold,
    compute_metrics,
    study_table,
)

# Undefined metrics must not leak numpy/sklearn warnings: every test runs with them as errors.
pytestmark = pytest.mark.filterwarnings("error")


def _table(rows):
    return pd.DataFrame(rows, columns=["path", "study_id", "body_part", "abnormal",
                                       "prob_abnormal", "pred_body_part"])


@pytest.fixture
def six():
    """6 images / 3 studies, worked by hand below (threshold 0.5)."""
    return _table([
        ("a1.png", "A", "hand", 1, 0.9, "hand"),
        ("a2.png", "A", "hand", 1, 0.5, "hand"),
        ("b1.png", "B", "hand", 0, 0.2, "hand"),
        ("b2.png", "B", "hand", 0, 0.6, "elbow"),
        ("c1.png", "C", "elbow", 0, 0.7, "elbow"),
        ("c2.png", "C", "elbow", 0, 0.5, "hand"),
    ])


def test_six_image_example_by_hand(six):
    m = compute_metrics(six, 0.5, ["hand", "elbow"], n_bootstrap=200, seed=0)
    assert m["n_images"] == 6 and m["n_studies"] == 3 and m["threshold"] == 0.5

    # Images: y = 1 1 0 0 0 0, pred (p >= .5) = 1 1 0 1 1 1 -> tp 2, fn 0, fp 3, tn 1.
    im = m["abnormality"]["image"]
    assert set(im) == set(IMAGE_KEYS)
    assert im["n"] == 6
    assert im["accuracy"] == pytest.approx(3 / 6)
    assert im["precision"] == pytest.approx(2 / 5)
    assert im["recall"] == pytest.approx(1.0)
    assert im["specificity"] == pytest.approx(1 / 4)
    assert im["f1"] == pytest.approx(2 * 2 / (2 * 2 + 3 + 0))
    # kappa: po = 3/6; pe = P(y=1)P(pred=1) + P(y=0)P(pred=0) = 2/6*5/6 + 4/6*1/6 = 14/36.
    assert im["kappa"] == pytest.approx((18 / 36 - 14 / 36) / (1 - 14 / 36))
    # AUROC by pair counting: 0.9 beats all 4 negatives; 0.5 beats 0.2, ties 0.5 -> 5.5/8.
    assert im["auroc"] == pytest.approx(5.5 / 8)
    # AP = sum over thresholds of (recall step) * precision: 0.5 * 1 + 0.5 * 2/5.
    assert im["average_precision"] == pytest.approx(0.5 * 1 + 0.5 * 0.4)

    # Studies: mean probs A .7 (y 1), B .4 (y 0), C .6 (y 0) -> pred 1 0 1.
    st = m["abnormality"]["study"]
    assert set(st) == set(STUDY_KEYS)
    assert st["n"] == 3
    assert st["accuracy"] == pytest.approx(2 / 3)
    assert st["precision"] == pytest.approx(1 / 2)
    assert st["recall"] == pytest.approx(1.0)
    assert st["specificity"] == pytest.approx(1 / 2)
    assert st["f1"] == pytest.approx(2 / 3)
    # po = 2/3; pe = 1/3*2/3 + 2/3*1/3 = 4/9; kappa = (6/9 - 4/9) / (5/9) = 0.4.
    assert st["kappa"] == pytest.approx(0.4)
    assert st["auroc"] == pytest.approx(1.0)

    # Image confusion: rows truth [normal, abnormal], columns prediction.
    assert m["confusion"]["abnormality"] == [[1, 3], [0, 2]]
    assert m["confusion"]["abnormality_study"] == [[1, 1], [0, 1]]

    # Per body part: hand = studies A, B; elbow = study C.
    hand = m["abnormality"]["per_body_part"]["hand"]
    assert hand["study"]["n"] == 2 and hand["study"]["kappa"] == pytest.approx(1.0)
    # hand images: y 1 1 0 0, pred 1 1 0 1 -> po 3/4, pe 1/2*3/4 + 1/2*1/4 = 1/2.
    assert hand["image"]["kappa"] == pytest.approx((3 / 4 - 1 / 2) / (1 / 2))
    elbow = m["abnormality"]["per_body_part"]["elbow"]
    assert elbow["study"]["n"] == 1 and elbow["study"]["auroc"] is None
    assert elbow["image"]["recall"] is None  # no abnormal elbow image

    # Body part: true h h h h e e, pred h h h e e h.
    bp = m["body_part"]
    assert bp["accuracy"] == pytest.approx(4 / 6)
    assert bp["per_class"]["hand"] == {"precision": pytest.approx(3 / 4),
                                       "recall": pytest.approx(3 / 4), "support": 4}
    assert bp["per_class"]["elbow"] == {"precision": pytest.approx(1 / 2),
                                        "recall": pytest.approx(1 / 2), "support": 2}
    assert bp["macro_precision"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert m["confusion"]["body_part"] == [[3, 1], [1, 1]]

    # Strict JSON, no NaN anywhere.
    json.dumps(m, allow_nan=False)


def test_study_table(six):
    st = study_table(six)
    assert list(st.columns) == ["study_id", "body_part", "abnormal", "prob_abnormal", "n_images"]
    assert st["study_id"].tolist() == ["A", "B", "C"]
    assert st["prob_abnormal"].tolist() == pytest.approx([0.7, 0.4, 0.6])
    assert st["abnormal"].tolist() == [1, 0, 0]
    assert st["n_images"].tolist() == [2, 2, 2]


def test_study_body_part_majority_and_tie():
    df = _table([
        ("1", "S", "hand", 0, 0.1, "hand"), ("2", "S", "wrist", 0, 0.1, "hand"),
        ("3", "S", "wrist", 0, 0.1, "hand"),                       # majority -> wrist
        ("4", "T", "elbow", 0, 0.1, "hand"), ("5", "T", "hand", 0, 0.1, "hand"),  # tie -> first
    ])
    st = study_table(df).set_index("study_id")
    assert st.loc["S", "body_part"] == "wrist"
    assert st.loc["T", "body_part"] == "elbow"


def test_mixed_study_labels_take_max_and_warn():
    df = _table([("1", "S", "hand", 0, 0.2, "hand"), ("2", "S", "hand", 1, 0.4, "hand")])
    with pytest.warns(UserWarning, match="different abnormal"):
        st = study_table(df)
    assert st["abnormal"].tolist() == [1]
    assert st["prob_abnormal"].tolist() == pytest.approx([0.3])


def _per_part_table():
    """Two-image studies whose image probs average to the study prob given below."""
    rows = []
    studies = [  # (id, part, y, study prob)
        ("h1", "hand", 1, 0.8), ("h2", "hand", 1, 0.3), ("h3", "hand", 0, 0.6),
        ("h4", "hand", 0, 0.1),
        ("w1", "wrist", 1, 0.9), ("w2", "wrist", 1, 0.7), ("w3", "wrist", 1, 0.2),
        ("w4", "wrist", 0, 0.4), ("w5", "wrist", 0, 0.35),
    ]
    for sid, part, y, p in studies:
        rows.append((f"{sid}a", sid, part, y, p + 0.05, part))
        rows.append((f"{sid}b", sid, part, y, p - 0.05, part))
    # w5 gets one extra image labelled "hand": still a wrist study by majority (2 vs 1),
    # and its mean stays 0.35.
    rows.append(("w5c", "w5", "hand", 0, 0.35, "hand"))
    return _table(rows), studies


def test_per_body_part_kappa_by_hand():
    df, _ = _per_part_table()
    m = compute_metrics(df, 0.5, ["hand", "wrist"], n_bootstrap=0)
    per = m["abnormality"]["per_body_part"]
    # hand studies: y 1 1 0 0, pred 1 0 1 0 -> po 1/2, pe 1/2 -> kappa 0.
    assert per["hand"]["study"]["n"] == 4
    assert per["hand"]["study"]["kappa"] == pytest.approx(0.0)
    assert per["hand"]["study"]["accuracy"] == pytest.approx(0.5)
    # wrist studies: y 1 1 1 0 0, pred 1 1 0 0 0 -> po 4/5, pe 3/5*2/5 + 2/5*3/5 = 12/25.
    assert per["wrist"]["study"]["n"] == 5
    assert per["wrist"]["study"]["kappa"] == pytest.approx((20 / 25 - 12 / 25) / (13 / 25))
    assert per["wrist"]["study"]["auroc"] == pytest.approx(
        roc_auc_score([1, 1, 1, 0, 0], [0.9, 0.7, 0.2, 0.4, 0.35]))
    # Image level per part uses the image's own true body part (w5c counts as hand).
    assert per["hand"]["image"]["n"] == 9 and per["wrist"]["image"]["n"] == 10
    him = df[df.body_part == "hand"]
    assert per["hand"]["image"]["kappa"] == pytest.approx(
        cohen_kappa_score(him.abnormal, (him.prob_abnormal >= 0.5).astype(int)))
    # Overall study kappa agrees with sklearn on the study table.
    st = study_table(df)
    assert m["abnormality"]["study"]["kappa"] == pytest.approx(
        cohen_kappa_score(st.abnormal, (st.prob_abnormal >= 0.5).astype(int)))
    assert m["abnormality"]["ci95"] == {"image_auroc": None, "study_auroc": None,
                                        "image_kappa": None, "study_kappa": None}


def test_body_part_metrics_against_hand_and_sklearn():
    true = ["hand", "hand", "elbow", "elbow", "wrist", "wrist"]
    pred = ["hand", "elbow", "elbow", "elbow", "hand", "wrist"]
    df = _table([(str(i), f"s{i}", t, i % 2, 0.3, p) for i, (t, p) in enumerate(zip(true, pred))])
    parts = ["hand", "elbow", "wrist", "shoulder"]  # shoulder: no support, never predicted
    bp = compute_metrics(df, 0.5, parts, n_bootstrap=0)["body_part"]
    assert bp["accuracy"] == pytest.approx(4 / 6)
    assert bp["per_class"]["hand"]["precision"] == pytest.approx(1 / 2)
    assert bp["per_class"]["hand"]["recall"] == pytest.approx(1 / 2)
    assert bp["per_class"]["elbow"]["precision"] == pytest.approx(2 / 3)
    assert bp["per_class"]["elbow"]["recall"] == pytest.approx(1.0)
    assert bp["per_class"]["wrist"] == {"precision": 1.0, "recall": 0.5, "support": 2}
    assert bp["per_class"]["shoulder"] == {"precision": None, "recall": None, "support": 0}
    # Macro averages leave the undefined class out (hand-worked and sklearn's nan mode).
    assert bp["macro_precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert bp["macro_recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, r, f, _ = precision_recall_fscore_support(true, pred, labels=parts, average="macro",
                                                     zero_division=np.nan)
    assert (bp["macro_precision"], bp["macro_recall"], bp["macro_f1"]) == pytest.approx((p, r, f))
    m = compute_metrics(df, 0.5, parts, n_bootstrap=0)
    assert m["confusion"]["body_part"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]


def test_matches_sklearn_on_random_data():
    rng = np.random.default_rng(3)
    rows = []
    for s in range(60):
        y = int(rng.random() < 0.4)
        for i in range(rng.integers(1, 4)):
            rows.append((f"{s}/{i}", s, "hand", y, float(rng.random() * 0.6 + 0.3 * y), "hand"))
    df = _table(rows)
    m = compute_metrics(df, 0.45, ["hand"], n_bootstrap=0)
    from sklearn import metrics as skm
    y, p = df.abnormal.to_numpy(), df.prob_abnormal.to_numpy()
    pred = (p >= 0.45).astype(int)
    im = m["abnormality"]["image"]
    assert im["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert im["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert im["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert im["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert im["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert im["auroc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert im["average_precision"] == pytest.approx(skm.average_precision_score(y, p))
    assert im["kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))
    g = df.groupby("study_id").agg(y=("abnormal", "first"), p=("prob_abnormal", "mean"))
    assert m["abnormality"]["study"]["auroc"] == pytest.approx(skm.roc_auc_score(g.y, g.p))


def test_undefined_metrics_are_none():
    # Only normal images, all predicted normal: almost everything is undefined.
    df = _table([(str(i), f"s{i // 2}", "hand", 0, 0.1, "hand") for i in range(6)])
    m = compute_metrics(df, 0.5, ["hand", "wrist"], n_bootstrap=100)
    im = m["abnormality"]["image"]
    assert im["auroc"] is None and im["average_precision"] is None
    assert im["precision"] is None and im["recall"] is None and im["f1"] is None
    assert im["kappa"] is None          # chance agreement is 1
    assert im["accuracy"] == 1.0 and im["specificity"] == 1.0
    assert m["abnormality"]["study"]["kappa"] is None
    assert all(v is None for v in m["abnormality"]["ci95"].values())
    wrist = m["abnormality"]["per_body_part"]["wrist"]   # no images at all
    assert wrist["image"]["n"] == 0 and wrist["image"]["accuracy"] is None
    assert m["body_part"]["per_class"]["wrist"]["recall"] is None
    text = json.dumps(m, allow_nan=False)
    assert "NaN" not in text


def test_constant_predictions_with_both_classes_give_kappa_zero():
    # Kappa is *defined* here (chance agreement < 1) and equals 0; precision is undefined.
    df = _table([(str(i), f"s{i}", "hand", i % 2, 0.1, "hand") for i in range(6)])
    im = compute_metrics(df, 0.5, ["hand"], n_bootstrap=0)["abnormality"]["image"]
    assert im["kappa"] == pytest.approx(0.0)
    assert im["precision"] is None and im["recall"] == 0.0 and im["f1"] == 0.0


def test_missing_columns_and_empty():
    with pytest.raises(ValueError, match="prob_abnormal"):
        compute_metrics(pd.DataFrame({"study_id": [1], "body_part": ["x"], "abnormal": [0]}),
                        0.5, ["x"])
    with pytest.raises(ValueError):
        compute_metrics(_table([]), 0.5, ["hand"])


# --------------------------------------------------------------------------- bootstrap


def _random_table(n_studies: int, seed: int, parts=("hand", "wrist")) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_studies):
        y = int(rng.random() < 0.4)
        part = parts[s % len(parts)]
        for i in range(int(rng.integers(1, 5))):
            p = float(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1))
            rows.append((f"{s}/{i}", f"st{s}", part, y, p, part))
    return _table(rows)


def test_weighted_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p = np.round(rng.random(50), 1)          # many ties
    w = rng.integers(0, 4, size=(5, 50)).astype(float)
    got = _weighted_auroc(y, p, w)
    for b in range(5):
        assert got[b] == pytest.approx(roc_auc_score(y, p, sample_weight=w[b]))
    assert np.isnan(_weighted_auroc(np.zeros(4, int), p[:4], np.ones((1, 4))))[0]


def test_kappa_from_cells_matches_sklearn():
    rng = np.random.default_rng(1)
    for _ in range(20):
        y, pr = rng.integers(0, 2, 30), rng.integers(0, 2, 30)
        tn, fp, fn, tp = (np.sum((y == a) & (pr == b)) for a, b in ((0, 0), (0, 1), (1, 0), (1, 1)))
        assert _kappa_from_cells(tn, fp, fn, tp) == pytest.approx(cohen_kappa_score(y, pr))
    assert np.isnan(_kappa_from_cells(5, 0, 0, 0))


def test_bootstrap_ci_contains_point_and_is_reproducible():
    df = _random_table(150, seed=4)
    a = compute_metrics(df, 0.5, ["hand", "wrist"], n_bootstrap=300, seed=7)
    b = compute_metrics(df, 0.5, ["hand", "wrist"], n_bootstrap=300, seed=7)
    c = compute_metrics(df, 0.5, ["hand", "wrist"], n_bootstrap=300, seed=8)
    assert a["abnormality"]["ci95"] == b["abnormality"]["ci95"]
    assert a["abnormality"]["ci95"] != c["abnormality"]["ci95"]
    for key, (level, metric) in {"image_auroc": ("image", "auroc"),
                                 "study_auroc": ("study", "auroc"),
                                 "image_kappa": ("image", "kappa"),
                                 "study_kappa": ("study", "kappa")}.items():
        lo, hi = a["abnormality"]["ci95"][key]
        point = a["abnormality"][level][metric]
        assert lo < point < hi, key
        assert hi - lo < 0.5


def test_bootstrap_equals_naive_sklearn_loop():
    """Same draws as the implementation (one chunk: rng.integers(0, S, (B, S))), scored with
    scikit-learn on explicitly resampled tables."""
    df = _random_table(40, seed=5)
    n_boot, seed, thr = 60, 11, 0.5
    m = compute_metrics(df, thr, ["hand", "wrist"], n_bootstrap=n_boot, seed=seed)
    st = study_table(df)
    draws = np.random.default_rng(seed).integers(0, len(st), size=(n_boot, len(st)))
    by_study = {sid: g for sid, g in df.groupby("study_id", sort=False)}
    vals = {"image_auroc": [], "study_auroc": [], "image_kappa": [], "study_kappa": []}
    for d in draws:
        s = st.iloc[d]
        im = pd.concat([by_study[sid] for sid in s.study_id])
        for level, t in (("image", im), ("study", s)):
            y, p = t.abnormal.to_numpy(), t.prob_abnormal.to_numpy()
            vals[f"{level}_auroc"].append(roc_auc_score(y, p) if len(set(y)) == 2 else np.nan)
            vals[f"{level}_kappa"].append(cohen_kappa_score(y, (p >= thr).astype(int)))
    for key, v in vals.items():
        v = np.asarray(v, float)
        v = v[np.isfinite(v)]
        assert m["abnormality"]["ci95"][key] == pytest.approx(
            list(np.percentile(v, [2.5, 97.5]))), key


def test_bootstrap_resamples_studies_not_images():
    # Every study has 10 identical images: the image-level confusion is 10x the study-level
    # one, so under study resampling image and study kappa/AUROC CIs coincide exactly.
    # Resampling images would give a much narrower image CI.
    rng = np.random.default_rng(2)
    rows = []
    for s in range(40):
        y = int(s % 3 == 0)
        p = float(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1))
        rows += [(f"{s}/{i}", s, "hand", y, p, "hand") for i in range(10)]
    ci = compute_metrics(_table(rows), 0.5, ["hand"], n_bootstrap=200, seed=0)["abnormality"]["ci95"]
    assert ci["image_kappa"] == pytest.approx(ci["study_kappa"])
    assert ci["image_auroc"] == pytest.approx(ci["study_auroc"])


# --------------------------------------------------------------------------- threshold


def test_choose_threshold_youden_and_sensitivity():
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.3, 0.65, 0.4, 0.6, 0.8, 0.9])
    # J at each candidate t (abnormal if p >= t): 0.9: 1/4; 0.8: 2/4; 0.65: 2/4 - 1/3;
    # 0.6: 3/4 - 1/3; 0.4: 1 - 1/3 = 2/3 (max); 0.3: 1 - 2/3; 0.1: 0.
    assert choose_threshold(y, p) == pytest.approx(0.4)
    # Highest threshold with sensitivity >= target.
    assert choose_threshold(y, p, "sensitivity", target=0.5) == pytest.approx(0.8)
    assert choose_threshold(y, p, "sensitivity", target=0.7) == pytest.approx(0.6)
    assert choose_threshold(y, p, "sensitivity", target=0.9) == pytest.approx(0.4)
    for target in (0.3, 0.5, 0.75, 0.9, 1.0):
        t = choose_threshold(y, p, "sensitivity", target=target)
        assert (p[y == 1] >= t).mean() >= target


def test_choose_threshold_tie_prefers_higher_and_fallback():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])
    # J = 2/3 both at t = 0.7 and t = 0.4: the higher one wins.
    assert choose_threshold(y, p) == pytest.approx(0.7)
    with pytest.warns(UserWarning, match="both classes"):
        assert choose_threshold([0, 0], [0.2, 0.3]) == 0.5
    with pytest.raises(ValueError):
        choose_threshold(y, p, method="nope")
