"""train --resume continues a run with its own configuration: contradicting flags are refused in one
line and the run folder stays byte-for-byte as it was; an interrupt (Ctrl-C) or a full disk leaves a
run that --resume finishes."""
from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from builders import make_manifest
from conftest import cli_argv as argv, tiny_train_args

from bonexray.cli import main
from bonexray.errors import BonexrayError, CheckpointError
from bonexray.model.checkpoint import load_model
from bonexray.training.config import TrainConfig, default_micro_batch
from bonexray.training.train import _resumed_config, run_training

SRC = str(Path(__file__).resolve().parents[1] / "src")


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch run at 64 px with micro-batches of 4 (batch 8)."""
    base = tmp_path_factory.mktemp("resume")
    manifest = make_manifest(base / "d", n=24, parts=("hand", "leg"))
    args = tiny_train_args(manifest, base / "run", epochs=1, max_steps=2, micro_batch=4)
    run_training(TrainConfig.from_args(args))
    return args


def test_a_run_records_its_micro_batch_and_accumulation(finished_run):
    saved = yaml.safe_load((Path(finished_run["out"]) / "config.yaml").read_text())
    assert saved["batch_size"] == 8 and saved["micro_batch_used"] == 4 and saved["accumulate_grad_batches"] == 2
    # max_steps counts optimiser steps: two steps of 8 images are four forward passes of 4
    assert torch.load(Path(finished_run["out"]) / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.parametrize("flag, value, saved", [("--image-size", "96", "64"), ("--backbone", "efficientnet_lite1",
                                                                                  "efficientnet_lite0"),
                                                ("--micro-batch", "8", "4"), ("--epochs", "3", "1")])
def test_resume_with_a_contradicting_flag_is_refused_and_leaves_the_run_alone(finished_run, capsys, flag, value, saved):
    run_dir = Path(finished_run["out"])
    before = snapshot(run_dir)
    rc = main(["train", *argv({**finished_run, "resume": True}), flag, value])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert f"{flag} {value} (the run has {saved})" in lines[0] and str(run_dir) in lines[0]
    assert snapshot(run_dir) == before


def test_resume_names_every_contradicting_flag_at_once(finished_run, capsys):
    rc = main(["train", *argv({**finished_run, "resume": True}), "--image-size", "96", "--backbone", "resnet18"])
    err = capsys.readouterr().err
    assert rc == 2 and "--image-size 96 (the run has 64)" in err and "--backbone resnet18 (the run has" in err


def test_resume_without_flags_continues_with_the_runs_own_settings(finished_run):
    """--resume --out RUN alone: the run's image size, backbone, batch and micro-batch, not the defaults."""
    cfg = _resumed_config(TrainConfig.from_args({"out": finished_run["out"], "resume": True, "workers": 0}),
                          Path(finished_run["out"]) / "config.yaml")
    assert (cfg.image_size, cfg.backbone, cfg.batch_size, cfg.micro_batch) == (64, "efficientnet_lite0", 8, 4)
    assert cfg.pretrained == "none" and cfg.workers == 0 and cfg.resume


