import csv
from pathlib import Path

import pytest
from PIL import Image

from bonexray.data.datasets import detect_source, load_dataset
from bonexray.data.mura import read_mura
from bonexray.data.preprocess import ImageCache
from bonexray.errors import DatasetError

from builders import MURA_STUDIES, make_manifest, make_mura_tree, nonblank_lines, radiograph_like, run_main
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


# --------------------------------------------------------------------------- manifests: encoding, repeated rows, paths


def test_non_utf8_manifest_is_one_line(tmp_path, capsys):
    manifest = make_manifest(tmp_path / "d", n=4)
    manifest.write_bytes(manifest.read_bytes().replace(b"hand", b"h\xe4nd", 1))  # Latin-1 umlaut
    rc, _, err = run_main(capsys, "preprocess", manifest, "--out", tmp_path / "c")
    assert rc == 2 and f"{manifest}: not UTF-8 text" in err and len(nonblank_lines(err)) == 1
    assert not (tmp_path / "c").exists()


def _append_rows(manifest: Path, rows: list[list]) -> None:
    with open(manifest, "a", newline="") as f:
        csv.writer(f).writerows(rows)


def test_duplicate_manifest_rows(tmp_path, capsys):
    manifest = make_manifest(tmp_path / "d", n=4)  # rows: img000..img003, lines 2..5
    _append_rows(manifest, [["img001.png", "wrist", 0, "s0"]])  # same as line 3: merged
    rc, out, _ = run_main(capsys, "preprocess", manifest, "--out", tmp_path / "c", "--size", 16, "--quiet")
    assert rc == 0 and "line 6: img001.png repeats line 3; merged" in out
    assert len(ImageCache.open(tmp_path / "c").index) == 4
    _append_rows(manifest, [["img002.png", "hand", 0, "s1"]])  # line 4 says abnormal=1: conflict
    rc, _, err = run_main(capsys, "preprocess", manifest, "--out", tmp_path / "c2")
    assert rc == 2 and "img002.png is listed on lines 4 and 7 with different abnormal (1 vs 0)" in err


def test_manifest_paths_outside_its_folder_get_a_note(tmp_path):
    from bonexray.data.manifest import read_manifest

    manifest = make_manifest(tmp_path / "data", n=4)
    Image.fromarray(radiograph_like(7)).save(tmp_path / "elsewhere.png")
    with open(manifest, "a", newline="") as f:
        csv.writer(f).writerow(["../elsewhere.png", "hand", 0, "s9"])
    rs = read_manifest(manifest)
    assert len(rs) == 5
    assert [p for p in rs.problems if "outside the manifest's folder" in p and "../elsewhere.png" in p]
    assert not [p for p in read_manifest(make_manifest(tmp_path / "clean", n=4)).problems if "outside" in p]


# --------------------------------------------------------------------------- MURA and FracAtlas: malformed rows


def test_malformed_mura_rows_are_problems_with_file_and_line(tmp_path, capsys):
    root = make_mura_tree(tmp_path)
    good = len(read_mura(root))
    with open(root / "train_image_paths.csv", "a", newline="") as f:
        f.write("MURA-v1.1/elsewhere/image1.png\n")  # no train/ or valid/ part
    with open(root / "train_labeled_studies.csv", "a", newline="") as f:
        f.write("MURA-v1.1/train/XR_HAND/patient00004/study1_positive/,maybe\n")
    img_line = len((root / "train_image_paths.csv").read_text().splitlines())
    lab_line = len((root / "train_labeled_studies.csv").read_text().splitlines())
    rs = read_mura(root)
    assert len(rs) == good  # every good row still read
    assert any(p.startswith(f"train_image_paths.csv line {img_line}: path does not follow MURA's layout")
               for p in rs.problems)
    assert any(p.startswith(f"train_labeled_studies.csv line {lab_line}: malformed row") for p in rs.problems)
    rc, out, _ = run_main(capsys, "preprocess", root, "--out", tmp_path / "c", "--size", 16, "--quiet")
    assert rc == 0 and f"train_image_paths.csv line {img_line}" in out


def test_mura_tree_without_csvs(tmp_path):
    root = make_mura_tree(tmp_path)
    with_csvs = {r.path: (r.abnormal, r.body_part, r.study_id, r.split) for r in read_mura(root)}
    for f in root.glob("*.csv"):
        f.unlink()
    rs = read_mura(root)
    assert {r.path: (r.abnormal, r.body_part, r.study_id, r.split) for r in rs} == with_csvs
    for split in ("train", "valid"):
        assert f"{split}_image_paths.csv missing: {split} images found by scanning {split}/" in rs.problems
        assert f"{split}_labeled_studies.csv missing: {split} labels taken from the study folder names" in rs.problems


def test_fracatlas_duplicate_rows_and_odd_flags(tmp_path):
    from bonexray.data.fracatlas import read_fracatlas
    from bonexray.errors import DatasetError
    from builders import make_fracatlas_tree

    root = make_fracatlas_tree(tmp_path, n_groups=4, per_group=2)
    n = len(read_fracatlas(root))
    with open(root / "dataset.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows.append(dict(rows[0]))  # the same image listed twice, same flags
    odd = dict(rows[1])
    odd["hardware"] = "2"
    rows[1] = odd

    def write(rows):
        with open(root / "dataset.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    write(rows)
    rs = read_fracatlas(root)
    assert len(rs) == n - 1  # the duplicate merged, the row with flag 2 left out
    assert any("repeats line 2; merged" in p for p in rs.problems)
    assert any("flag hardware=2 is not 0 or 1; row skipped" in p for p in rs.problems)
    clash = dict(rows[0])
    clash["fractured"] = str(1 - int(clash["fractured"]))
    write(rows[:-1] + [clash])
    with pytest.raises(DatasetError, match="listed on lines 2 and .* with different fractured"):
        read_fracatlas(root)
