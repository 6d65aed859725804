#!/usr/bin/env bash
# Train the shipped FracAtlas recipe with one seed and report its test-split numbers.
#   bench/fracatlas_recipe.sh [SEED] [DATA]      (DATA defaults to ../shared/data/FracAtlas)
# Writes runs/fracatlas-loc-s$SEED/ and results/fracatlas-loc-s$SEED/ and prints wall times.
# The test split is touched once, here, after training; tuning happens on valid.
set -euo pipefail
seed=${1:-0}
data=${2:-../shared/data/FracAtlas}
run=runs/fracatlas-loc-s$seed
res=results/fracatlas-loc-s$seed
t0=$(date +%s)
bonexray train --recipe fracatlas --data "$data" --seed "$seed" --split-seed 0 --out "$run" --quiet
t1=$(date +%s)
bonexray evaluate "$run/checkpoints/best.ckpt" --data "$data" --split test --out "$res"
t2=$(date +%s)
echo "machine: $(nproc) cores, $(python -c 'import torch;print("cuda" if torch.cuda.is_available() else "cpu")')"
echo "train: $((t1 - t0)) s   evaluate: $((t2 - t1)) s"
python - "$res/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
a, s, b, ci = m["abnormality"]["image"], m["abnormality"]["study"], m["body_part"], m["abnormality"]["ci95"]
f = lambda x: "n/a" if x is None else f"{x:.3f}"
print(f"image AUROC {f(a['auroc'])} [{f(ci['image_auroc'][0]) if ci['image_auroc'] else 'n/a'}, "
      f"{f(ci['image_auroc'][1]) if ci['image_auroc'] else 'n/a'}]  AP {f(a['average_precision'])}  "
      f"sens {f(a['recall'])}  spec {f(a['specificity'])}  kappa {f(a['kappa'])}  | study AUROC {f(s['auroc'])} "
      f"kappa {f(s['kappa'])}  | body part acc {f(b['accuracy'])} macro-F1 {f(b['macro_f1'])}  "
      f"| n_images {m['n_images']} n_studies {m['n_studies']}")
PY
