"""Fit and measure the scope gate at its operating point: refusal rates for each kind of image.

    python bench/scope.py fracatlas --data ../shared/data/FracAtlas --out bench/scope.json \\
        [--write-model calibrated.ckpt] [--tta d4]

The gate is fitted the way ``bonexray calibrate-scope`` fits it (inference/calibrate.py,
inference/scope.py): PCA feature distance on the **train** split's embeddings, the in-scope head on
the train split against the *fit* outlier sets of bench/scope_sets.py; both thresholds from the
**valid** split (images neither was fitted on; the network itself was trained on train+valid). It is
then measured on what it was not fitted on: the **test** split (in-distribution refusals) and the
*measured* outlier sets of bench/scope_sets.py (other seeds, unseen modalities, unseen photos, the
held-out half of the chest films, the pydicom-data chest CR) and the first test images turned by
90/180/270 degrees or upside down. Every image goes through the front
ends' path (bytes -> decoder -> tile -> model -> ScopeGate with the file's evidence).

Leave one region out (``--leave-out hand leg``): the gate is refitted without that region's train and
valid images, and without the fit outliers made from that region's train images (the inverted and
turned radiographs), and the region's images are measured against it. A shortcut, stated: the embeddings
are still the bundled network's, which was trained on every region (retraining the network without
a region is not affordable here), so this measures the gate, not a network that never saw the region.

``--write-model``: a copy of the model whose card holds this gate, the calibration and the two
operating points (valid split); embeddings are cached (bench/embed_cache.py). ``--tta`` (default: the
card's): the test-time augmentation the valid and test probabilities are taken under, written into
that card; a TTA other than the card's re-chooses the decision threshold on valid (the gate itself
reads the identity view's embedding under any TTA).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_cache import DEFAULT_CACHE, embed_items  # noqa: E402

import scope_sets  # noqa: E402

#: Test images turned (outliers.TURNS, one turn each) for the measured set "turned test radiographs".
N_TURNED_TEST = 120
TARGETS = {"grey non-radiographs refused": 0.95, "other-region radiographs refused": 0.90,
           "left-out region refused": 0.80, "in-distribution test refused (at most)": 0.02}
NON_RADIOGRAPH_SETS = ("synthetic (other seed)", "rendered text (other seed)", "US/NM slices (unseen modalities)",
                       "photos (gray, unseen photos)")
OTHER_REGION_SETS = ("chest films (held-out half)", "chest CR RG1 (gray pixels only)")


def dataset_items(predictor, data: str):
    from bonexray.data.datasets import load_dataset
    from bonexray.evaluation.evaluate import assign_eval_splits, find_run_dir

    records, how = assign_eval_splits(load_dataset(data), predictor.card.split, find_run_dir(predictor.path), None)
    root = Path(records.root)
    out = {}
    for split in ("train", "valid", "test"):
        chosen = [r for r in records if r.split == split]
        out[split] = (chosen, [(r.path, (Path(r.path) if Path(r.path).is_file() else root / r.path).read_bytes())
                               for r in chosen])
    return out, how


def fit_gate(train_emb, valid_emb, outlier_embs: dict, pca_quantile: float, head_quantile: float, info: dict):
    from bonexray.inference.scope import (INVERTED, NOT_RADIOGRAPH, ROTATED, UNKNOWN_PART, fit_feature_scope,
                                          fit_scope_head)

    fs = fit_feature_scope(train_emb, valid_emb, quantile=pca_quantile, info=dict(info))
    kinds = {NOT_RADIOGRAPH: ("synthetic", "rendered text", "CT/MR slices", "photos (gray)"),
             UNKNOWN_PART: ("chest films",), INVERTED: ("inverted radiographs",), ROTATED: ("turned radiographs",)}
    outs = {reason: np.concatenate([outlier_embs[k] for k in names if k in outlier_embs and len(outlier_embs[k])])
            for reason, names in kinds.items() if any(k in outlier_embs and len(outlier_embs[k]) for k in names)}
    head = fit_scope_head(train_emb, outs, valid_emb, quantile=head_quantile, info={
        "fitted_on": "train split against outliers (bench/scope_sets.py fit sets): "
                     + ", ".join(f"{k} {len(v)}" for k, v in outlier_embs.items()),
        "threshold_source": f"{head_quantile} of the valid split's images pass ({len(valid_emb)} images; the network "
                            "was trained on them, the gate was not)"})
    card = fs.to_card()
    card["head"] = head.to_card()
    return card


def _without_region(fit_all: dict, train_records, part: str) -> dict:
    """The fit outliers' embeddings less those made from the left-out region's train images (the
    inverted and turned radiographs are built from train images): the region must stay unseen."""
    region = {Path(r.path).name for r in train_records if r.body_part == part}
    prefixes = tuple(f"{t}-" for t in ("inverted", *scope_sets.outliers.TURNS))

    def source(name: str) -> str | None:  # derived names: "<transform>-<source file name>.png" (scope_sets)
        name = Path(name).name
        hit = next((p for p in prefixes if name.startswith(p) and name.endswith(".png")), None)
        return name[len(hit):-4] if hit else None

    return {k: e["embedding"][np.array([source(str(n)) not in region for n in e["names"]], dtype=bool)]
            for k, e in fit_all.items()}


_STATS: dict = {}


def gate_reasons(predictor, scope_card, items, emb) -> list:
    """The full gate (statistics, DICOM evidence, head, distance) for cached items; the pixel and file
    checks, which do not depend on the card's scope statistics, are computed once per item."""
    from types import SimpleNamespace

    from bonexray.data.preprocess import read_bytes_for_model
    from bonexray.inference.scope import ScopeGate, source_evidence

    classes = predictor.card.body_parts
    gate = ScopeGate(SimpleNamespace(body_parts=classes, scope=scope_card))
    plain = ScopeGate(SimpleNamespace(body_parts=classes, scope=None))
    by_name = dict(items)
    first = []
    for name in emb["names"]:
        key = (str(name), len(by_name[str(name)]))
        if key not in _STATS:
            data = by_name[str(name)]
            m = read_bytes_for_model(data, str(name), predictor.image_size)
            _STATS[key] = plain.reasons([m.decoded.pixels], [m.truncated], [source_evidence(data)], None)[0]
        first.append(_STATS[key])
    later = gate.reasons([None] * len(first), [False] * len(first), [None] * len(first), emb["embedding"])
    return [f if f is not None else r for f, r in zip(first, later)]


