"""``bonexray evaluate``: run a model over a dataset split and write a results folder.

The split is the one the model was trained with when the checkpoint sits in its run directory
(``RUN/splits.csv``); otherwise it is recomputed with the same deterministic, grouped splitter.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import yaml
from tqdm.auto import tqdm

from ..data.datasets import load_dataset
from ..data.preprocess import build_cache, check_output_folder, default_cache_dir
from ..data.records import RecordSet
from ..data.splits import make_splits
from ..errors import BonexrayError, CheckpointError, DatasetError
from .metrics import choose_threshold, compute_metrics, study_table
from .report import plot_confusion, plot_curves, plot_roc, write_metrics_json, write_report


def find_run_dir(checkpoint: Path) -> Path | None:
    """RUN/checkpoints/x.ckpt -> RUN when RUN looks like a bonexray run directory."""
    run = checkpoint.resolve().parent.parent
    return run if (run / "config.yaml").is_file() else None


def parse_body_part_map(pairs: Sequence[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        if "=" not in pair:
            raise BonexrayError(f"--map-body-part expects DATA=MODEL, got {pair!r}")
        src, dst = (s.strip().lower() for s in pair.split("=", 1))
        mapping[src] = dst
    return mapping


def assign_eval_splits(records: RecordSet, run_dir: Path | None) -> tuple[RecordSet, str]:
    """Same split as training when known; returns (records, how the split was obtained)."""
    if run_dir is not None and (run_dir / "splits.csv").is_file():
        recorded = pd.read_csv(run_dir / "splits.csv", usecols=["path", "split"], dtype=str)
        by_path = dict(zip(recorded["path"], recorded["split"]))
        if any(r.path in by_path for r in records):
            # Images the run never saw (e.g. left out by --limit) are "none": never in valid/test.
            for r in records.records:
                r.split = by_path.get(r.path, "none")
            return records, f"recorded by the training run ({run_dir / 'splits.csv'})"
    cfg = {}
    if run_dir is not None:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    seed, vf, tf = cfg.get("split_seed", cfg.get("seed", 0)), cfg.get("valid_frac", 0.15), cfg.get("test_frac", 0.15)
    return make_splits(records, vf, tf, seed=seed), f"recomputed (grouped, stratified; seed={seed}, valid={vf}, test={tf})"


def _predict_rows(predictor, image_cache, rows, batch_size: int, desc: str, progress: bool):
    rows = np.asarray(rows)
    probs = np.zeros(len(rows), np.float32)
    part_probs = np.zeros((len(rows), len(predictor.body_parts)), np.float32)
    with tqdm(total=len(rows), desc=desc, unit="img", disable=not progress) as bar:
        for i in range(0, len(rows), batch_size):
            batch_rows = rows[i : i + batch_size]
            probs[i : i + len(batch_rows)], part_probs[i : i + len(batch_rows)] = predictor.predict_arrays(
                np.asarray(image_cache.images[batch_rows]))
            bar.update(len(batch_rows))
    bad = rows[~(np.isfinite(probs) & np.isfinite(part_probs).all(axis=1))]
    if len(bad):  # NaN would score as "normal": refuse instead of computing metrics from it
        raise CheckpointError(f"{predictor.path}: the model's output is not a finite number (NaN/inf) for {len(bad)} of "
                              f"{len(rows)} images (first: {image_cache.index['path'].iloc[int(bad[0])]}); no metrics "
                              "computed (is the model file damaged, or did training diverge?)")
    return probs, part_probs


def _rechoose_threshold_on_valid(predictor, image_cache, records, run_dir, row_of, status, batch_size, progress):
    valid = [r for r in records if r.split == "valid" and r.abnormal in (0, 1) and status.get(r.path) in ("ok", "truncated")]
    if run_dir is None or len({r.abnormal for r in valid}) < 2:
        return predictor.threshold, "model card (no valid split of the run with both labels to re-choose it on)"
    cfg = {}
    if (run_dir / "config.yaml").is_file():
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    method, target = cfg.get("threshold_method", "youden"), cfg.get("target_sensitivity", 0.9)
    valid = sorted(valid, key=lambda r: row_of[r.path])  # near-sequential memmap reads
    labels = np.array([r.abnormal for r in valid])
    probs, _ = _predict_rows(predictor, image_cache, [row_of[r.path] for r in valid], batch_size,
                             "valid threshold", progress)
    t = float(choose_threshold(labels, probs, method=method, target=target))
    what = f"{len(getattr(predictor, 'members', [None]))} model(s), TTA '{predictor.tta}'"
    return t, f"re-chosen on the run's valid split for {what} ({method}, {len(valid)} images)"


def _same_split_runs(checkpoints: Sequence[Path]) -> Path | None:
    """Run dir of the first checkpoint; members of an ensemble must share its recorded split."""
    runs = [find_run_dir(c) if c.suffix != ".onnx" else None for c in checkpoints]
    if len(runs) > 1:
        if any(r is None or not (r / "splits.csv").is_file() for r in runs):
            raise BonexrayError("an ensemble is evaluated only on checkpoints inside run directories with splits.csv, "
                                "so that no member is tested on images it trained on")
        first = pd.read_csv(runs[0] / "splits.csv", usecols=["path", "split"], dtype=str)
        for r in runs[1:]:
            other = pd.read_csv(r / "splits.csv", usecols=["path", "split"], dtype=str)
            if dict(zip(first["path"], first["split"])) != dict(zip(other["path"], other["split"])):
                raise BonexrayError(f"{r} and {runs[0]} were trained on different splits; an ensemble of them would be "
                                    "tested on images one member trained on (train them with the same --split-seed)")
    return runs[0]


def run_evaluation(checkpoint: str | Sequence[str], data: str, split: str = "test", out: str = "results",
                   batch_size: int = 64, device: str = "auto", n_bootstrap: int = 1000,
                   body_part_map: Sequence[str] = (), cache: str | None = None, progress: bool = True,
                   tta: str = "none") -> str:
    """Evaluate one checkpoint, or several as an ensemble (probabilities averaged)."""
    from ..inference.predict import Ensemble, Predictor

    t0 = time.perf_counter()
    results = check_output_folder(out, "--out")  # before the work, not after it
    ckpts = [Path(c) for c in ([checkpoint] if isinstance(checkpoint, (str, Path)) else checkpoint)]
    predictor = Predictor(ckpts[0], device=device, tta=tta) if len(ckpts) == 1 else Ensemble(ckpts, device=device, tta=tta)
    body_parts = predictor.body_parts
    run_dir = _same_split_runs(ckpts)

    records = load_dataset(data)
    # The cache is keyed by the dataset as read (the same one training built), before any remapping.
    cache_dir = Path(cache) if cache else default_cache_dir(records.root, predictor.image_size)
    image_cache, _ = build_cache(records, cache_dir, size=predictor.image_size, progress=progress)
    mapping = parse_body_part_map(body_part_map)
    for r in records.records:
        r.body_part = mapping.get(r.body_part, r.body_part)
    unknown = sorted({r.body_part for r in records} - set(body_parts))
    if unknown:
        raise DatasetError(
            f"{data}: body parts {', '.join(unknown)} are not classes of this model ({', '.join(body_parts)}). "
            "Map them with --map-body-part DATA=MODEL (e.g. --map-body-part wrist=hand), or evaluate on matching data"
        )
    if split == "all":
        how = "all images"
    else:
        records, how = assign_eval_splits(records, run_dir)

    status = dict(zip(image_cache.index["path"], image_cache.index["status"]))
    row_of = dict(zip(image_cache.index["path"], image_cache.index["row"]))
    chosen = [r for r in records if (split == "all" or r.split == split) and r.abnormal in (0, 1)]
    skipped = [r for r in chosen if status.get(r.path) not in ("ok", "truncated")]
    # In cache-row order, so each batch is one near-sequential read of the memmap.
    chosen = sorted((r for r in chosen if status.get(r.path) in ("ok", "truncated")), key=lambda r: row_of[r.path])
    if not chosen:
        raise DatasetError(f"{data}: no labelled, readable images in split {split!r} ({how})")

    probs, part_probs = _predict_rows(predictor, image_cache, [row_of[r.path] for r in chosen], batch_size,
                                      f"evaluate {split}", progress)
    threshold, threshold_source = predictor.threshold, "model card (chosen on valid during training)"
    if tta != "none" or len(ckpts) > 1:
        # The stored threshold was chosen on valid for one model without TTA; choose it again, on the
        # valid split only, for what is evaluated here.
        threshold, threshold_source = _rechoose_threshold_on_valid(predictor, image_cache, records, run_dir, row_of,
                                                                 status, batch_size, progress)

    table = pd.DataFrame({
        "path": [r.path for r in chosen],
        "study_id": [r.study_id for r in chosen],
        "body_part": [r.body_part for r in chosen],
        "abnormal": [r.abnormal for r in chosen],
        "prob_abnormal": probs,
        "pred_abnormal": (probs >= threshold).astype(int),
        "pred_body_part": [body_parts[j] for j in part_probs.argmax(1)],
        **{f"prob_{p}": part_probs[:, j] for j, p in enumerate(body_parts)},
    })
    metrics = compute_metrics(table, threshold, body_parts, n_bootstrap=n_bootstrap)
    info = {"checkpoint": ", ".join(str(c) for c in ckpts), "data": str(data), "split": split, "split_protocol": how,
            "threshold": threshold, "threshold_source": threshold_source, "tta": tta, "backbone": predictor.card.backbone,
            "image_size": predictor.image_size, "skipped_unreadable": len(skipped)}
    metrics.update({k: info[k] for k in ("checkpoint", "data", "split", "split_protocol", "threshold_source", "tta",
                                         "skipped_unreadable")})

    results.mkdir(parents=True, exist_ok=True)
    table.to_csv(results / "predictions.csv", index=False, float_format="%.6f")
    plot_confusion(metrics["confusion"]["abnormality"], ["normal", "abnormal"], results / "confusion_abnormality.png",
                   "Abnormality (image level)")
    plot_confusion(metrics["confusion"]["body_part"], body_parts, results / "confusion_body_part.png", "Body part")
    studies = study_table(table)
    plot_roc(table["abnormal"], table["prob_abnormal"], studies["abnormal"], studies["prob_abnormal"], results / "roc.png")
    if run_dir is not None and (run_dir / "metrics.csv").is_file():
        plot_curves(run_dir / "metrics.csv", results / "curves.png")
    write_metrics_json(results / "metrics.json", metrics)
    report = write_report(results, metrics, body_parts, info)
    m_img, m_study = metrics["abnormality"]["image"], metrics["abnormality"]["study"]

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    return (f"evaluated {metrics['n_images']} images / {metrics['n_studies']} studies ({split}; {how}) "
            f"in {time.perf_counter() - t0:.1f}s\n"
            f"  abnormality image: AUROC {f(m_img['auroc'])}  acc {f(m_img['accuracy'])}  "
            f"sens {f(m_img['recall'])}  spec {f(m_img['specificity'])}  kappa {f(m_img['kappa'])}\n"
            f"  abnormality study: AUROC {f(m_study['auroc'])}  kappa {f(m_study['kappa'])}\n"
            f"  body part: acc {f(metrics['body_part']['accuracy'])}  macro-F1 {f(metrics['body_part']['macro_f1'])}\n"
            + (f"  skipped {len(skipped)} unreadable image(s)\n" if skipped else "")
            + f"  report: {report}")
