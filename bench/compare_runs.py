"""Paired comparison of two evaluations of the same images: AUROC difference with a bootstrap CI.

Both folders are ``bonexray evaluate --out`` results on the same split (their ``predictions.csv``).
Resampling is over studies (``study_id``: exam groups for FracAtlas), the unit the split keeps
together, and both models are scored on the same resample, so the CI is for the difference itself
(narrower than comparing two separate CIs).

    python bench/compare_runs.py results/fa-box-s0 results/fa-box-bf16-s0
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score


def load(folder: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(f"{folder}/predictions.csv")
    except OSError as err:
        sys.exit(f"{folder}: no predictions.csv ({err.strerror}); give a `bonexray evaluate --out` folder")
    except (ValueError, pd.errors.ParserError) as err:
        sys.exit(f"{folder}/predictions.csv: not a readable table ({err})")
    wanted = ["path", "study_id", "abnormal", "prob_abnormal"]
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        sys.exit(f"{folder}/predictions.csv: no column {', '.join(missing)}; give a `bonexray evaluate --out` folder")
    return df.set_index("path")[wanted[1:]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="evaluate folder of the reference model")
    ap.add_argument("b", help="evaluate folder of the model compared with it")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    a, b = load(args.a), load(args.b)
    if set(a.index) != set(b.index):
        sys.exit(f"{args.a} and {args.b} scored different images ({len(a)} and {len(b)}; "
                 f"{len(set(a.index) ^ set(b.index))} differ): not a paired comparison")
    b = b.loc[a.index]
    if not (a["abnormal"].to_numpy() == b["abnormal"].to_numpy()).all():
        sys.exit("the two evaluations disagree on the labels of the same images")
    y, pa, pb = a["abnormal"].to_numpy(), a["prob_abnormal"].to_numpy(), b["prob_abnormal"].to_numpy()
    groups = a["study_id"].astype(str).to_numpy()
    names, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    rng = np.random.default_rng(args.seed)
    diffs = []
    for _ in range(args.resamples):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(names), len(names))])
        if len(np.unique(y[idx])) < 2:
            continue
        diffs.append(roc_auc_score(y[idx], pb[idx]) - roc_auc_score(y[idx], pa[idx]))
    auc_a, auc_b = roc_auc_score(y, pa), roc_auc_score(y, pb)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    print(f"{len(y)} images, {len(names)} groups, {len(diffs)} resamples over groups")
    print(f"AUROC {args.a}: {auc_a:.4f}   {args.b}: {auc_b:.4f}")
    print(f"difference (b - a): {auc_b - auc_a:+.4f}  95% CI [{lo:+.4f}, {hi:+.4f}]; "
          f"share of resamples with b below a: {np.mean(np.asarray(diffs) < 0):.2f}")
    print(f"max |prob difference| {np.abs(pb - pa).max():.3f}, median {np.median(np.abs(pb - pa)):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
