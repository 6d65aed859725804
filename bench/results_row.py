"""Print results-table rows (docs/results.md) from ``bonexray evaluate`` results folders.

    python bench/results_row.py results/fa-r320tv-s0 results/fa-r320tv-s1 ...     # one row per folder
    python bench/results_row.py --mean results/fa-r320tv-s{0,1,2}                  # + their mean (AUROC range)
    python bench/results_row.py --mean results/fa-r320tv-s{0,1,2} --minus results/fa-baseline-tv-s{0,1,2}
                                                       # + the second group's mean and the difference of means
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KEYS = ("auroc", "ap", "sens", "spec", "kappa", "study_auroc", "body_acc", "body_f1")


def f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def values(folder: Path) -> dict:
    try:
        m = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{folder}: no readable metrics.json ({e}); give bonexray evaluate's --out folders")
    try:
        a, s, b = m["abnormality"]["image"], m["abnormality"]["study"], m["body_part"]
        return {"auroc": a["auroc"], "ap": a["average_precision"], "sens": a["recall"], "spec": a["specificity"],
                "kappa": a["kappa"], "study_auroc": s["auroc"], "body_acc": b["accuracy"], "body_f1": b["macro_f1"],
                "ci": m["abnormality"]["ci95"].get("image_auroc") or (None, None), "metrics": m}
    except (KeyError, TypeError) as e:
        raise SystemExit(f"{folder / 'metrics.json'}: not a bonexray evaluate metrics.json (missing {e})")


def signed(x) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def cells(v: dict, auroc_note: str, fmt=f) -> str:
    note = f" {auroc_note}" if auroc_note else ""
    return (f"{fmt(v['auroc'])}{note} | {fmt(v['ap'])} | {fmt(v['sens'])} / {fmt(v['spec'])}{v.get('t', '')} | "
            f"{fmt(v['kappa'])} | {fmt(v['study_auroc'])} | {fmt(v['body_acc'])} / {fmt(v['body_f1'])} |")


def row(folder: Path) -> str:
    v = values(folder)
    m, (lo, hi) = v["metrics"], v["ci"]
    v["t"] = f" (t = {m['threshold']:.3f})"
    return (f"| {folder.name} ({m['split']}, tta {m.get('tta', 'none')}) | {cells(v, f'[{f(lo)}, {f(hi)}]')} "
            f"{m['n_images']} img, {m['n_studies']} studies |")


def mean(folders: list[Path]) -> dict:
    vs = [values(p) for p in folders]
    # A metric that is undefined (null) in any member leaves the mean undefined.
    out = {k: None if any(v[k] is None for v in vs) else statistics.fmean(v[k] for v in vs) for k in KEYS}
    aurocs = [v["auroc"] for v in vs if v["auroc"] is not None]
    out["range"] = f"({f(min(aurocs))}-{f(max(aurocs))})" if aurocs else ""
    return out


def mean_row(folders: list[Path]) -> str:
    v = mean(folders)
    return f"| mean of {len(folders)}: {', '.join(p.name for p in folders)} | {cells(v, v['range'])} |"


def diff_row(a: list[Path], b: list[Path]) -> str:
    va, vb = mean(a), mean(b)
    d = {k: None if va[k] is None or vb[k] is None else va[k] - vb[k] for k in KEYS}
    return f"| difference of means | {cells(d, '', signed)} |"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="bonexray evaluate --out folders")
    ap.add_argument("--mean", action="store_true", help="also print the folders' mean (and its AUROC range)")
    ap.add_argument("--minus", nargs="+", type=Path, default=None, metavar="FOLDER",
                    help="a second group (e.g. the baseline's seeds): print its mean and the difference of means")
    args = ap.parse_args(argv)
    print("| results | image AUROC [95% CI] | AP | sens / spec | kappa | study AUROC | body-part acc / macro-F1 | n |")
    print("|---|---|---|---|---|---|---|---|")
    for p in args.folders:
        print(row(p))
    if args.mean or args.minus:
        print(mean_row(args.folders))
    if args.minus:
        for p in args.minus:
            print(row(p))
        print(mean_row(args.minus))
        print(diff_row(args.folders, args.minus))


if __name__ == "__main__":
    main()
