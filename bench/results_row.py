"""Print one README results-table row per ``bonexray evaluate`` results folder.

    python bench/results_row.py results/fracatlas-loc-s0 results/fracatlas-loc-s1 ...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def row(folder: Path) -> str:
    m = json.loads((folder / "metrics.json").read_text())
    a, s, b, ci = m["abnormality"]["image"], m["abnormality"]["study"], m["body_part"], m["abnormality"]["ci95"]
    lo, hi = ci["image_auroc"] if ci.get("image_auroc") else (None, None)
    return (f"| {folder.name} ({m['split']}, tta {m.get('tta', 'none')}) | {f(a['auroc'])} [{f(lo)}, {f(hi)}] | "
            f"{f(a['average_precision'])} | {f(a['recall'])} / {f(a['specificity'])} (t = {m['threshold']:.3f}) | "
            f"{f(a['kappa'])} | {f(s['auroc'])} | {f(b['accuracy'])} / {f(b['macro_f1'])} | "
            f"{m['n_images']} img, {m['n_studies']} studies |")


if __name__ == "__main__":
    print("| results | image AUROC [95% CI] | AP | sens / spec | kappa | study AUROC | body-part acc / macro-F1 | n |")
    print("|---|---|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        print(row(Path(arg)))
