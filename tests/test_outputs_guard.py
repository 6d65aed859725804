"""--out folders: a command writes only into a new or empty folder, or one it wrote itself (its marker),
never over its own input, and says so in one line (--overwrite to allow the rest)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from builders import make_checkpoint, make_manifest

from bonexray.cli import main
from bonexray.errors import BonexrayError
from bonexray.output_folder import MARKER, claim_file, claim_folder, read_marker


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- the guard itself


def test_guard_accepts_new_empty_and_its_own_folder_only(tmp_path):
    claim_folder(tmp_path / "new", "evaluate", ["a.csv"])
    assert read_marker(tmp_path / "new")["command"] == "evaluate"
    (tmp_path / "new" / "a.csv").write_text("x")
    claim_folder(tmp_path / "new", "evaluate", ["a.csv"])  # its own earlier output: fine
    (tmp_path / "empty").mkdir()
    claim_folder(tmp_path / "empty", "evaluate", ["a.csv"])
    (tmp_path / "new" / "b.png").write_text("mine")  # a file the user put there, under a name evaluate writes
    with pytest.raises(BonexrayError, match="b.png were not written by `bonexray evaluate`.*--overwrite"):
        claim_folder(tmp_path / "new", "evaluate", ["a.csv", "b.png"])
    with pytest.raises(BonexrayError, match=r"holds the output of `bonexray evaluate`.*--overwrite"):
        claim_folder(tmp_path / "new", "preprocess", ["meta.json"])
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(BonexrayError, match=rf"--out {other}: not empty and not written by .*{MARKER}.*--overwrite"):
        claim_folder(other, "evaluate", ["a.csv"])
    assert not (other / MARKER).exists()
    claim_folder(other, "evaluate", ["a.csv"], overwrite=True)
    assert (other / "notes.txt").read_text() == "keep"


def test_guard_never_writes_over_an_input_even_with_overwrite(tmp_path):
    (tmp_path / "d").mkdir()
    data = tmp_path / "d" / "predictions.csv"
    data.write_text("path,body_part,abnormal\n")
    for overwrite in (False, True):
        with pytest.raises(BonexrayError, match="would write predictions.csv over the input"):
            claim_folder(tmp_path / "d", "evaluate", ["predictions.csv"], inputs=[data], overwrite=overwrite)
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"model")
    with pytest.raises(BonexrayError, match="over the input"):
        claim_file(ckpt, "export", inputs=[ckpt], overwrite=True)
    with pytest.raises(BonexrayError, match="exists and was not written by `bonexray export`.*--overwrite"):
        claim_file(tmp_path / "d" / "predictions.csv", "export")


# ---------------------------------------------------------------------------- every command with --out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    base = tmp_path_factory.mktemp("guard")
    manifest = make_manifest(base / "data", n=8, parts=("hand", "leg"))
    ckpt = make_checkpoint(base / "model.ckpt", body_parts=("hand", "leg"), image_size=64)
    return manifest, ckpt


def test_evaluate_never_eats_its_own_input_or_a_kept_report(small, tmp_path, capsys):
    manifest, ckpt = small
    d2 = tmp_path / "d2"
    d2.mkdir()
    for p in Path(manifest).parent.glob("*.png"):
        (d2 / p.name).write_bytes(p.read_bytes())
    (d2 / "predictions.csv").write_text(Path(manifest).read_text())  # the manifest, under evaluate's name
    (d2 / "report.md").write_text("my own notes\n")
    before = snapshot(d2)
    argv = ["evaluate", ckpt, "--data", d2 / "predictions.csv", "--split", "all", "--out", d2, "--bootstrap", 10,
            "--backend", "torch"]
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and f"--out {d2}" in one_line(err) and "--overwrite" in err
    rc, _, err = run(capsys, *argv, "--overwrite")
    assert rc == 2 and "over the input" in one_line(err)
    assert snapshot(d2) == before  # nothing written, not even the marker


def test_evaluate_reuses_its_own_folder(small, tmp_path, capsys):
    manifest, ckpt = small
    argv = ["evaluate", ckpt, "--data", manifest, "--split", "all", "--out", tmp_path / "res", "--bootstrap", 10,
            "--backend", "torch", "--cache", tmp_path / "cache"]
    assert run(capsys, *argv)[0] == 0
    assert read_marker(tmp_path / "res")["command"] == "evaluate"
    assert "metrics.json" in read_marker(tmp_path / "res")["files"]
    assert run(capsys, *argv)[0] == 0  # a second evaluate into its own folder


def test_preprocess_refuses_a_foreign_folder_and_reuses_its_cache(small, tmp_path, capsys):
    manifest, _ = small
    data_folder = Path(manifest).parent
    before = snapshot(data_folder)
    rc, _, err = run(capsys, "preprocess", manifest, "--out", data_folder, "--size", 32, "--workers", 1, "--quiet")
    assert rc == 2 and "--overwrite" in one_line(err) and str(data_folder) in err
    assert snapshot(data_folder) == before
    argv = ["preprocess", manifest, "--out", tmp_path / "cache", "--size", 32, "--workers", 1, "--quiet"]
    assert run(capsys, *argv)[0] == 0 and run(capsys, *argv)[0] == 0
    # a cache built before the marker existed (or by train's default cache) is still recognised
    (tmp_path / "cache" / MARKER).unlink()
    assert run(capsys, *argv)[0] == 0


def test_export_never_replaces_a_foreign_file_or_the_checkpoint(small, tmp_path, capsys):
    _, ckpt = small
    own = tmp_path / "model.ckpt"
    own.write_bytes(Path(ckpt).read_bytes())
    before = own.read_bytes()
    rc, _, err = run(capsys, "export", own, "--out", own, "--overwrite")
    assert rc == 2 and "over the input" in one_line(err)
    assert own.read_bytes() == before
    notes = tmp_path / "notes.onnx"
    notes.write_text("not a model")
    rc, _, err = run(capsys, "export", own, "--out", notes)
    assert rc == 2 and "--overwrite" in one_line(err)
    assert notes.read_text() == "not a model"
    assert run(capsys, "export", own, "--out", tmp_path / "m.onnx")[0] == 0
    assert run(capsys, "export", own, "--out", tmp_path / "m.onnx")[0] == 0  # its own export: replaced


def test_predict_cam_refuses_the_images_folder(small, capsys):
    manifest, ckpt = small
    folder = Path(manifest).parent
    before = snapshot(folder)
    rc, out, err = run(capsys, "predict", ckpt, folder / "img000.png", "--cam", folder, "--backend", "torch")
    assert rc == 2 and f"--cam {folder}" in one_line(err) and "--overwrite" in err
    assert snapshot(folder) == before


def test_train_refuses_a_foreign_out_folder(small, tmp_path, capsys):
    manifest, _ = small
    out = tmp_path / "run"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    rc, _, err = run(capsys, "train", "--data", manifest, "--out", out, "--pretrained", "none", "--image-size", 64,
                     "--epochs", 1, "--quiet", "--cache", tmp_path / "c")
    assert rc == 2 and f"--out {out}" in one_line(err) and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    marker = json.dumps({"command": "evaluate", "files": []})
    (out / MARKER).write_text(marker)
    rc, _, err = run(capsys, "train", "--data", manifest, "--out", out, "--quiet")
    assert rc == 2 and "holds the output of `bonexray evaluate`" in one_line(err)


def test_calibrate_scope_never_replaces_a_foreign_file_or_its_inputs(small, tmp_path, capsys):
    manifest, ckpt = small
    notes = tmp_path / "notes.ckpt"
    notes.write_text("not a model")
    run_ckpt = tmp_path / "best.ckpt"  # another run's checkpoint: a bonexray file, but not calibrate-scope's
    run_ckpt.write_bytes(Path(ckpt).read_bytes())
    for target in (notes, run_ckpt):
        before = target.read_bytes()
        rc, _, err = run(capsys, "calibrate-scope", ckpt, "--data", manifest, "--out", target, "--device", "cpu")
        line = one_line(err)
        assert rc == 2 and f"--out {target}" in line and "not written by `bonexray calibrate-scope`" in line
        assert "--overwrite" in line and target.read_bytes() == before
    for given in (ckpt, manifest):  # the model and the data: never, not even with --overwrite
        before = Path(given).read_bytes()
        rc, _, err = run(capsys, "calibrate-scope", ckpt, "--data", manifest, "--out", given, "--overwrite")
        assert rc == 2 and "over the input" in one_line(err) and Path(given).read_bytes() == before
    rc, _, err = run(capsys, "calibrate-scope", ckpt, "--data", manifest, "--out", tmp_path)
    assert rc == 2 and "is a folder" in one_line(err)


def test_a_calibrated_checkpoint_is_calibrate_scopes_own_output(small, tmp_path):
    from bonexray.inference.calibrate import is_calibrated_checkpoint, rewrite_checkpoint

    _, ckpt = small
    calibrated = rewrite_checkpoint(ckpt, tmp_path / "calibrated.ckpt", {"scope": {"method": "test"}})
    assert is_calibrated_checkpoint(calibrated)
    assert claim_file(calibrated, "calibrate-scope", ours=is_calibrated_checkpoint) == calibrated
    assert not is_calibrated_checkpoint(ckpt)  # no scope section
    assert not is_calibrated_checkpoint(rewrite_checkpoint(ckpt, tmp_path / "plain.ckpt", {}))
    (tmp_path / "notes.ckpt").write_text("not a model")
    assert not is_calibrated_checkpoint(tmp_path / "notes.ckpt")
    assert not is_calibrated_checkpoint(tmp_path / "missing.ckpt")


def test_a_cache_folder_is_never_a_foreign_one(small, tmp_path, capsys):
    manifest, ckpt = small
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.csv").write_text("my spreadsheet\n")
    before = snapshot(mine)
    rc, _, err = run(capsys, "evaluate", ckpt, "--data", manifest, "--split", "all", "--out", tmp_path / "res",
                     "--bootstrap", 10, "--backend", "torch", "--cache", mine)
    line = one_line(err)
    assert rc == 2 and f"--cache {mine}: not empty and not written by `bonexray preprocess`" in line
    assert "--overwrite" not in line  # evaluate's --overwrite is about --out, not the cache
    rc, _, err = run(capsys, "train", "--data", manifest, "--out", tmp_path / "run", "--pretrained", "none",
                     "--image-size", 64, "--epochs", 1, "--quiet", "--cache", mine)
    assert rc == 2 and f"--cache {mine}" in one_line(err)
    assert snapshot(mine) == before
    # preprocess --overwrite still writes into such a folder; then evaluate reuses it as a cache
    assert run(capsys, "preprocess", manifest, "--out", mine, "--size", 64, "--workers", 1, "--quiet",
               "--overwrite")[0] == 0
    assert run(capsys, "evaluate", ckpt, "--data", manifest, "--split", "all", "--out", tmp_path / "res",
               "--bootstrap", 10, "--backend", "torch", "--cache", mine)[0] == 0