def summary(reasons) -> dict:
    return {"n": len(reasons), "refused": float(np.mean([r is not None for r in reasons])) if reasons else None,
            "reasons": dict(Counter(r or "in scope (missed)" for r in reasons))}


def measure(model: str, data: str, cache: str | None = DEFAULT_CACHE, leave_out=("hand", "leg"),
            pca_quantile: float = 0.995, head_quantile: float = 0.99, write_model: str | None = None,
            tta: str | None = None) -> dict:
    from bonexray.inference.calibrate import fit_calibration, rewrite_checkpoint
    from bonexray.inference.predictor import Predictor

    predictor = Predictor(model, device="cpu", tta=tta)
    sets, how = dataset_items(predictor, data)
    # Probabilities under the TTA written into the card (valid: calibration; test: its check); the
    # gate reads embeddings only, the same under any TTA.
    emb = {split: embed_items(predictor, f"fracatlas-{split}", items, cache, tta="none" if split == "train" else None)
           for split, (_, items) in sets.items()}
    for split, (chosen, _) in sets.items():
        assert len(emb[split]["names"]) == len(chosen), f"{split}: some images did not decode"
    fit = scope_sets.fit_sets(sets["train"][1])
    fit_all = {k: embed_items(predictor, "neg-" + k, v, cache, tta="none") for k, v in fit.items() if v}
    fit_emb = {k: e["embedding"] for k, e in fit_all.items()}
    info = {"fitted_on": f"train split ({len(sets['train'][0])} images)",
            "threshold_source": f"{pca_quantile} quantile of the valid split's scores ({len(sets['valid'][0])} images)"}
    scope_card = fit_gate(emb["train"]["embedding"], emb["valid"]["embedding"], fit_emb, pca_quantile, head_quantile,
                          info)
    res = {"model": str(predictor.path), "data": str(data), "split": how, "tta": predictor.tta,
           "gate": {"pca_quantile": pca_quantile, "head_quantile": head_quantile,
                    "head_threshold": scope_card["head"]["threshold"], "distance_threshold": scope_card["threshold"],
                    "fit_sets": {k: len(v) for k, v in fit_emb.items()}},
           "in_distribution": {}, "measured_sets": {}, "leave_one_region_out": {}}
    for split in ("valid", "test"):
        res["in_distribution"][split] = summary(gate_reasons(predictor, scope_card, sets[split][1], emb[split]))
    test_parts = [r.body_part for r in sets["test"][0]]
    test_reasons = gate_reasons(predictor, scope_card, sets["test"][1], emb["test"])
    res["in_distribution"]["test_by_part"] = {p: summary([x for x, q in zip(test_reasons, test_parts) if q == p])
                                              for p in sorted(set(test_parts))}
    measured = scope_sets.eval_sets()
    measured["turned test radiographs (90/180/270, upside down)"] = scope_sets.turned(sets["test"][1][:N_TURNED_TEST])
    for name, items in measured.items():
        if not items:
            res["measured_sets"][name] = "not available on this machine"
            continue
        e = embed_items(predictor, "neg-" + name, items, cache, tta="none")
        res["measured_sets"][name] = summary(gate_reasons(predictor, scope_card, items, e))
    # Leave one region out: refit without the region (train and valid), measure its images (all splits).
    for part in leave_out:
        keep = {s: np.array([r.body_part != part for r in sets[s][0]]) for s in ("train", "valid")}
        fit_lo = _without_region(fit_all, sets["train"][0], part)
        card_lo = fit_gate(emb["train"]["embedding"][keep["train"]], emb["valid"]["embedding"][keep["valid"]], fit_lo,
                           pca_quantile, head_quantile, info)
        region, others = [], []
        for s in ("train", "valid", "test"):
            rs = gate_reasons(predictor, card_lo, sets[s][1], emb[s])
            region += [x for x, r in zip(rs, sets[s][0]) if r.body_part == part]
            if s == "test":
                others += [x for x, r in zip(rs, sets[s][0]) if r.body_part != part]
        res["leave_one_region_out"][part] = {
            "region": summary(region), "other_test_images": summary(others),
            "fit_outliers_from_region_dropped": sum(len(fit_emb[k]) - len(fit_lo[k]) for k in fit_emb)}
    non = [r for k in NON_RADIOGRAPH_SETS if isinstance(res["measured_sets"].get(k), dict)
           for r in [res["measured_sets"][k]]]
    other = [res["measured_sets"][k] for k in OTHER_REGION_SETS if isinstance(res["measured_sets"].get(k), dict)]

    def pooled(parts):
        n = sum(p["n"] for p in parts)
        return sum(p["refused"] * p["n"] for p in parts) / n if n else None

    lo = [v["region"]["refused"] for v in res["leave_one_region_out"].values()]
    got = {"grey non-radiographs refused": pooled(non), "other-region radiographs refused": pooled(other),
           "left-out region refused": min(lo) if lo else None,
           "in-distribution test refused (at most)": res["in_distribution"]["test"]["refused"]}
    res["targets"] = {k: {"target": t, "measured": got[k],
                          "met": None if got[k] is None else (got[k] <= t if "at most" in k else got[k] >= t)}
                      for k, t in TARGETS.items()}
    cr = res["measured_sets"].get("chest CR RG1 (DICOM file)")
    res["targets"]["chest CR RG1 refused"] = {"target": 1.0, "measured": cr["refused"] if isinstance(cr, dict) else None,
                                              "met": isinstance(cr, dict) and cr["refused"] == 1.0}
    yv = np.array([r.abnormal for r in sets["valid"][0]])
    lab = np.isin(yv, (0, 1))
    fitted = fit_calibration(emb["valid"]["prob"][lab], yv[lab].astype(int),
                             (predictor.card.split or {}).get("fit_on", "train"))
    res["calibration"] = calibration_on_test(fitted, emb["test"]["prob"], sets["test"][0])
    if write_model:
        updates = {"scope": scope_card, **fitted, "tta": predictor.tta}
        if predictor.tta != (predictor.card.tta or "none") and (predictor.card.split or {}).get("fit_on") != "train+valid":
            from bonexray.inference.calibrate import threshold_on_valid
            from bonexray.runs import find_run_dir

            updates["threshold"] = threshold_on_valid(sets["valid"][0], emb["valid"]["prob"], find_run_dir(predictor.path))
            res["threshold_rechosen_on_valid"] = updates["threshold"]
        rewrite_checkpoint(predictor.path, write_model, updates, half=True)
        res["wrote"] = write_model
    return res


