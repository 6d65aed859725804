from collections import Counter

import pytest

from bonexray.data.datasets import load_dataset
from bonexray.data.records import Record, RecordSet
from bonexray.data.splits import check_no_leak, make_splits
from bonexray.errors import DatasetError

from builders import make_fracatlas_tree, make_mura_tree
from conftest import SHARED_DATA, requires_shared_data


def _synthetic(n_groups=200, per=3):
    recs = []
    for g in range(n_groups):
        for i in range(per):
            recs.append(Record(f"/x/{g}_{i}.png", ["hand", "leg", "hip"][g % 3], int(g % 4 == 0), f"s{g}", f"p{g}"))
    return RecordSet(recs, "manifest", "/x")


def test_split_fractions_deterministic_and_grouped():
    rs = _synthetic()
    a, b = make_splits(rs, 0.15, 0.15, seed=1), make_splits(rs, 0.15, 0.15, seed=1)
    assert [r.split for r in a] == [r.split for r in b]
    c = make_splits(rs, 0.15, 0.15, seed=2)
    assert [r.split for r in a] != [r.split for r in c]
    check_no_leak(a)
    counts = Counter(r.split for r in a)
    assert abs(counts["test"] / len(rs) - 0.15) < 0.05 and abs(counts["valid"] / len(rs) - 0.15) < 0.05
    # Stratified: abnormal rate similar on each side.
    for split in ("train", "valid", "test"):
        sub = [r for r in a if r.split == split]
        assert abs(sum(r.abnormal for r in sub) / len(sub) - 0.25) < 0.08


def test_check_no_leak_detects_leak():
    rs = _synthetic(4, 2)
    rs.records[0].split, rs.records[1].split = "train", "valid"
    with pytest.raises(DatasetError, match="leak"):
        check_no_leak(rs)


def test_mura_official_valid_becomes_test(tmp_path):
    rs = make_splits(load_dataset(make_mura_tree(tmp_path)), valid_frac=0.3, seed=0)
    check_no_leak(rs)
    assert {r.split for r in rs if r.patient_id.startswith("patient11")} == {"test"}
    assert {r.split for r in rs if r.patient_id.startswith("patient0")} == {"train", "valid"}


def _exam_pairs_split_apart(root, recordset):
    """Pairs of consecutive image ids with identical body-part flags (views of one exam, or two
    exams safely merged) that a split put on different sides. Read from dataset.csv directly, so
    the reader's own grouping is not trusted."""
    import csv

    split_of = {r.extras["image_id"]: r.split for r in recordset}
    with open(root / "dataset.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    flags = ("hand", "leg", "hip", "shoulder", "mixed")
    apart = []
    for a, b in zip(rows, rows[1:]):
        ida, idb = a["image_id"], b["image_id"]
        consecutive = int(idb[3:-4]) == int(ida[3:-4]) + 1
        if consecutive and all(a[c] == b[c] for c in flags) and ida in split_of and idb in split_of:
            if split_of[ida] != split_of[idb]:
                apart.append((ida, idb))
    return apart


def _fracatlas_exams_with_changing_flags(base):
    """Exams whose views differ in fractured / multiscan / hardware: the old flag-run grouping split them."""
    root = make_fracatlas_tree(base, n_groups=40, per_group=3)
    import csv

    with open(root / "dataset.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        row["multiscan"] = str(i % 2)  # alternates inside every exam, like IMG0000242 / IMG0000243
    with open(root / "dataset.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def test_fracatlas_exam_groups_keep_views_together(tmp_path):
    root = _fracatlas_exams_with_changing_flags(tmp_path)
    rs = load_dataset(root)
    # Groups follow the body part only: 40 exams of 3 views, never split by the multiscan flag.
    assert len({r.study_id for r in rs}) == 40
    for seed in range(3):
        split = make_splits(rs, 0.15, 0.15, seed=seed)
        check_no_leak(split)
        assert _exam_pairs_split_apart(root, split) == []


def test_exam_pair_check_can_fail(tmp_path):
    """Grouping by every flag (the old reader) puts views of one exam on both sides; the check sees it."""
    root = _fracatlas_exams_with_changing_flags(tmp_path)
    rs = load_dataset(root)
    for r in rs:  # the old key: one group per run of identical flags, here one per image
        r.study_id = r.patient_id = r.extras["image_id"]
    split = make_splits(rs, 0.15, 0.15, seed=0)
    check_no_leak(split)  # consistent with its own (wrong) groups ...
    assert _exam_pairs_split_apart(root, split)  # ... but it splits examinations


def test_fractions_are_exact_in_twentieths():
    rs = _synthetic(n_groups=400, per=1)
    # Whole folds of 20 (stratification may move a group or two between folds).
    for valid, test in ((0.15, 0.15), (0.1, 0.2)):
        counts = Counter(r.split for r in make_splits(rs, valid, test, seed=0))
        assert abs(counts["valid"] - 400 * valid) <= 2 and abs(counts["test"] - 400 * test) <= 2, counts


@requires_shared_data
def test_no_exam_split_apart_on_real_fracatlas():
    rs = load_dataset(SHARED_DATA / "FracAtlas")
    for seed in (0, 1):
        split = make_splits(rs, 0.15, 0.15, seed=seed)
        check_no_leak(split)
        assert _exam_pairs_split_apart(SHARED_DATA / "FracAtlas", split) == [], seed


@requires_shared_data
def test_no_leak_on_real_fracatlas():
    rs = make_splits(load_dataset(SHARED_DATA / "FracAtlas"), 0.15, 0.15, seed=0)
    check_no_leak(rs)
    for split in ("train", "valid", "test"):
        parts = {r.body_part for r in rs if r.split == split}
        assert parts == {"hand", "hip", "leg", "mixed", "shoulder"}, split
    groups = {}
    for r in rs:
        groups.setdefault(r.study_id, set()).add(r.split)
    assert all(len(s) == 1 for s in groups.values())
