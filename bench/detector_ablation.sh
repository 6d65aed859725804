#!/usr/bin/env bash
# The box-head ablation of issue 29, one run at a time, same split (seed 0) and seed, each a full recipe
# run (train+valid, test touched once) followed by the post-processing sweep:
#   bench/detector_ablation.sh [SEED]          (OUT defaults to ../results/detector; DATA as fracatlas_recipe.sh)
# Rows (cumulative): outlines (the recipe at stride 8; outlines are always warped now), + stride-4 grid,
# + IoU-aware quality. Each run prints its wall time; peak RSS comes from /usr/bin/time -v.
# Run from the repository root (in a worktree: PYTHONPATH=$PWD/src, so `bonexray` is this checkout).
# On a shared machine run it under `nice -n 19`; each row takes one recipe run (about 30-50 min on 2 idle cores).
set -euo pipefail
seed=${1:-0}
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-../results/detector}
mkdir -p "$out"
data=${DATA:-../shared/data/FracAtlas}
row() {
  name=$1; shift
  /usr/bin/time -v "$here/fracatlas_recipe.sh" fracatlas "$seed" "$name" -- "$@" > "$out/$name.log" 2>&1
  # Post-processing chosen on valid (seen in the train+valid fit: optimistic there), reported on test.
  python "$here/box_postprocess.py" "runs/$name/checkpoints/best.ckpt" --data "$data" --bootstrap 200 \
    --json "$out/$name-postprocess.json" > "$out/$name-postprocess.log" 2>&1
  python "$here/box_errors.py" "runs/$name/checkpoints/best.ckpt" --data "$data" > "$out/$name-box-errors.log" 2>&1
}
row "fa-s8-outlines-s$seed"
row "fa-s4-outlines-s$seed" --box-stride 4
row "fa-s4-outlines-iou-s$seed" --box-stride 4 --box-quality iou