def test_micro_batch_is_automatic_only_where_fp32_trains_on_cpu():
    assert default_micro_batch(32, "32-true", on_gpu=False) == 16
    assert default_micro_batch(24, "32-true", on_gpu=False) == 12
    assert default_micro_batch(8, "32-true", on_gpu=False) == 8
    assert default_micro_batch(32, "bf16-mixed", on_gpu=False) == 32
    assert default_micro_batch(32, "16-mixed", on_gpu=True) == 32
    with pytest.raises(Exception, match="--micro-batch 5: give a divisor of --batch-size 8"):
        TrainConfig.from_args({"batch_size": 8, "micro_batch": 5})


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_ctrl_c_mid_epoch_then_resume_finishes_the_run(tmp_path):
    manifest = make_manifest(tmp_path / "d", n=40, parts=("hand", "leg"))
    args = tiny_train_args(manifest, tmp_path / "run", epochs=4)
    cmd = [sys.executable, "-c", "import sys; from bonexray.cli import main; sys.exit(main(sys.argv[1:]))",
           "train", *argv(args)]
    # Its own process group, as a terminal's Ctrl-C reaches every process of the foreground job.
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    metrics = tmp_path / "run" / "metrics.csv"
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 300:
        if last.exists() and metrics.exists() and "\n0," in metrics.read_text():
            break
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 1
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert "Traceback" not in out, out
    assert proc.returncode == 130 and "interrupted" in out and "--resume" in out, out
    assert torch.load(last, weights_only=True)["epoch"] < 3, "the run ended before the interrupt"
    load_model(last)  # the interrupted run's checkpoint is whole
    assert not list(last.parent.glob(".*.tmp")), "temp files left behind"
    done = subprocess.run([*cmd, "--resume"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout
    assert torch.load(last, weights_only=True)["epoch"] == 3
    load_model(tmp_path / "run" / "checkpoints" / "best.ckpt")
    epochs = {r["epoch"] for r in csv.DictReader(open(metrics)) if r["valid_loss"]}
    assert epochs == {"0", "1", "2", "3"}


def test_full_disk_during_training_is_one_line_and_resumable(tmp_path, capsys, monkeypatch):
    """ENOSPC while a checkpoint is written (simulated in the writer): one line, the earlier checkpoint
    stays whole, and --resume continues once there is room."""
    import bonexray.training.checkpoint_io as checkpoint_io

    manifest = make_manifest(tmp_path / "d", n=24, parts=("hand", "leg"))
    args = tiny_train_args(manifest, tmp_path / "run", epochs=3)
    real_save, calls = torch.save, []

    def save_until_full(obj, f, *a, **k):
        calls.append(f)
        if len(calls) > 2:  # epoch 0's best and last are written, then the disk is full
            with open(f, "wb") as half:
                half.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint_io.torch, "save", save_until_full)
    rc = main(["train", *argv(args)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("bonexray train: error")]
    assert rc == 2 and len(lines) == 1 and "No space left" in lines[0] and "--resume" in lines[0], err
    assert "Traceback" not in err
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    stopped_after = torch.load(last, weights_only=True)["epoch"]
    assert stopped_after < 2 and f"after epoch {stopped_after}" in lines[0]  # the last whole checkpoint
    load_model(last)
    assert not list(last.parent.glob(".*.tmp"))
    monkeypatch.setattr(checkpoint_io.torch, "save", real_save)
    assert main(["train", *argv({**args, "resume": True})]) == 0
    assert torch.load(last, weights_only=True)["epoch"] == 2


# --------------------------------------------------------------------------- what --resume reads


def test_resume_checks_integrity_and_refuses_pickled_objects(good_ckpt, tmp_path):
    import zipfile

    from bonexray.training.checkpoint_io import AtomicCheckpointIO

    io_ = AtomicCheckpointIO()
    assert "state_dict" in io_.load_checkpoint(good_ckpt)
    flipped = tmp_path / "flipped.ckpt"
    data = bytearray(good_ckpt.read_bytes())
    with zipfile.ZipFile(good_ckpt) as zf:
        big = max(zf.infolist(), key=lambda i: i.file_size)
    at = big.header_offset + 200
    data[at : at + 4096] = bytes(b ^ 0xFF for b in data[at : at + 4096])  # 4 KB flipped
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        io_.load_checkpoint(flipped)

    class Obj:
        def __reduce__(self):
            return (print, ("ran",))

    ckpt = torch.load(good_ckpt, weights_only=True)
    ckpt["extra"] = Obj()
    torch.save(ckpt, tmp_path / "objects.ckpt")
    with pytest.raises(CheckpointError) as info:
        io_.load_checkpoint(tmp_path / "objects.ckpt")
    assert "holds Python objects" in str(info.value) and "weights_only" not in str(info.value)


def test_resume_with_other_epochs_is_refused_before_training(tmp_path, capsys):
    import yaml

    from bonexray.training.config import TrainConfig
    from bonexray.training.train import _check_resume_plan

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = TrainConfig.from_args({"data": "x", "epochs": 1, "schedule": "onecycle"}).to_dict()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    _check_resume_plan(TrainConfig.from_args({"data": "x", "epochs": 1, "schedule": "onecycle"}), run_dir / "config.yaml")
    with pytest.raises(BonexrayError, match=r"--epochs 2 \(the run has 1\)"):
        _check_resume_plan(TrainConfig.from_args({"data": "x", "epochs": 2, "schedule": "onecycle"}),
                           run_dir / "config.yaml")
