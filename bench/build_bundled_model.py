"""Build the bundled model file from a trained checkpoint (one command), then pin its SHA-256.

    python bench/build_bundled_model.py runs/fa/checkpoints/last.ckpt --data ../shared/data/FracAtlas \\
        --metrics results/fa/metrics.json

With ``--recard`` only the card of the built file is replaced by the checkpoint's (a gate refitted for the
same weights, which are checked tensor for tensor); the build's test metrics and float16 check are kept.

With ``--keep-card`` the checkpoint's own card (``bench/scope.py --write-model``: the gate fitted
against bench/scope_sets.py's outliers, the calibration and operating points) is kept as it is.

Writes ``src/bonexray/weights/<name>.ckpt`` (the network in float16, batch-norm statistics in float32,
the model card with the scope statistics and the borderline band, fitted on the train/valid splits
only) and ``<name>.json`` (training data with the FracAtlas citation and licence, the test metrics
with CIs from ``--metrics``, "not a medical device", the scope and band settings, the float16 check,
and the model's predictions on three reference images). The float16 file's test AUROC must stay within
``--max-auroc-drop`` of the float32 checkpoint's, both computed here by ``bonexray evaluate``'s code on
the test split; otherwise nothing is written. Paste the printed SHA-256 into
``bonexray.model.hub.BUNDLED``; tests/test_hub.py then checks the file and the three predictions.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

#: Three FracAtlas images whose predictions are recorded: a normal leg, a fractured hand, a normal shoulder.
REFERENCE_IMAGES = ("images/Non_fractured/IMG0000000.jpg", "images/Fractured/IMG0000019.jpg",
                    "images/Non_fractured/IMG0000040.jpg")
FRACATLAS = {
    "dataset": "FracAtlas",
    "citation": ("Abedeen, I., Rahman, M.A., Prottyasha, F.Z. et al. FracAtlas: A Dataset for Fracture Classification, "
                 "Localization and Segmentation of Musculoskeletal Radiographs. Scientific Data 10, 521 (2023). "
                 "https://doi.org/10.1038/s41597-023-02432-4"),
    "licence": "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/)",
}
INTENDED_USE = ("Not a medical device: research and teaching software, not for diagnosis or treatment decisions. "
                "Every result must be checked by a qualified reader.")
MAX_BYTES = 15_000_000


def _metric(m: dict, value, ci=None) -> dict:
    return {"value": value, "ci95": ci}


def test_metrics(metrics_path: Path) -> dict:
    """The headline test numbers (with 95% bootstrap CIs) of a ``bonexray evaluate`` metrics.json."""
    m = json.loads(Path(metrics_path).read_text())
    ab, ci = m["abnormality"], m["abnormality"].get("ci95") or {}
    out = {"split": m.get("split"), "split_protocol": m.get("split_protocol"), "n_images": m.get("n_images"),
           "n_studies": m.get("n_studies"), "threshold": m.get("threshold"),
           "image_auroc": _metric(m, ab["image"].get("auroc"), ci.get("image_auroc")),
           "study_auroc": _metric(m, ab["study"].get("auroc"), ci.get("study_auroc")),
           "sensitivity": _metric(m, ab["image"].get("recall")),
           "specificity": _metric(m, ab["image"].get("specificity")),
           "image_kappa": _metric(m, ab["image"].get("kappa"), ci.get("image_kappa")),
           "body_part_accuracy": _metric(m, (m.get("body_part") or {}).get("accuracy"))}
    if "localization" in m:
        out["box_ap50"] = _metric(m, m["localization"].get("ap50"), (m["localization"].get("ci95") or {}).get("ap50"))
    if m.get("split") != "test":
        raise SystemExit(f"{metrics_path}: split {m.get('split')!r}; the model card reports test metrics only")
    return out


def reference_predictions(model: Path, data: Path, images=REFERENCE_IMAGES) -> list[dict]:
    """``bonexray predict``'s records (PyTorch engine) for the reference images, paths relative to ``data``
    (the dataset folder, or the folder of a manifest CSV)."""
    from bonexray.predict import run_predict

    data = data if data.is_dir() else data.parent
    buf = io.StringIO()
    status = run_predict(model, [data / p for p in images], stream=buf, backend="torch", device="cpu")
    if status:
        raise SystemExit(f"reference images under {data} could not all be predicted")
    recs = [json.loads(line) for line in buf.getvalue().splitlines()]
    for rec, rel in zip(recs, images):
        rec["path"] = rel
    return recs


def test_auroc(model: Path, data: Path, work: Path, cache: str | None, batch_size: int, n_bootstrap: int) -> float:
    from bonexray.evaluation.evaluate import run_evaluation

    out = work / model.stem
    run_evaluation(str(model), str(data), split="test", out=str(out), batch_size=batch_size, device="cpu",
                   n_bootstrap=n_bootstrap, cache=cache, progress=False, backend="torch")
    return float(json.loads((out / "metrics.json").read_text())["abnormality"]["image"]["auroc"])


def build(checkpoint: str | Path, data: str | Path, metrics: str | Path, out_dir: str | Path, name: str,
          quantile: float = 0.995, cache: str | None = None, batch_size: int = 64, max_auroc_drop: float = 0.005,
          images=REFERENCE_IMAGES, n_bootstrap: int = 0, keep_card: bool = False) -> dict:
    """Build ``<out_dir>/<name>.ckpt`` + ``<name>.json``; returns the description written (with ``sha256``).

    ``keep_card``: the checkpoint's card already holds the gate, calibration and operating points
    (``bench/scope.py --write-model``, fitted against its outlier sets); keep them instead of refitting
    with ``calibrate-scope``'s defaults."""
    from bonexray.inference.calibrate import rewrite_checkpoint, scope_calibration
    from bonexray.model.checkpoint import read_card

    checkpoint, data, out_dir = Path(checkpoint), Path(data), Path(out_dir)
    numbers = test_metrics(Path(metrics))
    if keep_card:
        if not (read_card(checkpoint).scope or {}).get("head"):
            raise SystemExit(f"{checkpoint}: --keep-card needs a card with the scope gate's head (bench/scope.py --write-model)")
        updates = {}
    else:
        updates = scope_calibration(checkpoint, data, quantile=quantile, cache=cache, batch_size=batch_size, device="cpu")
    with tempfile.TemporaryDirectory(prefix="bonexray-bundle-") as tmp:
        work = Path(tmp)
        staged = rewrite_checkpoint(checkpoint, work / f"{name}.ckpt", updates, half=True)
        auroc32 = test_auroc(checkpoint, data, work, cache, batch_size, n_bootstrap)
        auroc16 = test_auroc(staged, data, work, cache, batch_size, n_bootstrap)
        if abs(auroc32 - auroc16) > max_auroc_drop:
            raise SystemExit(f"float16 test AUROC {auroc16:.4f} vs float32 {auroc32:.4f}: differs by more than "
                             f"{max_auroc_drop}; nothing written")
        size = staged.stat().st_size
        if size > MAX_BYTES:
            print(f"warning: {staged.name} is {size / 1e6:.1f} MB, above the {MAX_BYTES / 1e6:.0f} MB target",
                  file=sys.stderr)
        card = read_card(staged)
        refs = reference_predictions(staged, data, images)
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{name}.ckpt"
        shutil.move(str(staged), str(target))
    info = {
        "name": name,
        "weights": "float16 (batch-norm statistics float32), from the float32 training checkpoint",
        "training_data": {**FRACATLAS, "protocol": (f"split by exam group, seed {(card.split or {}).get('seed')}, "
                                                    f"fitted on {(card.split or {}).get('fit_on')}; "
                                                    "test split never seen in training, threshold, scope or band"),
                          "split_counts": (card.split or {}).get("counts")},
        "test_metrics": numbers,
        "float16_check": {"test_auroc_float32": auroc32, "test_auroc_float16": auroc16,
                          "max_allowed_difference": max_auroc_drop},
        "intended_use": INTENDED_USE,
    }
    info |= _file_and_card(target, card, refs)
    (out_dir / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _file_and_card(target: Path, card, refs: list[dict]) -> dict:
    """The parts of ``<name>.json`` that follow the file and its card (the rest follows the weights)."""
    from bonexray.model.hub import file_sha256

    scope = card.scope or {}
    return {
        "file": target.name,
        "sha256": file_sha256(target),
        "size_bytes": target.stat().st_size,
        "card": {k: v for k, v in card.to_dict().items() if k not in ("scope",)},
        "scope_gate": {k: scope.get(k) for k in ("method", "k", "threshold", "far_threshold", "quantile", "n_fit",
                                                 "n_threshold", "held_out_refused", "fitted_on", "threshold_source",
                                                 "far_rule", "head")}
                      | {"measured": "bench/scope.py fracatlas --data ../shared/data/FracAtlas (bench/scope.json)"},
        "borderline": {"band": card.borderline_band, "source": card.borderline_source},
        "reference_predictions": refs,
    }


def recard(checkpoint: str | Path, data: str | Path, out_dir: str | Path, name: str,
           images=REFERENCE_IMAGES) -> dict:
    """Replace only the card of the built ``<out_dir>/<name>.ckpt`` with ``checkpoint``'s (``bench/scope.py
    fracatlas --write-model``: a refitted gate for the same network). The weights must be the built
    file's, tensor for tensor, so the test metrics and the float16 check of the build still hold and are
    kept; the file's hash, card, gate and reference predictions are rewritten."""
    import torch

    from bonexray.inference.calibrate import is_calibrated_checkpoint
    from bonexray.model.checkpoint import STATE_KEY, _read_checkpoint, read_card

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    target, described = out_dir / f"{name}.ckpt", out_dir / f"{name}.json"
    if not is_calibrated_checkpoint(checkpoint):
        raise SystemExit(f"{checkpoint}: not a compact checkpoint with a scope card (bench/scope.py --write-model)")
    new, old = _read_checkpoint(checkpoint, "cpu")[STATE_KEY], _read_checkpoint(target, "cpu")[STATE_KEY]
    if new.keys() != old.keys() or any(new[k].dtype != old[k].dtype or not torch.equal(new[k], old[k]) for k in new):
        raise SystemExit(f"{checkpoint}: its weights are not those of {target}; build it instead (without --recard)")
    with tempfile.TemporaryDirectory(prefix="bonexray-bundle-") as tmp:
        staged = Path(tmp) / target.name
        shutil.copyfile(checkpoint, staged)
        refs = reference_predictions(staged, Path(data), images)
        shutil.move(str(staged), str(target))
    info = json.loads(described.read_text()) | _file_and_card(target, read_card(target), refs)
    described.write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv=None) -> int:
    from bonexray.model.hub import BUNDLED, WEIGHTS_DIR

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="the trained float32 checkpoint (the FracAtlas recipe's last.ckpt)")
    ap.add_argument("--data", required=True, help="the FracAtlas folder it was trained on")
    ap.add_argument("--metrics", help="metrics.json of `bonexray evaluate CKPT --split test` (required unless --recard)")
    ap.add_argument("--out", default=str(WEIGHTS_DIR), help=f"folder (default {WEIGHTS_DIR})")
    ap.add_argument("--name", default=BUNDLED[0].name, help=f"registry name (default {BUNDLED[0].name})")
    ap.add_argument("--quantile", type=float, default=0.995, help="scope threshold quantile on valid (default 0.995)")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-auroc-drop", type=float, default=0.005)
    ap.add_argument("--keep-card", action="store_true",
                    help="keep the checkpoint's gate, calibration and operating points (bench/scope.py --write-model) "
                         "instead of refitting them with calibrate-scope's default outlier sets")
    ap.add_argument("--recard", action="store_true",
                    help="replace only the card of the built file (--out/--name) with CHECKPOINT's: a refitted gate "
                         "for the same weights (bench/scope.py fracatlas --write-model); keeps the build's test metrics "
                         "and float16 check (--metrics is then not read)")
    args = ap.parse_args(argv)
    if not args.recard and not args.metrics:
        ap.error("--metrics is required (unless --recard)")
    if args.recard:
        info = recard(args.checkpoint, args.data, args.out, args.name)
        print(f"rewrote the card of {Path(args.out) / info['file']} and {info['name']}.json")
        print(f"SHA-256 {info['sha256']}")
        print(f'pin it: in src/bonexray/model/hub.py set BundledModel("{info["name"]}", ..., sha256="{info["sha256"]}")')
        return 0
    info = build(args.checkpoint, args.data, args.metrics, args.out, args.name, quantile=args.quantile,
                 cache=args.cache, batch_size=args.batch_size, max_auroc_drop=args.max_auroc_drop,
                 keep_card=args.keep_card)
    f16 = info["float16_check"]
    print(f"wrote {Path(args.out) / info['file']} ({info['size_bytes'] / 1e6:.1f} MB) and {info['name']}.json")
    print(f"test AUROC float32 {f16['test_auroc_float32']:.4f}, float16 {f16['test_auroc_float16']:.4f}")
    print(f"SHA-256 {info['sha256']}")
    print(f'pin it: in src/bonexray/model/hub.py set BundledModel("{info["name"]}", ..., sha256="{info["sha256"]}")')
    return 0


if __name__ == "__main__":
    sys.exit(main())
