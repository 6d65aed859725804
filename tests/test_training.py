import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning  # noqa: F401 - imported here, not first inside a test: its log handler keeps the stderr it finds
import pytest
import torch
from PIL import Image

from bonexray.cli import main
from bonexray.errors import BonexrayError
from bonexray.model.checkpoint import load_model
from bonexray.training.losses import abnormal_class_weights, multitask_loss
from bonexray.training.train import TrainConfig, run_training

from builders import make_manifest, nonblank_lines, radiograph_like, run_main
from conftest import cli_argv, requires_shared_data, tiny_train_args


def test_class_weights_follow_the_mura_paper():
    parts = ["hand", "leg"]
    rec_parts = ["hand"] * 4 + ["leg"] * 3
    labels = [1, 0, 0, 0, 1, 1, 0]
    w = abnormal_class_weights(parts, rec_parts, labels)
    # hand: 1 abnormal of 4 -> w_normal = 1/4, w_abnormal = 3/4; leg: 2 of 3 -> 2/3, 1/3
    assert w[0] == pytest.approx([0.25, 0.75]) and w[1] == pytest.approx([2 / 3, 1 / 3])
    # A part with one class only falls back to the overall frequency (3 of 7 abnormal).
    w2 = abnormal_class_weights(["hand", "hip"], ["hand", "hip", "hip"], [1, 0, 0])
    assert w2[1] == pytest.approx([1 / 3, 2 / 3])


def test_multitask_loss_weights_by_true_body_part():
    cw = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    logit = torch.zeros(2)
    part_logits = torch.zeros(2, 2)
    total, abn, part = multitask_loss(logit, part_logits, torch.tensor([1, 0]), torch.tensor([0, 0]), cw, 1.0)
    bce = torch.log(torch.tensor(2.0))
    assert abn.item() == pytest.approx((2 * 0.75 * bce + 2 * 0.25 * bce).item() / 2)
    assert part.item() == pytest.approx(bce.item())
    assert total.item() == pytest.approx(abn.item() + part.item())


def test_recipes_and_validation():
    cfg = TrainConfig.from_args({"recipe": "fracatlas", "epochs": 3})
    assert cfg.backbone == "efficientnet_lite0" and cfg.epochs == 3 and cfg.monitor == "valid_auroc"
    assert TrainConfig.from_args({"recipe": "fracatlas", "monitor": "valid_loss"}).monitor == "valid_loss"
    assert TrainConfig.from_args({"recipe": "mura"}).backbone == "resnet50"
    with pytest.raises(BonexrayError, match="unknown recipe"):
        TrainConfig.from_args({"recipe": "nope"})
    with pytest.raises(BonexrayError, match="image-size"):
        TrainConfig.from_args({"image_size": 8})


def test_bad_recipe_files_are_one_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(BonexrayError, match="bad.yaml: not valid YAML"):
        TrainConfig.from_args({"recipe": str(bad)})
    bad.write_text("select: sometimes\n")
    with pytest.raises(BonexrayError, match="select must be one of best, last"):
        TrainConfig.from_args({"recipe": str(bad)})


def test_plain_train_takes_the_recipe_of_the_dataset():
    cfg = TrainConfig.from_args({"epochs": 3})
    assert cfg.recipe is None and cfg.monitor == "valid_auroc"
    fa = cfg.with_dataset_recipe("fracatlas")
    assert fa.recipe == "fracatlas" and fa.backbone == "efficientnet_lite0" and fa.select == "last"
    assert fa.epochs == 3  # a flag given explicitly still wins over the recipe
    assert cfg.with_dataset_recipe("manifest") is cfg  # no recipe for plain manifests: the defaults
    assert TrainConfig.from_args({"recipe": "baseline"}).with_dataset_recipe("fracatlas").recipe == "baseline"


def test_train_accounts_for_unreadable_images(tmp_path, capsys):
    import yaml

    manifest = make_manifest(tmp_path / "d", n=40, parts=("hand", "leg"))
    (tmp_path / "d" / "img003.png").write_bytes(b"not a png at all")
    args = tiny_train_args(manifest, tmp_path / "run", epochs=1, max_steps=1)
    assert main(["train", *cli_argv(args)]) == 0
    err = capsys.readouterr().err
    assert "1 unreadable image(s) skipped" in err and "img003.png" in err
    report = yaml.safe_load((tmp_path / "run" / "data_report.yaml").read_text())
    assert report["read_by_reader"] == 40 and report["unreadable"] == 1
    assert report["unreadable_images"][0]["path"].endswith("img003.png") and report["unreadable_images"][0]["reason"]
    # Past 5% unreadable, training stops with a clear message, unless told to go on.
    for i in (5, 7):
        (tmp_path / "d" / f"img{i:03d}.png").write_bytes(b"\x00" * 10)
    args = tiny_train_args(manifest, tmp_path / "run2", epochs=1, max_steps=1)
    assert main(["train", *cli_argv(args)]) == 2
    err = capsys.readouterr().err
    assert "3 of 40 images (8%) cannot be read" in err and "--allow-unreadable" in err and "Traceback" not in err
    assert main(["train", *cli_argv(args), "--allow-unreadable"]) == 0