def calibration_on_test(fitted: dict, test_prob, test_records) -> dict:
    """Test-split ECE before / after the fitted calibration (study bootstrap CIs) and the operating points'
    sensitivity and specificity on the test split."""
    from bonexray.core.decision import temperature_scaled
    from bonexray.evaluation.calibration import ece, ece_ci

    y = np.array([r.abnormal for r in test_records])
    lab = np.isin(y, (0, 1))
    y, p, groups = y[lab].astype(int), np.asarray(test_prob)[lab], np.array([r.study_id for r in test_records])[lab]
    cal = fitted["calibration"]
    q = temperature_scaled(p, cal["temperature"], cal.get("bias", 0.0)) if cal else p
    pts = fitted["operating_points"]
    out = {"fitted": fitted, "n_test": int(len(y)),
           "ece_before": ece(y, p), "ece_before_ci95": ece_ci(y, p, groups),
           "ece_after": ece(y, q), "ece_after_ci95": ece_ci(y, q, groups), "target_ece": 0.03}
    out["met"] = out["ece_after"] <= 0.03
    for name in ("suspicious", "definite"):
        pred = q >= pts[name]
        out[f"{name}_test"] = {"threshold": pts[name], "sensitivity": float(pred[y == 1].mean()),
                               "specificity": float((~pred[y == 0]).mean())}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="scope.json")
    ap.add_argument("--cache", default=DEFAULT_CACHE)
    ap.add_argument("--leave-out", nargs="*", default=["hand", "leg"])
    ap.add_argument("--pca-quantile", type=float, default=0.995)
    ap.add_argument("--head-quantile", type=float, default=0.99)
    ap.add_argument("--write-model", default=None)
    ap.add_argument("--tta", choices=("none", "flip", "d4"), default=None,
                    help="fit the calibration under this TTA and write it into --write-model's card (default: the card's)")
    args = ap.parse_args(argv)
    res = measure(args.model, args.data, args.cache or None, args.leave_out, args.pca_quantile, args.head_quantile,
                  args.write_model, args.tta)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    for split, r in res["in_distribution"].items():
        if "n" in r:
            print(f"in-distribution {split}: {r['n']} images, refused {r['refused']:.1%} {r['reasons']}")
    print(f"{'measured set (not fitted on)':36s} {'n':>4s} {'refused':>8s}")
    for name, r in res["measured_sets"].items():
        print(f"{name:36s} " + (f"{r['n']:4d} {r['refused']:8.1%}" if isinstance(r, dict) else r))
    for part, r in res["leave_one_region_out"].items():
        print(f"leave out {part}: region refused {r['region']['refused']:.1%} of {r['region']['n']}; other test images "
              f"refused {r['other_test_images']['refused']:.1%}")
    for k, t in res["targets"].items():
        m = "n/a" if t["measured"] is None else f"{t['measured']:.1%}"
        print(f"target {k}: {t['target']:.0%} -> measured {m}: {'met' if t['met'] else 'NOT met'}")
    c = res["calibration"]
    print(f"test ECE {c['ece_before']:.3f} {c['ece_before_ci95']} -> {c['ece_after']:.3f} {c['ece_after_ci95']} "
          f"calibrated ({'met' if c['met'] else 'NOT met'}: target <= 0.03)")
    for name in ("suspicious", "definite"):
        t = c[f"{name}_test"]
        print(f"{name} point {t['threshold']:.3f}: test sensitivity {t['sensitivity']:.3f}, specificity {t['specificity']:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
