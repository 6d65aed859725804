import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from bonexray.cli import main
from bonexray.evaluation.metrics import compute_metrics

from builders import make_manifest, run_main


def _get(d, dotted):
    for k in dotted.split("."):
        d = d[k]
    return d


def test_evaluate_writes_the_results_folder(trained_run, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["evaluate", trained_run["best_checkpoint"], "--data", trained_run["manifest"], "--out", str(out),
                 "--bootstrap", "200", "--cache", str(Path(trained_run["run_dir"]).parent / "run-cache")]) == 0
    assert "evaluated" in capsys.readouterr().out
    for name in ("metrics.json", "predictions.csv", "confusion_abnormality.png", "confusion_body_part.png",
                 "roc.png", "curves.png", "report.md"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] > 200 and im.size[1] > 200
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("abnormality.image.accuracy", "abnormality.image.precision", "abnormality.image.recall",
                "abnormality.image.auroc", "abnormality.image.kappa", "abnormality.study.kappa",
                "abnormality.study.auroc", "abnormality.study.accuracy", "body_part.accuracy", "body_part.macro_f1",
                "n_images", "n_studies", "checkpoint", "data", "split"):
        _get(metrics, key)
    for part in ("hand", "leg", "shoulder"):
        assert "kappa" in _get(metrics, f"abnormality.per_body_part.{part}.study")
    assert metrics["split"] == "test"
    # Exactly the run's test split, as recorded in its splits.csv.
    pred = pd.read_csv(out / "predictions.csv")
    splits = pd.read_csv(Path(trained_run["run_dir"]) / "splits.csv")
    assert set(pred["path"]) == set(splits.loc[splits["split"] == "test", "path"])
    for col in ("path", "study_id", "body_part", "abnormal", "prob_abnormal", "pred_abnormal", "pred_body_part"):
        assert col in pred.columns
    # metrics.json agrees with an independent recomputation from predictions.csv
    again = compute_metrics(pred, metrics["threshold"], ["hand", "leg", "shoulder"], n_bootstrap=0)
    assert again["abnormality"]["study"]["accuracy"] == pytest.approx(metrics["abnormality"]["study"]["accuracy"])
    report = (out / "report.md").read_text()
    assert "![" in report and "roc.png" in report and "Study level" in report


def test_evaluate_all_split(trained_run, tmp_path):
    out = tmp_path / "r"
    assert main(["evaluate", trained_run["best_checkpoint"], "--data", trained_run["manifest"], "--out", str(out),
                 "--split", "all", "--bootstrap", "0"]) == 0
    assert json.loads((out / "metrics.json").read_text())["n_images"] == 48


def test_evaluate_mismatched_body_parts(trained_run, tmp_path, capsys):
    other = make_manifest(tmp_path / "o", n=8, parts=("hand", "wrist"))
    assert main(["evaluate", trained_run["best_checkpoint"], "--data", str(other), "--out", str(tmp_path / "r"),
                 "--split", "all"]) == 2
    err = capsys.readouterr().err
    assert "wrist" in err and "--map-body-part" in err
    assert main(["evaluate", trained_run["best_checkpoint"], "--data", str(other), "--out", str(tmp_path / "r"),
                 "--split", "all", "--map-body-part", "wrist=hand", "--bootstrap", "0"]) == 0
    pred = pd.read_csv(tmp_path / "r" / "predictions.csv")
    assert set(pred["body_part"]) == {"hand"}