def test_ema_is_validated_and_saved_once_it_has_started(tmp_path):
    manifest = make_manifest(tmp_path / "d", n=40, parts=("hand", "leg"))
    args = tiny_train_args(manifest, tmp_path / "run", epochs=3, ema_decay=0.5, select="last", schedule="onecycle",
                           class_weights="global")
    result = run_training(TrainConfig.from_args(args))
    best = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=True)
    # The final model is the average; the raw weights travel beside it for --resume.
    assert "current_model_state" in best and "averaging_state" in best
    key = next(k for k in best["state_dict"] if k.startswith("net.") and best["state_dict"][k].is_floating_point())
    assert not torch.equal(best["state_dict"][key], best["current_model_state"][key])
    load_model(result["best_checkpoint"])  # loads like any checkpoint
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    aurocs = [float(r["valid_auroc"]) for r in rows if r.get("valid_auroc")]
    assert len(aurocs) == 3
    import yaml

    weights = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["class_weights_by_part"]
    assert len(weights) == 2 and weights[0] == weights[1]  # --class-weights global: one pair for every part


def test_final_fit_on_train_and_valid_never_validates_and_evaluate_keeps_off_valid(tmp_path):
    import yaml

    from bonexray.evaluation.evaluate import run_evaluation

    manifest = make_manifest(tmp_path / "d", n=40, parts=("hand", "leg"))
    with pytest.raises(BonexrayError, match="--select last"):
        TrainConfig.from_args(tiny_train_args(manifest, tmp_path / "x", fit_on="train+valid", select="best"))
    args = tiny_train_args(manifest, tmp_path / "run", epochs=2, fit_on="train+valid", select="last", ema_decay=0.5,
                           schedule="onecycle")
    result = run_training(TrainConfig.from_args(args))
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    splits = list(csv.DictReader(open(tmp_path / "run" / "splits.csv")))
    n_train = sum(1 for r in splits if r["split"] == "train")
    n_valid = sum(1 for r in splits if r["split"] == "valid")
    assert n_valid > 0 and cfg["n_images"] == {"train": n_train + n_valid, "test": len(splits) - n_train - n_valid}
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert rows and not any(r.get("valid_auroc") or r.get("valid_loss") for r in rows)  # nothing validated
    card = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=True)["bonexray"]
    assert card["threshold"] == 0.5 and card["split"]["fit_on"] == "train+valid"
    with pytest.raises(BonexrayError, match="trained on the valid split"):
        run_evaluation(result["best_checkpoint"], str(manifest), split="valid", out=str(tmp_path / "ev"), progress=False)
    run_evaluation(result["best_checkpoint"], str(manifest), split="test", out=str(tmp_path / "et"), progress=False)
    assert "train+valid fit" in (tmp_path / "et" / "report.md").read_text()


def test_run_directory_contents(trained_run):
    run = Path(trained_run["run_dir"])
    for name in ("config.yaml", "metrics.csv", "splits.csv", "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    keys = set(rows[0])
    for k in ("epoch", "train_loss", "valid_loss", "train_acc_abnormal", "valid_acc_abnormal",
              "train_acc_body_part", "valid_acc_body_part", "valid_auroc"):
        assert k in keys
    assert {r["epoch"] for r in rows} == {"0", "1"}
    ckpt = torch.load(run / "checkpoints/best.ckpt", weights_only=True, map_location="cpu")
    card = ckpt["bonexray"]
    assert card["backbone"] == "efficientnet_lite0" and card["image_size"] == 64
    assert card["body_parts"] == ["hand", "leg", "shoulder"] and 0 < card["threshold"] < 1
    assert card["mean"] == [0.5, 0.5, 0.5] and card["version"]


def test_checkpoint_round_trip_identical_predictions(trained_run, tmp_path):
    from bonexray.data.preprocess import ImageCache
    from bonexray.training.module import BoneXrayModule

    ckpt = Path(trained_run["best_checkpoint"])
    net, card = load_model(ckpt)
    cache = ImageCache.open(Path(trained_run["run_dir"]).parent / "run-cache")
    x = torch.from_numpy(cache.images[:6].copy()).float().div(255)[:, None]
    raw = torch.load(ckpt, weights_only=True, map_location="cpu")
    module = BoneXrayModule(**{k: v for k, v in raw["hyper_parameters"].items()})
    module.load_state_dict(raw["state_dict"])
    module.eval()
    with torch.inference_mode():
        a1, p1 = net(x)
        a2, p2 = module(x)
    assert torch.equal(a1, a2) and torch.equal(p1, p2)


@pytest.mark.slow
def test_same_seed_same_metrics(tmp_path):
    manifest = make_manifest(tmp_path / "d", n=32, parts=("hand", "leg"))

    def run(name):
        run_training(TrainConfig.from_args(tiny_train_args(manifest, tmp_path / name, epochs=1, cache=str(tmp_path / "c"))))
        rows = list(csv.DictReader(open(tmp_path / name / "metrics.csv")))
        return [(r["valid_loss"], r["train_loss"]) for r in rows]

    assert run("a") == run("b")


def test_existing_run_needs_resume(trained_run):
    with pytest.raises(BonexrayError, match="--resume"):
        run_training(TrainConfig.from_args(tiny_train_args(trained_run["manifest"], trained_run["run_dir"])))


def _cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "bonexray.cli", "train", *args], env=env, **kw)


