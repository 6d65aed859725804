"""Training's default precision follows the CPU (bf16 where it is native), and --resume keeps a run's own."""
from pathlib import Path

import yaml

from bonexray import hardware
from bonexray.training.train import _resumed_precision


def test_default_precision_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert hardware.default_training_precision(on_gpu=False) == "bf16-mixed"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "amx_bf16", "amx_tile"})
    assert hardware.default_training_precision(on_gpu=False) == "bf16-mixed"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_vnni"})
    assert hardware.default_training_precision(on_gpu=False) == "32-true"
    assert hardware.default_training_precision(on_gpu=True) == "16-mixed"


def test_resume_keeps_the_precision_the_run_trained_in(tmp_path):
    saved = tmp_path / "config.yaml"
    assert _resumed_precision(saved, on_gpu=False) is None  # no run files: the default applies
    saved.write_text(yaml.safe_dump({"epochs": 2, "precision": None, "precision_used": "32-true"}))
    assert _resumed_precision(saved, on_gpu=False) == "32-true"
    # A run from before precision_used was recorded trained in that version's default: fp32 on CPU.
    saved.write_text(yaml.safe_dump({"epochs": 2, "precision": None}))
    assert _resumed_precision(saved, on_gpu=False) == "32-true"
    assert _resumed_precision(saved, on_gpu=True) == "16-mixed"
    saved.write_text(yaml.safe_dump({"epochs": 2, "precision": "bf16-mixed"}))
    assert _resumed_precision(saved, on_gpu=False) == "bf16-mixed"


def test_a_run_records_the_precision_it_trained_in(trained_run):
    config = yaml.safe_load((Path(trained_run["run_dir"]) / "config.yaml").read_text())
    assert config["precision_used"] == hardware.default_training_precision(on_gpu=False)