def test_evaluate_with_flip_tta_rechooses_threshold_on_valid(trained_run, tmp_path):
    import numpy as np

    from bonexray.evaluation.metrics import choose_threshold
    from bonexray.inference.predictor import Predictor

    out = tmp_path / "tta"
    cache = str(Path(trained_run["run_dir"]).parent / "run-cache")
    assert main(["evaluate", trained_run["best_checkpoint"], "--data", trained_run["manifest"], "--out", str(out),
                 "--bootstrap", "0", "--tta", "flip", "--cache", cache]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tta"] == "flip" and "re-chosen on the run's valid split" in metrics["threshold_source"]
    # The threshold is the Youden point of the flip-TTA probabilities on the run's valid split.
    splits = pd.read_csv(Path(trained_run["run_dir"]) / "splits.csv")
    valid = splits[splits["split"] == "valid"]
    pr = Predictor(trained_run["best_checkpoint"], device="cpu", tta="flip")
    from bonexray.data.preprocess import ImageCache

    c = ImageCache.open(cache)
    row_of = dict(zip(c.index["path"], c.index["row"]))
    probs, _ = pr.predict_arrays(np.asarray(c.images[[row_of[p] for p in valid["path"]]]))
    assert metrics["threshold"] == pytest.approx(float(choose_threshold(valid["abnormal"].to_numpy(), probs)), abs=1e-6)
    pred = pd.read_csv(out / "predictions.csv")
    assert ((pred["prob_abnormal"] >= metrics["threshold"]).astype(int) == pred["pred_abnormal"]).all()


def test_ensemble_of_runs_with_the_same_split(trained_run, tmp_path, capsys):
    import shutil

    run = Path(trained_run["run_dir"])
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    cache = str(run.parent / "run-cache")
    single, ens = tmp_path / "single", tmp_path / "ens"
    base = ["--data", trained_run["manifest"], "--bootstrap", "0", "--cache", cache]
    assert main(["evaluate", trained_run["best_checkpoint"], "--out", str(single), *base]) == 0
    assert main(["evaluate", trained_run["best_checkpoint"], str(twin / "checkpoints" / "best.ckpt"), "--out", str(ens), *base]) == 0
    a, b = pd.read_csv(single / "predictions.csv"), pd.read_csv(ens / "predictions.csv")
    assert list(a["path"]) == list(b["path"]) and (a["prob_abnormal"] - b["prob_abnormal"]).abs().max() < 1e-6
    m = json.loads((ens / "metrics.json").read_text())
    assert "2 model(s)" in m["threshold_source"] and str(twin) in m["checkpoint"]
    # A member trained on another split would be tested on its own training images: refused.
    _with_card(twin / "checkpoints" / "best.ckpt", split={"fingerprint": "0" * 64})
    capsys.readouterr()
    assert main(["evaluate", trained_run["best_checkpoint"], str(twin / "checkpoints" / "best.ckpt"), "--out", str(ens), *base]) == 2
    assert "trained on one split" in capsys.readouterr().err


def _with_card(ckpt: Path, **changes) -> Path:
    """Rewrite a checkpoint's model card (e.g. a model from before the card recorded its split)."""
    import torch

    obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    obj["bonexray"].update(changes)
    from bonexray.model.checkpoint import stamp_weights_sha256

    stamp_weights_sha256(obj)  # an intact file of that kind, not a tampered one: its hash covers the new card
    torch.save(obj, ckpt)
    return ckpt


def _test_paths(run_dir) -> set:
    splits = pd.read_csv(Path(run_dir) / "splits.csv")
    return set(splits.loc[splits["split"] == "test", "path"])


def test_onnx_export_and_moved_checkpoint_use_the_training_split(trained_run, tmp_path):
    import shutil

    moved = tmp_path / "elsewhere" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(trained_run["best_checkpoint"], moved)
    onnx = tmp_path / "model.onnx"
    assert main(["export", str(moved), "--out", str(onnx)]) == 0
    cache = str(Path(trained_run["run_dir"]).parent / "run-cache")
    # The data given by another spelling of its path (relative vs absolute) must not matter.
    data = str(Path(trained_run["manifest"]).resolve())
    for model in (moved, onnx):
        out = tmp_path / f"res-{model.suffix[1:]}"
        assert main(["evaluate", str(model), "--data", data, "--out", str(out), "--bootstrap", "0", "--cache", cache]) == 0
        assert set(pd.read_csv(out / "predictions.csv")["path"]) == _test_paths(trained_run["run_dir"])
        assert "recomputed from the model card and verified" in json.loads((out / "metrics.json").read_text())["split_protocol"]


def test_evaluate_refuses_a_split_it_cannot_find(trained_run, tmp_path, capsys):
    import shutil

    # A dataset that does not reproduce the training split (one image fewer): refused, not re-split.
    rows = pd.read_csv(trained_run["manifest"])
    other = Path(trained_run["manifest"]).parent / "fewer.csv"
    rows.iloc[1:].to_csv(other, index=False)
    moved = tmp_path / "model.ckpt"
    shutil.copy(trained_run["best_checkpoint"], moved)
    assert main(["evaluate", str(moved), "--data", str(other), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "cannot find the split this model was trained with" in err and "--splits" in err
    assert not (tmp_path / "r" / "metrics.json").exists()
    # --split all is for data the model never saw: allowed.
    assert main(["evaluate", str(moved), "--data", str(other), "--out", str(tmp_path / "all"), "--split", "all",
                 "--bootstrap", "0"]) == 0


def test_model_without_recorded_split_needs_its_splits_file(trained_run, tmp_path, capsys):
    import shutil

    old = _with_card(Path(shutil.copy(trained_run["best_checkpoint"], tmp_path / "old.ckpt")), split=None)
    base = ["--data", trained_run["manifest"], "--bootstrap", "0"]
    assert main(["evaluate", str(old), "--out", str(tmp_path / "r"), *base]) == 2
    assert "does not record its training split" in capsys.readouterr().err
    splits = str(Path(trained_run["run_dir"]) / "splits.csv")
    assert main(["evaluate", str(old), "--out", str(tmp_path / "r"), "--splits", splits, *base]) == 0
    assert set(pd.read_csv(tmp_path / "r" / "predictions.csv")["path"]) == _test_paths(trained_run["run_dir"])
    # A splits file that is not the model's own split is refused when the card knows its split.
    wrong = pd.read_csv(splits)
    wrong["split"] = wrong["split"].map({"train": "test", "test": "train", "valid": "valid"})
    wrong.to_csv(tmp_path / "wrong.csv", index=False)
    assert main(["evaluate", trained_run["best_checkpoint"], "--out", str(tmp_path / "w"), "--splits",
                 str(tmp_path / "wrong.csv"), *base]) == 2
    assert "not the one the model was trained with" in capsys.readouterr().err


def test_evaluate_out_is_checked_before_the_work(good_ckpt, tmp_path, capsys):
    manifest = make_manifest(tmp_path / "d", n=6)
    (tmp_path / "results").write_text("an existing file")
    rc, _, err = run_main(capsys, "evaluate", good_ckpt, "--data", manifest, "--out", tmp_path / "results",
                          "--cache", tmp_path / "cache")
    assert rc == 2 and f"--out {tmp_path / 'results'}: exists and is not a folder" in err
    assert not (tmp_path / "cache").exists()  # refused before preprocessing anything
