#!/usr/bin/env bash
# Train one shipped recipe with one seed on FracAtlas and report its test-split numbers.
#   bench/fracatlas_recipe.sh [RECIPE] [SEED] [DATA]   (fracatlas | baseline; DATA defaults to ../shared/data/FracAtlas)
# Writes runs/fa-$RECIPE-s$SEED/ and results/fa-$RECIPE-s$SEED/ and prints wall times and the machine.
# The test split is touched once, here, after training; every choice is made on valid.
set -euo pipefail
recipe=${1:-fracatlas}
seed=${2:-0}
data=${3:-../shared/data/FracAtlas}
run=runs/fa-$recipe-s$seed
res=results/fa-$recipe-s$seed
t0=$(date +%s)
bonexray train --recipe "$recipe" --data "$data" --seed "$seed" --split-seed 0 --out "$run" --quiet
t1=$(date +%s)
bonexray evaluate "$run/checkpoints/best.ckpt" --data "$data" --split test --out "$res"
t2=$(date +%s)
echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $(python -c 'import torch;print("cuda" if torch.cuda.is_available() else "cpu")')"
echo "train: $((t1 - t0)) s   evaluate: $((t2 - t1)) s"
python "$(dirname "$0")/results_row.py" "$res"
