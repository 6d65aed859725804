"""What the box benches share: the command line (MODEL --data --splits) and a box model with its data, cache
and split, read as ``bonexray evaluate`` reads them (bench/box_postprocess.py, bench/box_errors.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def add_model_data_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--splits", default=None, help="the run folder or its splits.csv (default: recomputed from the card)")


def load_box_model_and_data(args: argparse.Namespace):
    """(predictor, image cache, records with the model's split, how the split was found); None (said on stderr)
    for a model without a box head."""
    from bonexray.data.datasets import load_dataset
    from bonexray.data.preprocess import build_cache, default_cache_dir
    from bonexray.evaluation.evaluate import assign_eval_splits
    from bonexray.inference.predictor import Predictor

    pred = Predictor(args.model, backend="torch")
    if not pred.has_boxes:
        print(f"{args.model}: this model has no box head", file=sys.stderr)
        return None
    records = load_dataset(args.data)
    cache, _ = build_cache(records, default_cache_dir(records.root, pred.image_size), size=pred.image_size, progress=False)
    splits = args.splits
    if splits and Path(splits).is_dir():
        splits = str(Path(splits) / "splits.csv")
    records, how = assign_eval_splits(records, pred.card.split, None, splits)
    return pred, cache, records, how
