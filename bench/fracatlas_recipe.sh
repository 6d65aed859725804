#!/usr/bin/env bash
# Train one shipped recipe with one seed on FracAtlas and report its test-split numbers.
#   bench/fracatlas_recipe.sh RECIPE SEED [NAME] [-- EXTRA TRAIN FLAGS]
#   RECIPE: fracatlas | baseline | a YAML file; NAME defaults to fa-RECIPE-sSEED; DATA (environment)
#   defaults to ../shared/data/FracAtlas. Example: bench/fracatlas_recipe.sh baseline 0 fa-baseline-tv-s0 -- --fit-on train+valid
# Writes runs/NAME/ and results/NAME/ and prints wall times and the machine.
# The test split is touched once, here, after training; every choice is made on valid.
set -euo pipefail
recipe=${1:-fracatlas}
seed=${2:-0}
shift $(( $# < 2 ? $# : 2 ))
name=fa-$recipe-s$seed
if [ $# -gt 0 ] && [ "$1" != "--" ]; then name=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi
data=${DATA:-../shared/data/FracAtlas}
run=runs/$name
res=results/$name
t0=$(date +%s)
bonexray train --recipe "$recipe" --data "$data" --seed "$seed" --split-seed 0 --out "$run" --quiet "$@"
t1=$(date +%s)
bonexray evaluate "$run/checkpoints/best.ckpt" --data "$data" --split test --out "$res"
t2=$(date +%s)
echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $(python -c 'import torch;print("cuda" if torch.cuda.is_available() else "cpu")')"
echo "train: $((t1 - t0)) s   evaluate: $((t2 - t1)) s"
python "$(dirname "$0")/results_row.py" "$res"
