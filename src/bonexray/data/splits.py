"""Leak-free, seeded splits: grouped by patient / study group, stratified by body part and label.

Uses scikit-learn's ``StratifiedGroupKFold``: one fold of ``round(1/fraction)`` becomes the held-out
part, so no group is ever on both sides and each side keeps the body-part x label mix.
"""
from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from ..errors import DatasetError
from .records import Record, RecordSet


def _hold_out(records: list[Record], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (keep, held_out) with about ``fraction`` of the records held out, grouped by patient."""
    if fraction <= 0 or len(records) < 2:
        return list(range(len(records))), []
    n_folds = max(2, int(round(1.0 / fraction)))
    groups = np.array([r.patient_id for r in records])
    n_groups = len(set(groups.tolist()))
    if n_groups < 2:
        raise DatasetError("cannot split: all images belong to one patient/study group")
    n_folds = min(n_folds, n_groups)
    strata = np.array([f"{r.body_part}|{r.abnormal}" for r in records])
    # Strata smaller than the fold count make sklearn warn; merge them into their label-only stratum.
    uniq, counts = np.unique(strata, return_counts=True)
    rare = set(uniq[counts < n_folds].tolist())
    strata = np.array([f"*|{r.abnormal}" if s in rare else s for s, r in zip(strata, records)])
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    keep, held = next(sgkf.split(np.zeros(len(records)), strata, groups))
    return sorted(keep.tolist()), sorted(held.tolist())


def make_splits(
    recordset: RecordSet, valid_frac: float = 0.15, test_frac: float = 0.15, seed: int = 0
) -> RecordSet:
    """Assign train/valid/test to every record, deterministically for a given seed.

    - MURA: the official ``valid`` split becomes ``test`` (MURA's real test set is hidden, and the
      official validation set is what the field reports on); ``valid`` is carved from ``train`` by
      patient, so thresholds and early stopping never see the reported data.
    - Datasets with given train (and maybe test) splits keep them; ``valid`` is carved from train if absent.
    - Datasets without splits (FracAtlas, plain manifests) get train/valid/test by study group.
    """
    records = [replace(r) for r in recordset.records]
    given = {r.split for r in records}
    if recordset.source == "mura":
        for r in records:
            if r.split == "valid":
                r.split = "test"
        pool = [i for i, r in enumerate(records) if r.split == "train"]
        fractions = [("valid", valid_frac)]
    elif "train" in given and "valid" in given:
        return RecordSet(records, recordset.source, recordset.root, list(recordset.problems))
    elif "train" in given:
        pool = [i for i, r in enumerate(records) if r.split == "train"]
        fractions = [("valid", valid_frac)]
    else:
        pool = list(range(len(records)))
        for r in records:
            r.split = "train"
        fractions = [("test", test_frac), ("valid", valid_frac / max(1e-9, 1 - test_frac))]
    for name, frac in fractions:
        sub = [records[i] for i in pool]
        keep, held = _hold_out(sub, frac, seed)
        for j in held:
            sub[j].split = name
        pool = [pool[j] for j in keep]
    return RecordSet(records, recordset.source, recordset.root, list(recordset.problems))


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
        w.writerow(["path", "split", "study_id", "patient_id", "body_part", "abnormal"])
        for r in recordset.records:
            w.writerow([r.path, r.split, r.study_id, r.patient_id, r.body_part, r.abnormal])
