"""The per-model backend check: may ``--backend auto`` run this model on a faster engine?

:func:`check_backends` runs the float32 onnxruntime reference and each candidate engine
(``openvino``, and ``openvino-bf16`` on a CPU with bf16) over one split of a dataset, the split the
model was trained with (found as ``bonexray evaluate`` finds it), and reports per engine: images/s at
one batch size (engines alternating, median over rounds), image AUROC and its difference from the
reference, the largest and the 99th-percentile absolute difference of the abnormality probability,
and how many verdicts change at the model's threshold. An engine is **accepted** when
``|AUROC difference| <= auroc_tolerance`` and ``max |probability difference| <= prob_tolerance``.

:func:`write_record` stores the result beside the model as ``<model>.backends.json``, keyed by the
model file's SHA-256, with the CPU model and flags and the library versions;
:func:`bonexray.inference.backends.accepted_backends` reads it for ``--backend auto``.
``bench/backends.py`` is the command.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import BonexrayError
from .backends import (MIN_SPEEDUP, ONNX_ENGINES, RECORD_FORMAT, backend_record_path, backend_unavailable, cpu_flags,
                       cpu_model, openvino_version, physical_cores, ranked_engines)

#: Accepted: test AUROC within this of float32 onnxruntime's (the project's rule for any faster path).
AUROC_TOLERANCE = 0.005
#: Accepted: every image's abnormality probability within this of float32 onnxruntime's.
PROB_TOLERANCE = 0.02
REFERENCE = "onnx"


def split_tiles(model: Path, data: str | os.PathLike, split: str, size: int, card_split: dict | None,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """uint8 tiles (N, size, size) and 0/1 labels of the labelled, readable images of ``split`` (the
    model's own training split, found and verified as ``bonexray evaluate`` does; ``all``: every image),
    read through the preprocessing cache; and how the split was found."""
    from ..data.datasets import load_dataset
    from ..data.preprocess import build_cache, default_cache_dir
    from ..errors import DatasetError
    from ..data.splits import assign_eval_splits
    from ..runs import find_run_dir

    records = load_dataset(str(data))
    cache, _ = build_cache(records, default_cache_dir(records.root, size), size=size, progress=progress)
    if split == "all":
        how = "all images"
    else:
        records, how = assign_eval_splits(records, card_split, find_run_dir(model))
    status = dict(zip(cache.index["path"], cache.index["status"]))
    row_of = dict(zip(cache.index["path"], cache.index["row"]))
    chosen = [r for r in records if (split == "all" or r.split == split) and r.abnormal in (0, 1)
              and status.get(r.path) in ("ok", "truncated")]
    if not chosen:
        raise DatasetError(f"{data}: no labelled, readable images in split {split!r} ({how})")
    tiles = cache.read_rows(np.asarray([row_of[r.path] for r in chosen]))
    return tiles, np.asarray([r.abnormal for r in chosen], dtype=int), how


def _probabilities(predictor, tiles: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([predictor.predict_arrays(tiles[i : i + batch])[0] for i in range(0, len(tiles), batch)])


def _speeds(predictors: dict, tiles: np.ndarray, batch: int, rounds: int) -> dict[str, float]:
    """images/s per engine: every round runs each engine once on the same batch, alternating; medians."""
    x = tiles[:batch]
    for p in predictors.values():  # warm-up: first-call allocations, kernel selection
        p.predict_arrays(x)
    seen: dict[str, list[float]] = {name: [] for name in predictors}
    for _ in range(rounds):
        for name, p in predictors.items():
            t = time.perf_counter()
            p.predict_arrays(x)
            seen[name].append(len(x) / (time.perf_counter() - t))
    return {name: statistics.median(v) for name, v in seen.items()}


def check_backends(model: str | os.PathLike, data: str | os.PathLike, split: str = "test", batch: int = 16,
                   rounds: int = 5, threads: int | None = None, candidates: tuple[str, ...] = ("openvino", "openvino-bf16"),
                   auroc_tolerance: float = AUROC_TOLERANCE, prob_tolerance: float = PROB_TOLERANCE,
                   progress: bool = False) -> dict:
    """The check (see the module doc) of ``model`` (a file or a bundled name) on ``split`` of ``data``;
    returns the record (:func:`write_record` stores it). Candidates this machine lacks are listed with why."""
    from ..model.hub import file_sha256, resolve_model

    path = resolve_model(model)
    threads = threads or physical_cores()
    load_s: dict[str, float] = {}
    load = _timed_loader(path, threads, load_s)
    ref = load(REFERENCE)
    tiles, labels, how = split_tiles(path, data, split, ref.image_size, ref.card.split, progress)
    if len(set(labels.tolist())) < 2:
        raise BonexrayError(f"{data}: split {split!r} has only one class; the AUROC check needs both")
    predictors, rows = _load_candidates(load, ref, candidates)
    probs = {name: _probabilities(p, tiles, batch) for name, p in predictors.items()}
    if not all(np.isfinite(v).all() for v in probs.values()):
        raise BonexrayError(f"{path}: the model's output is not a finite number (NaN/inf) on some images; no check")
    speeds = _speeds(predictors, tiles, batch, rounds)
    threshold = ref.threshold
    rows.update(_compare(probs, labels, threshold, speeds, load_s, auroc_tolerance, prob_tolerance))
    ordered = {REFERENCE: rows[REFERENCE], **{name: rows[name] for name in candidates}}
    return {
        "format": RECORD_FORMAT,
        "model": path.name,
        "model_sha256": file_sha256(path),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": _machine(threads),
        "versions": _versions(),
        "data": {"name": Path(str(data)).name, "split": split, "images": int(len(labels)),
                 "abnormal": int(labels.sum()), "split_found": how},
        "batch": batch, "rounds": rounds, "threshold": threshold,
        "tolerance": {"auroc_delta": auroc_tolerance, "max_abs_prob_delta": prob_tolerance},
        "reference": REFERENCE,
        "backends": ordered,
    }


def _timed_loader(path: Path, threads: int, load_s: dict[str, float]):
    """``load(name)``: a CPU predictor of ``path`` on engine ``name``, its load time stored in ``load_s[name]``."""
    from .predictor import Predictor

    def load(name: str):
        # What every start pays (integrity check, session or OpenVINO compilation): the second of two
        # loads, so the first's one-time costs (imports, the ONNX export) do not count against one engine.
        Predictor(path, device="cpu", backend=name, threads=threads)
        t = time.perf_counter()
        predictor = Predictor(path, device="cpu", backend=name, threads=threads)
        load_s[name] = time.perf_counter() - t
        return predictor

    return load


def _load_candidates(load, ref, candidates: tuple[str, ...]) -> tuple[dict, dict[str, dict]]:
    """The predictors to measure (the reference ``ref`` first, then each available candidate), and the rows
    of the candidates this machine lacks, with why; an unknown candidate is refused."""
    predictors = {REFERENCE: ref}
    rows: dict[str, dict] = {}
    for name in candidates:
        if name not in ONNX_ENGINES or name == REFERENCE:
            raise BonexrayError(f"backend check: {name!r} is not an ONNX engine to compare (choose from "
                                f"{', '.join(e for e in ONNX_ENGINES if e != REFERENCE)})")
        why = backend_unavailable(name)
        if why is not None:
            rows[name] = {"accepted": False, "why": f"not measured: {why}"}
            continue
        predictors[name] = load(name)
    return predictors, rows


def _compare(probs: dict[str, np.ndarray], labels: np.ndarray, threshold: float, speeds: dict[str, float],
             load_s: dict[str, float], auroc_tolerance: float, prob_tolerance: float) -> dict[str, dict]:
    """Per measured engine: its speed, load time and agreement with the reference, and whether it is accepted."""
    from sklearn.metrics import roc_auc_score

    ref_auroc = float(roc_auc_score(labels, probs[REFERENCE]))
    rows: dict[str, dict] = {}
    for name, p in probs.items():
        dp = np.abs(p - probs[REFERENCE])
        auroc = float(roc_auc_score(labels, p))
        row = {"img_s": round(speeds[name], 1), "load_s": round(load_s[name], 2), "auroc": round(auroc, 5), "auroc_delta": round(auroc - ref_auroc, 5),
               "max_abs_prob_delta": float(f"{dp.max():.3g}"), "p99_abs_prob_delta": float(f"{np.quantile(dp, 0.99):.3g}"),
               "verdict_changes": int(((p >= threshold) != (probs[REFERENCE] >= threshold)).sum())}
        if name == REFERENCE:
            row.update(accepted=True, why="the float32 reference")
        else:
            row.update(_acceptance(row["auroc_delta"], dp.max(), auroc_tolerance, prob_tolerance))
        rows[name] = row
    return rows


def _acceptance(auroc_delta: float, max_dp, auroc_tolerance: float, prob_tolerance: float) -> dict:
    """``accepted`` and ``why``: within both tolerances, or which ones it exceeds."""
    fails = []
    if abs(auroc_delta) > auroc_tolerance:
        fails.append(f"|AUROC delta| {abs(auroc_delta):.4f} > {auroc_tolerance}")
    if max_dp > prob_tolerance:
        fails.append(f"max |prob delta| {max_dp:.4f} > {prob_tolerance}")
    return dict(accepted=not fails, why="; ".join(fails) or
                f"|AUROC delta| <= {auroc_tolerance} and max |prob delta| <= {prob_tolerance}")


def _machine(threads: int) -> dict:
    """The record's ``machine``: CPU model, the flags that matter to the engines, threads, load average."""
    return {"cpu": cpu_model(), "flags": sorted(f for f in cpu_flags()
                                                if f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
                                                         "amx_bf16", "amx_int8")),
            "threads": threads, "load_average": [round(x, 2) for x in os.getloadavg()]}


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in ("bonexray", "onnxruntime", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    out["openvino"] = openvino_version()
    return out


def write_record(model: str | os.PathLike, record: dict) -> Path:
    """Write ``record`` beside the model file (``<model>.backends.json``); one line when the folder is not writable."""
    from ..model.hub import resolve_model

    target = backend_record_path(resolve_model(model))
    try:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, target)
    except OSError as err:
        raise BonexrayError(f"{target}: cannot write the backend record ({err.strerror or err})") from err
    return target


