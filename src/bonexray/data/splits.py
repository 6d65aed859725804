"""Leak-free, seeded splits: grouped by patient / study group, stratified by body part and label.

Uses scikit-learn's ``StratifiedGroupKFold``: every group goes to one fold, and each held-out part
takes whole folds, so no group is ever on both sides and each side keeps the body-part x label mix.
"""
from __future__ import annotations

import csv
import hashlib
import math
import os
import random
import warnings
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from ..errors import DatasetError
from .records import Record, RecordSet


#: Fractions are realised as whole folds of at most this many (so 0.15 is 3 folds of 20, exactly).
MAX_FOLDS = 20


def _fold_plan(fractions: list[float], n_groups: int) -> tuple[int, list[int]]:
    """(number of folds, folds taken for each fraction), exact when the fractions have small denominators."""
    fracs = [Fraction(f).limit_denominator(MAX_FOLDS) for f in fractions]
    n_folds = 1
    for f in fracs:
        n_folds = math.lcm(n_folds, f.denominator)
    if n_folds > MAX_FOLDS:  # e.g. 1/7 with 3/20: round each to twentieths
        n_folds = MAX_FOLDS
    n_folds = max(2, min(n_folds, n_groups))
    taken = [max(1, round(float(f) * n_folds)) if f > 0 else 0 for f in fracs]
    if sum(taken) >= n_folds:
        raise DatasetError(f"cannot split {n_groups} patient/study groups into train plus "
                           f"{', '.join(str(float(f)) for f in fracs)}: too few groups")
    return n_folds, taken


def _hold_out(records: list[Record], fractions: list[float], seed: int) -> list[int]:
    """Part index per record: 0..len(fractions)-1 for the held-out parts, -1 for the rest; grouped by patient.

    One ``StratifiedGroupKFold`` pass assigns every patient group to one of ``n`` folds (balanced
    by body part x label); each held-out part takes whole folds, so its share is exact in folds.
    """
    part = [-1] * len(records)
    if not records or not any(f > 0 for f in fractions):
        return part
    groups = np.array([r.patient_id for r in records])
    n_groups = len(set(groups.tolist()))
    if n_groups < 2:
        raise DatasetError("cannot split: all images belong to one patient/study group")
    n_folds, taken = _fold_plan(fractions, n_groups)
    strata = np.array([f"{r.body_part}|{r.abnormal}" for r in records])
    # Strata smaller than the fold count make sklearn warn; merge them into their label-only stratum.
    uniq, counts = np.unique(strata, return_counts=True)
    rare = set(uniq[counts < n_folds].tolist())
    strata = np.array([f"*|{r.abnormal}" if s in rare else s for s, r in zip(strata, records)])
    uniq, counts = np.unique(strata, return_counts=True)
    rare = set(uniq[counts < n_folds].tolist())
    strata = np.where(np.isin(strata, list(rare)), "*", strata)
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold_to_part = [k for k, n in enumerate(taken) for _ in range(n)]
    with warnings.catch_warnings():
        # Small leftover strata are stratified as well as they can be; sklearn's warning says nothing more.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        folds = list(sgkf.split(np.zeros(len(records)), strata, groups))
    for fold, (_, held) in enumerate(folds):
        if fold < len(fold_to_part):
            for j in held:
                part[j] = fold_to_part[fold]
    return part


def make_splits(
    recordset: RecordSet, valid_frac: float = 0.15, test_frac: float = 0.15, seed: int = 0
) -> RecordSet:
    """Assign train/valid/test to every record, deterministically for a given seed.

    - MURA: the official ``valid`` split becomes ``test`` (MURA's real test set is hidden, and the
      official validation set is what the field reports on); ``valid`` is carved from ``train`` by
      patient, so thresholds and checkpoint choices never see the reported data.
    - Datasets with given train (and maybe test) splits keep them; ``valid`` is carved from train if absent.
    - Datasets without splits (FracAtlas, plain manifests) get train/valid/test by patient/study group,
      ``test_frac`` and ``valid_frac`` of all images (in whole folds of twentieths: 0.15 is 3/20).
    """
    records = [replace(r) for r in recordset.records]
    given = {r.split for r in records}
    if recordset.source == "mura":
        for r in records:
            if r.split == "valid":
                r.split = "test"
        pool = [i for i, r in enumerate(records) if r.split == "train"]
        names, fractions = ["valid"], [valid_frac]
    elif "train" in given and "valid" in given:
        return RecordSet(records, recordset.source, recordset.root, list(recordset.problems))
    elif "train" in given:
        pool = [i for i, r in enumerate(records) if r.split == "train"]
        names, fractions = ["valid"], [valid_frac]
    else:
        pool = list(range(len(records)))
        for r in records:
            r.split = "train"
        # Both fractions are of the whole dataset, taken in one pass.
        names, fractions = ["test", "valid"], [test_frac, valid_frac]
    sub = [records[i] for i in pool]
    for r, k in zip(sub, _hold_out(sub, fractions, seed)):
        if k >= 0:
            r.split = names[k]
    return RecordSet(records, recordset.source, recordset.root, list(recordset.problems))


def limit_records(recordset, n: int | None, seed: int):
    """About ``n`` images as whole patient/exam groups drawn at random with ``seed`` (no split leakage).

    Returns a new RecordSet; the one given is left whole (the cache covers every image).
    """
    if not n or n >= len(recordset.records):
        return recordset
    groups: dict[str, list] = {}
    for r in recordset.records:
        groups.setdefault(r.patient_id, []).append(r)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    kept: list = []
    for k in keys:
        if len(kept) >= n:
            break
        kept.extend(groups[k])
    kept_ids = {id(r) for r in kept}
    return RecordSet([r for r in recordset.records if id(r) in kept_ids], recordset.source, recordset.root,
                     list(recordset.problems))


