
import pytest

from bonexray.data.datasets import detect_source, load_dataset
from bonexray.data.mura import read_mura
from bonexray.errors import DatasetError

from builders import MURA_STUDIES, make_manifest, make_mura_tree
from conftest import SHARED_DATA, requires_shared_data


def test_mura_reader_every_image_correct(tmp_path):
    root = make_mura_tree(tmp_path / "somewhere")
    rs = load_dataset(tmp_path / "somewhere")  # parent folder works too
    assert rs.source == "mura"
    expected = {}
    for split, part, patient, study, label, n in MURA_STUDIES:
        for i in range(1, n + 1):
            path = root / f"{split}/XR_{part}/{patient}/{study}_{'positive' if label else 'negative'}/image{i}.png"
            expected[str(path)] = (part.lower(), label, patient, split, study)
    assert len(rs) == len(expected)
    for r in rs:
        part, label, patient, split, study = expected[r.path]
        assert (r.body_part, r.abnormal, r.patient_id, r.split) == (part, label, patient, split)
        assert r.study_id.endswith(f"{patient}/{study}") and part in r.study_id
    # Same patient, two studies of one body part: distinct studies.
    p3 = {r.study_id for r in rs if r.patient_id == "patient00003"}
    assert len(p3) == 2
    assert not rs.problems


def test_mura_label_comes_from_study_csv(tmp_path):
    root = make_mura_tree(tmp_path)
    # Flip one label in the CSV: the CSV, not the folder name, is authoritative.
    csv_path = root / "train_labeled_studies.csv"
    text = csv_path.read_text().replace("patient00002/study1_negative/,0", "patient00002/study1_negative/,1")
    csv_path.write_text(text)
    rs = read_mura(root)
    assert {r.abnormal for r in rs if r.patient_id == "patient00002"} == {1}


def test_mura_reports_missing_and_unlisted(tmp_path):
    root = make_mura_tree(tmp_path)
    gone = root / "train/XR_WRIST/patient00001/study1_positive/image2.png"
    gone.unlink()
    extra = root / "valid/XR_WRIST/patient11001/study1_positive/image9.png"
    extra.write_bytes((root / "valid/XR_WRIST/patient11001/study1_positive/image1.png").read_bytes())
    rs = read_mura(root)
    assert any("listed but missing" in p and str(gone) in p for p in rs.problems)
    assert any("not listed" in p and str(extra) in p for p in rs.problems)
    assert str(gone) not in {r.path for r in rs}


def test_manifest_reader(tmp_path):
    path = make_manifest(tmp_path / "m", n=6)
    rs = load_dataset(path)
    assert rs.source == "manifest" and len(rs) == 6
    assert rs.records[0].path == str((tmp_path / "m" / "img000.png").resolve())
    assert rs.records[2].abnormal == 1 and rs.records[2].study_id == "s1" and rs.records[1].study_id == "s0"


def test_manifest_bad_columns_and_labels(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.png,1\n")
    with pytest.raises(DatasetError, match="path, body_part, abnormal"):
        load_dataset(bad)
    path = make_manifest(tmp_path / "m", n=4)
    path.write_text(path.read_text() + "img000.png,hand,maybe,s9\nnothere.png,hand,1,s9\n")
    rs = load_dataset(path)
    assert len(rs) == 4
    assert any("maybe" in p for p in rs.problems) and any("nothere.png" in p for p in rs.problems)


def test_unknown_layout_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset layout"):
        detect_source(tmp_path)
    with pytest.raises(DatasetError, match="no such file"):
        detect_source(tmp_path / "nope")


@requires_shared_data
def test_fracatlas_reader_real_data():
    rs = load_dataset(SHARED_DATA / "FracAtlas")
    assert rs.source == "fracatlas" and len(rs) == 3481
    assert set(rs.body_parts) == {"hand", "hip", "leg", "mixed", "shoulder"}
    # abnormal = fractured or hardware; the one mislabelled image is reported.
    assert sum(r.abnormal for r in rs) >= 590
    assert any("IMG0003298.jpg" in p and "folder wins" in p for p in rs.problems)
    by_id = {r.extras["image_id"]: r for r in rs}
    assert by_id["IMG0000000.jpg"].body_part == "leg"
    # Consecutive ids with identical flags share a study group.
    assert by_id["IMG0000000.jpg"].study_id == by_id["IMG0000001.jpg"].study_id
    assert 500 < len({r.study_id for r in rs}) < 3481