def format_record(record: dict) -> str:
    """The record as a table for the terminal."""
    lines = [f"{record['model']} on {record['data']['name']} {record['data']['split']} "
             f"({record['data']['images']} images, {record['data']['abnormal']} abnormal); batch {record['batch']}, "
             f"{record['machine']['threads']} threads; CPU {record['machine']['cpu']}",
             f"  {'backend':14s} {'img/s':>7s} {'load s':>6s} {'AUROC':>7s} {'dAUROC':>8s} {'max|dp|':>8s} "
             f"{'p99|dp|':>8s} {'flips':>5s}  verdict"]
    for name, r in record["backends"].items():
        if "img_s" not in r:
            lines.append(f"  {name:14s} {r['why']}")
            continue
        lines.append(f"  {name:14s} {r['img_s']:7.1f} {r.get('load_s', float('nan')):6.1f} {r['auroc']:7.4f} {r['auroc_delta']:+8.4f} "
                     f"{r['max_abs_prob_delta']:8.2g} {r['p99_abs_prob_delta']:8.2g} {r['verdict_changes']:5d}  "
                     f"{'accepted' if r['accepted'] else 'refused'}: {r['why']}")
    ranked = ranked_engines(record)
    lines.append(f"--backend auto runs {ranked[0] if ranked else REFERENCE} (accepted engines other than {REFERENCE} "
                 f"only when at least x{MIN_SPEEDUP} its images/s; bf16 only on a CPU with bf16)")
    return "\n".join(lines)