def check_no_leak(recordset: RecordSet) -> None:
    """Raise if any patient/study group appears in more than one split."""
    seen: dict[str, str] = {}
    for r in recordset.records:
        for key in (f"patient:{r.patient_id}", f"study:{r.study_id}"):
            s = seen.setdefault(key, r.split)
            if s != r.split:
                raise DatasetError(f"split leak: {key} is in both {s} and {r.split}")


def write_splits(recordset: RecordSet, path: str | Path) -> None:
    """Record the split of every image (kept in every run directory)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "study_id", "patient_id", "body_part", "abnormal", "root"])
        for r in recordset.records:
            w.writerow([r.path, r.split, r.study_id, r.patient_id, r.body_part, r.abnormal, recordset.root])


def relative_key(path: str, root: str) -> str:
    """An image's path relative to its dataset root (POSIX), so copies and moved datasets still match."""
    try:
        return Path(os.path.relpath(os.path.realpath(path), os.path.realpath(root))).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).as_posix()


def split_fingerprint(recordset: RecordSet) -> str:
    """SHA-256 of the sorted (relative path, split) pairs of the train/valid/test images."""
    lines = sorted(f"{relative_key(r.path, recordset.root)}\t{r.split}" for r in recordset.records
                   if r.split in ("train", "valid", "test"))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def split_counts(recordset: RecordSet) -> dict[str, int]:
    return {s: sum(1 for r in recordset.records if r.split == s) for s in ("train", "valid", "test")}


def read_splits(recordset: RecordSet, path: str | Path) -> RecordSet:
    """Assign the splits recorded in a ``splits.csv`` (matched by resolved path, then by path relative
    to the dataset root); images the file does not list get ``none`` (never valid or test)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot read the splits file ({e})") from None
    if not rows or not {"path", "split"} <= set(rows[0]):
        raise DatasetError(f"{path}: not a splits file (needs columns path, split)")
    split_root = rows[0].get("root") or ""
    by_real = {os.path.realpath(r["path"]): r["split"] for r in rows}
    # Older splits files have no root column: they match by resolved path only.
    by_rel = {relative_key(r["path"], split_root): r["split"] for r in rows} if split_root else {}
    out = []
    for r in recordset.records:
        s = by_real.get(os.path.realpath(r.path)) or by_rel.get(relative_key(r.path, recordset.root)) or "none"
        out.append(replace(r, split=s))
    return RecordSet(out, recordset.source, recordset.root, list(recordset.problems))


def assign_eval_splits(records: RecordSet, card_split: dict | None, run_dir: Path | None,
                       splits_file: str | Path | None = None) -> tuple[RecordSet, str]:
    """The exact split the model was trained with, or a clear refusal; returns (records, how it was found).

    The model card carries the split's recipe (seed, fractions, --limit) and a fingerprint of its
    (image, split) pairs, so ONNX files and copied checkpoints know it too. In order: ``--splits FILE``;
    the split recomputed from the card; the run's ``splits.csv`` beside the checkpoint. Each must
    match the card's fingerprint (when the card has one); otherwise evaluation is refused rather
    than scoring a "test" split that may hold training images.
    """
    want = (card_split or {}).get("fingerprint")

    def verified(rs: RecordSet) -> bool:
        return want is None or split_fingerprint(rs) == want

    if splits_file is not None:
        rs = read_splits(records, splits_file)
        if not verified(rs):
            raise DatasetError(f"{splits_file}: this split is not the one the model was trained with (its fingerprint "
                               "differs from the model card's); pass the splits.csv of the model's own training run")
        if not any(r.split in ("train", "valid", "test") for r in rs):
            raise DatasetError(f"{splits_file}: lists none of the images of {records.root}")
        return rs, f"from {splits_file}" + (" (verified against the model card)" if want else "")
    if want is not None:
        c = card_split
        limited = limit_records(records, c.get("limit"), int(c.get("seed", 0)))
        rs = make_splits(limited, float(c.get("valid_frac", 0.15)), float(c.get("test_frac", 0.15)), seed=int(c.get("seed", 0)))
        if verified(rs):
            chosen = {r.path: r.split for r in rs}
            out = RecordSet([replace(r, split=chosen.get(r.path, "none")) for r in records], records.source, records.root,
                            list(records.problems))
            return out, (f"the training split, recomputed from the model card and verified (seed {c.get('seed')}, "
                         f"valid {c.get('valid_frac')}, test {c.get('test_frac')}, limit {c.get('limit')})")
    if run_dir is not None and (run_dir / "splits.csv").is_file():
        rs = read_splits(records, run_dir / "splits.csv")
        if any(r.split in ("train", "valid", "test") for r in rs) and verified(rs):
            return rs, f"recorded by the training run ({run_dir / 'splits.csv'})"
    if want is not None:
        raise DatasetError(
            f"{records.root}: cannot find the split this model was trained with: this dataset does not reproduce it "
            f"(different images or version?) and no matching splits.csv was found. Pass --splits RUN/splits.csv "
            f"from its training run, or --split all to score every image (only for data the model never saw)")
    raise DatasetError(
        "this model does not record its training split (a model from before bonexray kept it in the model card) and "
        "no splits.csv of its run was found beside it. Pass --splits RUN/splits.csv, or --split all to score every "
        "image (only for data the model never saw)")