@pytest.mark.slow
def test_kill_mid_run_then_resume(tmp_path):
    manifest = make_manifest(tmp_path / "d", n=40, parts=("hand", "leg"))
    args = tiny_train_args(manifest, tmp_path / "run", epochs=5)
    proc = _cli(cli_argv(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    t0 = time.time()
    metrics = tmp_path / "run" / "metrics.csv"

    def epoch0_done():
        return last.exists() and metrics.exists() and "\n0," in metrics.read_text()

    # Kill in the middle of epoch 1, once epoch 0's checkpoint and metrics are on disk.
    while not epoch0_done() and proc.poll() is None and time.time() - t0 < 240:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert last.exists(), "training never wrote last.ckpt"
    first_epoch = torch.load(last, weights_only=True)["epoch"]
    assert first_epoch < 4, "the run finished before it could be interrupted"
    # No temp files left under the final names; the checkpoint loads.
    load_model(last)
    proc = _cli(cli_argv({**args, "resume": True}), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert torch.load(last, weights_only=True)["epoch"] == 4, out
    epochs = {r["epoch"] for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv")) if r["valid_loss"]}
    assert epochs == {"0", "1", "2", "3", "4"}


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path):
    manifest = make_manifest(tmp_path / "d", n=32, parts=("hand", "leg"))
    args = tiny_train_args(manifest, tmp_path / "run", epochs=1, accelerator="cpu", devices=2, strategy="ddp",
                           max_steps=3)
    proc = _cli(cli_argv(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "world_size=2" in out or "distributed_backend=gloo" in out
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_ddp_launched_by_torchrun_builds_the_cache_once(tmp_path):
    """All ranks start at once (torchrun); only local rank 0 builds the missing cache, every rank trains."""
    manifest = make_manifest(tmp_path / "d", n=32, parts=("hand", "leg"))
    args = tiny_train_args(manifest, tmp_path / "run", epochs=1, accelerator="cpu", devices=2, strategy="ddp",
                           max_steps=2)
    assert not Path(args["cache"]).exists()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "bonexray.cli", "train", *cli_argv(args)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.count("cached 32 images at 64 px") == 1, proc.stdout[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@requires_shared_data
def test_default_data_offline_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BONEXRAY_DATA", str(tmp_path / "home"))
    from bonexray.data import download

    def refuse(url, dest, progress=True, timeout=60.0):
        raise download.DatasetError(f"could not download {url}: offline")

    monkeypatch.setattr(download, "_fetch", refuse)
    with pytest.raises(BonexrayError, match="FracAtlas") as e:
        run_training(TrainConfig.from_args({"out": str(tmp_path / "r"), "quiet": True}))
    assert "--data" in str(e.value) and str(tmp_path / "home") in str(e.value)


# --------------------------------------------------------------------------- refused before training


def test_train_limit_below_one_is_refused(tmp_path, capsys):
    manifest = make_manifest(tmp_path / "data", n=6)
    rc, _, err = run_main(capsys, "train", "--data", manifest, "--out", tmp_path / "run", "--limit", 0)
    assert rc == 2 and "--limit 0: give a number of images >= 1" in err and len(nonblank_lines(err)) == 1


def test_training_data_with_one_label_is_refused_before_training(tmp_path, capsys):
    from conftest import tiny_train_args

    base = tmp_path / "data"
    base.mkdir()
    with open(base / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "body_part", "abnormal", "study_id"])
        for i in range(16):
            Image.fromarray(radiograph_like(i)).save(base / f"i{i}.png")
            w.writerow([f"i{i}.png", ("hand", "wrist")[i % 2], 0, f"s{i}"])
    args = tiny_train_args(base / "manifest.csv", tmp_path / "run")
    rc, _, err = run_main(capsys, "train", "--data", args["data"], "--out", args["out"], "--cache", args["cache"],
                          "--pretrained", "none", "--image-size", 64, "--epochs", 1, "--quiet")
    assert rc == 2 and "the training images are all normal" in err and len(nonblank_lines(err)) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()
