"""Which faster engine may ``--backend auto`` use for one model? Runs the check and writes its record.

For MODEL (a checkpoint, an .onnx file or a bundled model's name), runs float32 onnxruntime (the
reference) and OpenVINO float32 / bfloat16 (bf16 only on a CPU with AVX-512 BF16 or AMX) over the
model's own SPLIT of DATA, and prints per engine: images/s at batch 16 (engines alternating, median of
the rounds), image AUROC and its difference from the reference, max and 99th-percentile |difference|
of the abnormality probability, verdicts changed at the model's threshold, and accepted or not
(|AUROC delta| <= 0.005 and max |prob delta| <= 0.02; see bonexray/inference/backend_check.py).
The record goes beside the model as MODEL.backends.json (keyed by the file's SHA-256), where
``--backend auto`` reads it.

    python bench/backends.py fracatlas-efficientnet_lite0-320 --data ../shared/data/FracAtlas --split test
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from bonexray.errors import BonexrayError
    from bonexray.inference.backend_check import (AUROC_TOLERANCE, PROB_TOLERANCE, check_backends, format_record,
                                                  write_record)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="checkpoint, .onnx file or bundled model name")
    ap.add_argument("--data", required=True, help="the dataset the model was trained on (its split is verified)")
    ap.add_argument("--split", default="test", choices=["test", "valid", "all"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="engine threads (default: one per physical core)")
    ap.add_argument("--auroc-tolerance", type=float, default=AUROC_TOLERANCE)
    ap.add_argument("--prob-tolerance", type=float, default=PROB_TOLERANCE)
    ap.add_argument("--no-write", action="store_true", help="print only; do not write MODEL.backends.json")
    a = ap.parse_args(argv)
    try:
        record = check_backends(a.model, a.data, split=a.split, batch=a.batch, rounds=a.rounds, threads=a.threads,
                                auroc_tolerance=a.auroc_tolerance, prob_tolerance=a.prob_tolerance, progress=True)
        print(format_record(record))
        if not a.no_write:
            print(f"wrote {write_record(a.model, record)}")
    except BonexrayError as err:
        print(f"backends: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
