from collections import Counter

import pytest

from bonexray.data.datasets import load_dataset
from bonexray.data.records import Record, RecordSet
from bonexray.data.splits import check_no_leak, make_splits
from bonexray.errors import DatasetError

from builders import make_mura_tree
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
