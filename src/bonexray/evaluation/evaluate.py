"""``bonexray evaluate``: run a model over a dataset split and write a results folder.

``--split valid|test`` is always the split the model was trained with (found through its model card,
``--splits FILE`` or the run's ``splits.csv``), or evaluation is refused; ``--split all`` scores every image.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import yaml
from tqdm.auto import tqdm

from ..data.datasets import load_dataset
from ..data.preprocess import build_cache, default_cache_dir
from ..data.splits import assign_eval_splits
from ..errors import BonexrayError, CheckpointError, DatasetError
from ..output_folder import claim_folder, mark_folder, refuse_overwriting_inputs
from ..inference.results import finite_rows
from ..inference.writers import csv_safe
from ..runs import find_run_dir
from .figures import plot_confusion, plot_curves, plot_roc
from .localization import localization_metrics, plot_froc
from .metrics import choose_threshold, compute_metrics, study_table
from .report import write_metrics_json, write_report


def _ece_line(cal: dict) -> str:
    """"0.088 [0.07, 0.11] as the network gives it -> 0.025 [...] calibrated" (CI only when bootstrapped)."""
    def one(e, ci):
        return f"{e:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    text = one(cal["before"]["ece"], cal["before"]["ece_ci95"]) + " as the network gives it"
    if cal.get("after"):
        text += f" -> {one(cal['after']['ece'], cal['after']['ece_ci95'])} calibrated (T {cal['after']['calibration']['temperature']:.3g})"
    return text


def parse_body_part_map(pairs: Sequence[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        if "=" not in pair:
            raise BonexrayError(f"--map-body-part expects DATA=MODEL, got {pair!r}")
        src, dst = (s.strip().lower() for s in pair.split("=", 1))
        mapping[src] = dst
    return mapping


#: Every file evaluate writes into its --out folder (the output guard checks these names).
EVALUATE_FILES = ("predictions.csv", "metrics.json", "report.md", "confusion_abnormality.png", "confusion_body_part.png",
                  "roc.png", "reliability.png", "froc.png", "curves.png")


#: Boxes scored for AP and FROC: everything down to this score, up to COCO's 100 per image.
EVAL_BOX_THRESHOLD, EVAL_MAX_DETECTIONS = 0.01, 100


def _eval_box_settings(predictor):
    from dataclasses import replace

    return replace(predictor.box_settings, threshold=EVAL_BOX_THRESHOLD, max_detections=EVAL_MAX_DETECTIONS)


def _predict_rows(predictor, image_cache, rows, batch_size: int, desc: str, progress: bool, boxes: bool = False,
                  known: dict | None = None):
    """(probs, body-part probs) of cache rows, plus with ``boxes`` every box down to ``EVAL_BOX_THRESHOLD``
    (per row an (n, 5) array in tile pixels), else None. ``known``: cache row -> ItemResult already
    predicted across processes (inference/distributed.py), read instead of running the model."""
    rows = np.asarray(rows)
    probs = np.zeros(len(rows), np.float32)
    part_probs = np.zeros((len(rows), len(predictor.body_parts)), np.float32)
    found: list[np.ndarray] | None = [] if boxes else None
    settings = _eval_box_settings(predictor) if boxes else None
    if known is not None:
        for j, row in enumerate(rows):
            res = known[int(row)]
            probs[j], part_probs[j] = res.prob, res.parts
            if found is not None:
                found.append(res.boxes)
        rows_done = len(rows)
    else:
        rows_done = 0
    with tqdm(total=len(rows), desc=desc, unit="img", disable=not progress or known is not None) as bar:
        for i in range(rows_done, len(rows), batch_size):
            batch_rows = rows[i : i + batch_size]
            pred = predictor.predict_batch(image_cache.read_rows(batch_rows), boxes=boxes, box_settings=settings)
            probs[i : i + len(batch_rows)], part_probs[i : i + len(batch_rows)] = pred.prob, pred.parts
            if found is not None:
                found.extend(pred.boxes)
            bar.update(len(batch_rows))
    bad = rows[~finite_rows(probs, part_probs)]  # the one NaN policy (inference/results.py)
    if len(bad):  # NaN would score as "normal": refuse instead of computing metrics from it
        raise CheckpointError(f"{predictor.path}: the model's output is not a finite number (NaN/inf) for {len(bad)} of "
                              f"{len(rows)} images (first: {image_cache.index['path'].iloc[int(bad[0])]}); no metrics "
                              "computed (is the model file damaged, or did training diverge?)")
    return (probs, part_probs, found) if boxes else (probs, part_probs)


def _valid_for_threshold(records, status) -> list:
    return [r for r in records if r.split == "valid" and r.abnormal in (0, 1) and status.get(r.path) in ("ok", "truncated")]


def _rechoose_threshold_on_valid(predictor, image_cache, records, run_dir, row_of, status, batch_size, progress,
                                 known=None):
    valid = _valid_for_threshold(records, status)
    if run_dir is None or len({r.abnormal for r in valid}) < 2:
        return predictor.threshold, "model card (no valid split of the run with both labels to re-choose it on)"
    cfg = {}
    if (run_dir / "config.yaml").is_file():
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    method, target = cfg.get("threshold_method", "youden"), cfg.get("target_sensitivity", 0.9)
    valid = sorted(valid, key=lambda r: row_of[r.path])  # near-sequential memmap reads
    labels = np.array([r.abnormal for r in valid])
    probs, _ = _predict_rows(predictor, image_cache, [row_of[r.path] for r in valid], batch_size,
                             "valid threshold", progress, known=known)
    t = float(choose_threshold(labels, probs, method=method, target=target))
    what = f"{len(getattr(predictor, 'members', [None]))} model(s), TTA '{predictor.tta}'"
    return t, f"re-chosen on the run's valid split for {what} ({method}, {len(valid)} images)"


def _same_split(predictor, checkpoints: Sequence[Path]) -> Path | None:
    """Run dir of the first checkpoint; the members of an ensemble must share one training split."""
    members = getattr(predictor, "members", [predictor])
    prints = [(m.card.split or {}).get("fingerprint") for m in members]
    if len(members) > 1 and (None in prints or len(set(prints)) > 1):
        names = ", ".join(str(m.path) for m in members)
        raise BonexrayError(f"{names}: an ensemble needs members trained on one split (same data and --split-seed, "
                            "recorded in each model card); otherwise a member would be tested on images it trained on")
    return find_run_dir(checkpoints[0]) if checkpoints[0].suffix != ".onnx" else None


def run_evaluation(checkpoint: str | Sequence[str], data: str, split: str = "test", out: str = "results",
                   batch_size: int = 16, device: str = "auto", n_bootstrap: int = 1000,
                   body_part_map: Sequence[str] = (), cache: str | None = None, progress: bool = True,
                   tta: str | None = None, splits: str | None = None, backend: str = "auto", devices: str | int = 1,
                   num_nodes: int = 1, strategy: str = "ddp", overwrite: bool = False) -> str | None:
    """Evaluate one checkpoint, or several as an ensemble (probabilities averaged).

    With ``devices`` other than 1 or several ``num_nodes``, the images are predicted across processes
    (inference/distributed.py; the cache is built by local rank 0 of each node) and global rank 0
    computes and writes everything; the other ranks return None.

    ``out``: a new or empty folder, or one an earlier evaluate wrote (its ``.bonexray-out.json``);
    ``overwrite`` allows any other folder. The files of ``data`` (manifest and images) and the
    checkpoints are never written over (bonexray/output_folder.py).
    """
    from ..inference.distributed import wants_distributed
    from ..model.hub import resolve_model

    t0 = time.perf_counter()
    given = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    rank0 = int(os.environ.get("RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0
    # Before the work, not after it; only the writing process leaves the marker.
    results = claim_folder(out, "evaluate", EVALUATE_FILES, overwrite=overwrite, inputs=[data, splits, *given],
                           write_marker=rank0, create=False)
    ckpts = [resolve_model(c) for c in given]
    distributed = wants_distributed(devices, num_nodes)
    predictor = _load_predictor(ckpts, device, tta, backend, devices if distributed else None)
    run_dir = _same_split(predictor, ckpts)
    fit_on_valid = _fit_on_valid(predictor, ckpts[0], split)
    sel = _select(predictor, data, split, cache, splits, body_part_map, run_dir, results, distributed, progress)
    # Localisation is scored where the data says where fractures are (FracAtlas' COCO boxes) and the
    # model has a box head.
    with_boxes = predictor.has_boxes and any("localized" in r.extras for r in sel.chosen)
    # The card's threshold was chosen under the card's TTA for one model; anything else chooses it again on valid.
    rechoose = not fit_on_valid and (predictor.tta != (predictor.card.tta or "none") or len(ckpts) > 1)
    known = None
    if distributed:
        known = _predict_across_processes(predictor, sel, rechoose, with_boxes, batch_size, devices=devices,
                                          num_nodes=num_nodes, strategy=strategy)
        if known is None:  # not global rank 0: rank 0 computes and writes the results
            return None
    probs, part_probs, *found = _predict_rows(predictor, sel.image_cache, [sel.row_of[r.path] for r in sel.chosen],
                                              batch_size, f"evaluate {split}", progress, boxes=with_boxes, known=known)
    threshold, threshold_source = _threshold(predictor, sel, run_dir, fit_on_valid, rechoose, batch_size, progress,
                                             known)
    phases = _Phases(["abnormality metrics", "calibration"] + (["box metrics"] if with_boxes else [])
                     + ["predictions.csv and figures", "report"], progress)
    table = _prediction_table(sel.chosen, probs, part_probs, threshold, predictor.body_parts)
    metrics, studies, curves = _all_metrics(table, found[0] if with_boxes else None, sel.chosen, threshold, predictor,
                                            n_bootstrap, phases, progress)
    info = _run_info(predictor, ckpts, data, split, sel, threshold, threshold_source, predictor.tta)
    report = _write_results(results, table, studies, metrics, curves, info, predictor, sel, run_dir, phases)
    return _summary(metrics, info, sel, time.perf_counter() - t0, report)


def _write_results(results: Path, table, studies, metrics: dict, curves, info: dict, predictor, sel: "_Selection",
                   run_dir, phases: "_Phases") -> Path:
    """predictions.csv, the figures, metrics.json (with what was evaluated, and how) and the report."""
    metrics.update({k: info[k] for k in ("checkpoint", "data", "split", "split_protocol", "threshold_source", "tta",
                                         "skipped_unreadable", "backend")})
    metrics["dropped_rows"] = {"n": len(sel.dropped), "rows": [{"file": f, "reason": why} for f, why in sel.dropped]}
    phases.next()
    _write_table_and_figures(results, table, studies, metrics, curves, predictor.body_parts, run_dir)
    phases.next()
    write_metrics_json(results / "metrics.json", metrics)
    report = write_report(results, metrics, predictor.body_parts, info)
    phases.close()
    return report


def _threshold(predictor, sel: "_Selection", run_dir, fit_on_valid: bool, rechoose: bool, batch_size: int,
               progress: bool, known) -> tuple[float, str]:
    """The operating threshold evaluated at, and where it comes from."""
    if fit_on_valid:
        return predictor.threshold, ("model card (a train+valid fit keeps 0.5, the operating point of its "
                                     "class-balanced loss; no split was left to choose it on)")
    if rechoose:
        # The stored threshold was chosen on valid for one model under the card's TTA; choose it again,
        # on the valid split only, for what is evaluated here.
        return _rechoose_threshold_on_valid(predictor, sel.image_cache, sel.records, run_dir, sel.row_of, sel.status,
                                            batch_size, progress, known=known)
    return predictor.threshold, "model card (chosen on valid during training)"


def _run_info(predictor, ckpts, data, split: str, sel: "_Selection", threshold: float, threshold_source: str,
              tta: str) -> dict:
    """What was evaluated, and how (metrics.json and the report's header)."""
    return {"checkpoint": ", ".join(str(c) for c in ckpts), "data": str(data), "split": split,
            "split_protocol": sel.how, "threshold": threshold, "threshold_source": threshold_source, "tta": tta,
            "backbone": predictor.card.backbone, "image_size": predictor.image_size,
            "skipped_unreadable": len(sel.skipped),
            "dropped_rows": (f"{len(sel.dropped)} (each named in metrics.json and on stderr)" if sel.dropped else 0),
            # The engine that ran (an ensemble: each member's), e.g. openvino-bf16 chosen by --backend auto.
            "backend": ", ".join(m.backend for m in getattr(predictor, "members", [predictor]))}


def _load_predictor(ckpts: Sequence[Path], device: str, tta: str | None, backend: str, devices=None):
    """One Predictor, or an Ensemble of several; ``devices`` (across processes): this rank's device and cores."""
    from ..inference.predictor import Ensemble, Predictor

    options: dict = {}
    if devices is not None:
        from ..inference.backends import physical_cores
        from ..inference.distributed import local_world_size, rank_device

        device = rank_device(device)
        options["threads"] = max(1, physical_cores() // local_world_size(devices))
    if len(ckpts) == 1:
        return Predictor(ckpts[0], device=device, tta=tta, backend=backend, **options)
    return Ensemble(ckpts, device=device, tta=tta, backend=backend, **options)


def _fit_on_valid(predictor, first: Path, split: str) -> bool:
    """Whether a member was a final fit (train --fit-on train+valid): no score or threshold may come from valid."""
    fit_on_valid = any((m.card.split or {}).get("fit_on") == "train+valid"
                       for m in getattr(predictor, "members", [predictor]))
    if fit_on_valid and split == "valid":
        raise BonexrayError(f"{first}: this model was trained on the valid split too (train --fit-on train+valid), "
                            "so scores on it say nothing; evaluate --split test")
    return fit_on_valid


@dataclass
class _Selection:
    """The dataset as evaluate reads it: records (split assigned, body parts mapped), the image cache and
    the images chosen (labelled, readable, in cache-row order), with every row left out and why."""

    records: Any
    image_cache: Any
    how: str
    status: dict
    row_of: dict
    chosen: list
    skipped: list
    dropped: list


def _select(predictor, data, split, cache, splits, body_part_map, run_dir, results, distributed: bool,
            progress: bool) -> _Selection:
    records = load_dataset(data)
    refuse_overwriting_inputs(results, EVALUATE_FILES, [r.path for r in records], "--out")
    dropped = list(records.dropped)  # rows of the dataset's list left out by the reader (label, missing file)
    # The cache is keyed by the dataset as read (the same one training built), before any remapping.
    cache_dir = Path(cache) if cache else default_cache_dir(records.root, predictor.image_size)
    if distributed and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        image_cache = _wait_for_cache(records, cache_dir, predictor.image_size)  # local rank 0 builds it
    else:
        image_cache, _ = build_cache(records, cache_dir, size=predictor.image_size, progress=progress)
    if split == "all":
        how = "all images"
    else:  # before any body-part remapping: the split is stratified by the dataset's own body parts
        records, how = assign_eval_splits(records, predictor.card.split, run_dir, splits)
    _map_body_parts(records, data, body_part_map, predictor.body_parts)
    index = image_cache.index
    status, row_of = dict(zip(index["path"], index["status"])), dict(zip(index["path"], index["row"]))
    in_split = [r for r in records if split == "all" or r.split == split]
    dropped += [(r.path, "no 0/1 label") for r in in_split if r.abnormal not in (0, 1)]
    chosen = [r for r in in_split if r.abnormal in (0, 1)]
    skipped = [r for r in chosen if status.get(r.path) not in ("ok", "truncated")]
    reasons = dict(zip(index["path"], index["reason"]))
    dropped += [(r.path, f"unreadable image ({reasons.get(r.path) or status.get(r.path) or 'not in the cache'})")
                for r in skipped]
    if not distributed or int(os.environ.get("RANK", "0")) == 0:
        for file, why in dropped:  # every one by name: a dropped row changes every number below
            print(f"bonexray evaluate: dropped {file}: {why}", file=sys.stderr)
    # In cache-row order, so each batch is one near-sequential read of the memmap.
    chosen = sorted((r for r in chosen if status.get(r.path) in ("ok", "truncated")), key=lambda r: row_of[r.path])
    if not chosen:
        raise DatasetError(f"{data}: no labelled, readable images in split {split!r} ({how})")
    return _Selection(records, image_cache, how, status, row_of, chosen, skipped, dropped)


def _map_body_parts(records, data, body_part_map: Sequence[str], body_parts: Sequence[str]) -> None:
    """``--map-body-part DATA=MODEL`` applied in place; a body part the model lacks stops here."""
    mapping = parse_body_part_map(body_part_map)
    for r in records.records:
        r.body_part = mapping.get(r.body_part, r.body_part)
    unknown = sorted({r.body_part for r in records} - set(body_parts))
    if unknown:
        raise DatasetError(
            f"{data}: body parts {', '.join(unknown)} are not classes of this model ({', '.join(body_parts)}). "
            "Map them with --map-body-part DATA=MODEL (e.g. --map-body-part wrist=hand), or evaluate on matching data"
        )


def _predict_across_processes(predictor, sel: _Selection, rechoose: bool, with_boxes: bool, batch_size: int,
                              **processes) -> dict | None:
    """Cache row -> ItemResult for every row this evaluation reads, on global rank 0; None elsewhere."""
    from ..inference.distributed import predict_distributed

    # One pass over every row this evaluation reads (the threshold's valid rows too): each
    # Trainer.predict call would start the processes again.
    wanted = sorted({sel.row_of[r.path] for r in sel.chosen}
                    | ({sel.row_of[r.path] for r in _valid_for_threshold(sel.records, sel.status)} if rechoose
                       else set()))
    outcomes = predict_distributed(
        predictor, len(wanted), lambda i: (sel.image_cache.read_rows([wanted[i]])[0], False, None),
        batch_size=batch_size, boxes=with_boxes, box_settings=_eval_box_settings(predictor) if with_boxes else None,
        **processes)
    return None if outcomes is None else {wanted[o.index]: o for o in outcomes}


def _prediction_table(chosen, probs, part_probs, threshold: float, body_parts: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({
        "path": [r.path for r in chosen],
        "study_id": [r.study_id for r in chosen],
        "body_part": [r.body_part for r in chosen],
        "abnormal": [r.abnormal for r in chosen],
        "prob_abnormal": probs,
        "pred_abnormal": (probs >= threshold).astype(int),
        "pred_body_part": [body_parts[j] for j in part_probs.argmax(1)],
        **{f"prob_{p}": part_probs[:, j] for j, p in enumerate(body_parts)},
    })


def _all_metrics(table: pd.DataFrame, found, chosen, threshold: float, predictor, n_bootstrap: int, phases,
                 progress: bool):
    """(metrics, study table, reliability curves): abnormality, calibration and, with ``found`` boxes, box metrics."""
    phases.next()
    metrics, studies = _abnormality_metrics(table, threshold, predictor.body_parts, n_bootstrap)
    phases.next()
    curves = _add_calibration(metrics, table, threshold, predictor.card, n_bootstrap)
    if found is not None:
        phases.next()
        metrics["localization"] = _localization(chosen, found, predictor.image_size, n_bootstrap, progress)
    return metrics, studies, curves


def _abnormality_metrics(table: pd.DataFrame, threshold: float, body_parts, n_bootstrap: int):
    """(compute_metrics' dict with ``studies_with_mixed_labels``, the study table)."""
    # A study whose views disagree (a fracture seen on one view only) counts as abnormal: reported once
    # here, as a count in metrics.json, instead of a Python warning per metric computed.
    labels_per_study = table.groupby("study_id", sort=False)["abnormal"].nunique()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*have images with different abnormal labels.*")
        metrics = compute_metrics(table, threshold, body_parts, n_bootstrap=n_bootstrap)
        studies = study_table(table)
    metrics["studies_with_mixed_labels"] = int((labels_per_study > 1).sum())
    return metrics, studies


def _add_calibration(metrics: dict, table: pd.DataFrame, threshold: float, card, n_bootstrap: int) -> dict:
    """``abnormality.calibration`` and ``.borderline`` into ``metrics``; returns the reliability curves."""
    from ..inference.scope import borderline_band
    from .calibration import band_error_rates, calibration_report

    band, band_source = borderline_band(card)
    # ECE before and after the card's calibration (the probabilities in predictions.csv stay the network's).
    calibration = calibration_report(table["abnormal"], table["prob_abnormal"], card, table["study_id"],
                                     n_bootstrap=n_bootstrap)
    curves = calibration.pop("_curves")
    metrics["abnormality"]["calibration"] = calibration
    metrics["abnormality"]["borderline"] = band_error_rates(table["abnormal"], table["prob_abnormal"], threshold,
                                                            band, band_source)
    return curves


def _write_table_and_figures(results: Path, table: pd.DataFrame, studies: pd.DataFrame, metrics: dict, curves: dict,
                             body_parts: Sequence[str], run_dir: Path | None) -> None:
    from .calibration import plot_reliability

    mark_folder(results, "evaluate", EVALUATE_FILES)
    text_cols = [c for c in table.columns if table[c].dtype == object]
    table.assign(**{c: table[c].map(csv_safe) for c in text_cols}).to_csv(  # no spreadsheet formulas
        results / "predictions.csv", index=False, float_format="%.6f")
    plot_confusion(metrics["confusion"]["abnormality"], ["normal", "abnormal"], results / "confusion_abnormality.png",
                   "Abnormality (image level)")
    plot_confusion(metrics["confusion"]["body_part"], body_parts, results / "confusion_body_part.png", "Body part")
    plot_roc(table["abnormal"], table["prob_abnormal"], studies["abnormal"], studies["prob_abnormal"], results / "roc.png")
    plot_reliability({**metrics["abnormality"]["calibration"], "_curves": curves}, results / "reliability.png")
    if "localization" in metrics:
        loc = metrics["localization"]
        plot_froc(loc["froc_curve"], results / "froc.png", ci=loc["ci95"]["froc_sensitivity"])
    if run_dir is not None and (run_dir / "metrics.csv").is_file():
        plot_curves(run_dir / "metrics.csv", results / "curves.png")


def _summary(metrics: dict, info: dict, sel: _Selection, seconds: float, report) -> str:
    """The lines the CLI prints after an evaluation."""
    m_img, m_study = metrics["abnormality"]["image"], metrics["abnormality"]["study"]
    border, mixed = metrics["abnormality"]["borderline"], metrics["studies_with_mixed_labels"]

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    return (f"evaluated {metrics['n_images']} images / {metrics['n_studies']} studies ({info['split']}; {sel.how}) "
            f"in {seconds:.1f}s on {info['backend']}\n"
            f"  abnormality image: AUROC {f(m_img['auroc'])}  acc {f(m_img['accuracy'])}  "
            f"sens {f(m_img['recall'])}  spec {f(m_img['specificity'])}  kappa {f(m_img['kappa'])}\n"
            f"  abnormality study: AUROC {f(m_study['auroc'])}  kappa {f(m_study['kappa'])}\n"
            f"  body part: acc {f(metrics['body_part']['accuracy'])}  macro-F1 {f(metrics['body_part']['macro_f1'])}\n"
            f"  calibration: ECE {_ece_line(metrics['abnormality']['calibration'])}; borderline band "
            f"{border['band']:g}: error rate {f(border['inside']['error_rate'])} inside "
            f"({border['inside']['n']} images), {f(border['outside']['error_rate'])} outside\n"
            + (_localization_line(metrics["localization"]) if "localization" in metrics else "")
            + (f"  skipped {len(sel.skipped)} unreadable image(s)\n" if sel.skipped else "")
            + (f"  dropped {len(sel.dropped)} row(s) of the data (named above and in metrics.json)\n"
               if sel.dropped else "")
            + (f"  {mixed} stud(y/ies) have views with different labels; each counts as abnormal (any view)\n"
               if mixed else "")
            + f"  report: {report}")


#: A waiting rank gives up when the cache folder has not changed for this long (rank 0 died, e.g. under srun).
CACHE_WAIT_STALL_S = 900.0


def _wait_for_cache(records, cache_dir: Path, size: int, stall_s: float = CACHE_WAIT_STALL_S):
    """Ranks other than a node's local rank 0 wait for the cache it builds (torchrun and srun start all at once)."""
    from ..data.preprocess import ImageCache, cache_is_current, fingerprint

    fp = fingerprint(records.records, size)
    last_change, seen = time.monotonic(), None
    while not cache_is_current(cache_dir, fp):
        try:
            state = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in cache_dir.iterdir())
        except OSError:
            state = None
        if state != seen:
            last_change, seen = time.monotonic(), state
        elif time.monotonic() - last_change > stall_s:
            raise DatasetError(f"{cache_dir}: waited {stall_s:.0f} s for local rank 0 to build this cache and nothing "
                               "changed; did rank 0 fail? Run `bonexray preprocess` first, then evaluate again")
        time.sleep(1.0)
    return ImageCache.open(cache_dir)


class _Phases:
    """One progress line over the steps after inference, naming the step that runs (tqdm on stderr)."""

    def __init__(self, names: Sequence[str], progress: bool) -> None:
        self.names = list(names)
        self.bar = tqdm(total=len(self.names), desc="metrics", unit="step", disable=not progress,
                        bar_format="{desc}: {n_fmt}/{total_fmt} steps [{elapsed}]{postfix}")
        self.started = 0

    def next(self) -> None:
        """The previous step is done; the next one starts."""
        if self.started:
            self.bar.update(1)
        self.bar.set_postfix_str(self.names[self.started])
        self.started += 1

    def close(self) -> None:
        self.bar.update(len(self.names) - self.bar.n)
        self.bar.set_postfix_str("done")
        self.bar.close()


def _localization(chosen, found: list[np.ndarray], size: int, n_bootstrap: int, progress: bool = False) -> dict:
    """Box metrics against the dataset's fracture boxes, both in tile pixels (the letterbox is a uniform
    scale plus a shift, so IoU, hits and counts are those of the original pixels). Images whose fracture
    nobody annotated are left out."""
    from ..data.preprocess import letterbox_boxes

    truth = []
    for r in chosen:
        if not r.extras.get("localized", False):
            truth.append(None)
        elif r.extras.get("boxes"):
            truth.append(letterbox_boxes(r.extras["boxes"], r.extras["annotated_size"], size))
        else:
            truth.append(np.zeros((0, 4), np.float32))
    loc = localization_metrics(found, truth, [r.study_id for r in chosen], n_bootstrap=n_bootstrap, progress=progress)
    loc["protocol"] = (f"boxes down to score {EVAL_BOX_THRESHOLD} (at most {EVAL_MAX_DETECTIONS} per image) against the "
                       "dataset's fracture boxes; AP: COCO (one matching pass, pycocotools' rules), every evaluated "
                       "image counted; fractured_only: the same AP on the images with fracture boxes alone "
                       "(FracAtlas's official protocol); FROC: sensitivity per fracture box at IoU >= 0.5; pointing: "
                       f"top box centre inside a fracture box; CIs: bootstrap over exam groups ({n_bootstrap} "
                       "resamples for every value)")
    return loc


def _localization_line(loc: dict) -> str:
    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    froc = loc.get("froc_sensitivity") or {}
    frac = loc.get("fractured_only") or {}
    return (f"  boxes: AP50 {f(loc.get('ap50'))}  AP50:95 {f(loc.get('ap50_95'))}  pointing {f(loc.get('pointing'))}  "
            f"FROC sens @0.5/1/2 FP {f(froc.get('0.5'))}/{f(froc.get('1'))}/{f(froc.get('2'))}  "
            f"({loc.get('n_images')} images, {loc.get('n_boxes')} boxes)\n"
            f"  boxes, fractured images only: AP50 {f(frac.get('ap50'))}  AP50:95 {f(frac.get('ap50_95'))}  "
            f"({frac.get('n_images')} images)\n")
