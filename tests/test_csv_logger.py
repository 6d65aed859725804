"""ResumableCSVLogger: Lightning's metrics.csv format, continued across --resume instead of deleted."""
from __future__ import annotations

import csv

import pandas as pd

from bonexray.training.csv_logger import ResumableCSVLogger


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resumed_logger_appends_and_widens_the_header(tmp_path):
    first = ResumableCSVLogger(tmp_path, flush_logs_every_n_steps=1)
    first.log_metrics({"train_loss": 0.9, "epoch": 0}, step=0)
    first.log_metrics({"train_loss": 0.8, "epoch": 0}, step=1)
    first.log_hyperparams({"lr": 0.001})
    assert [r["train_loss"] for r in _rows(tmp_path / "metrics.csv")] == ["0.9", "0.8"]
    assert (tmp_path / "hparams.yaml").is_file()

    # A second logger on the same folder (what --resume builds) keeps the rows and adds a column.
    second = ResumableCSVLogger(tmp_path, flush_logs_every_n_steps=1)
    second.log_metrics({"train_loss": 0.7, "epoch": 1}, step=2)
    second.log_metrics({"valid_auroc": 0.75, "epoch": 1}, step=2)
    second.finalize("success")
    rows = _rows(tmp_path / "metrics.csv")
    assert list(rows[0]) == ["epoch", "step", "train_loss", "valid_auroc"]
    assert [r["step"] for r in rows] == ["0", "1", "2", "2"]
    assert [r["valid_auroc"] for r in rows] == ["", "", "", "0.75"]
    assert not list(tmp_path.glob(".metrics.csv.*"))  # no temp file left behind


def test_half_written_last_line_does_not_swallow_the_next_row(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,step,train_loss\n0,0,0.9\n0,1,0.")  # killed mid-write
    logger = ResumableCSVLogger(tmp_path, flush_logs_every_n_steps=1)
    logger.log_metrics({"train_loss": 0.5, "epoch": 1}, step=2)
    df = pd.read_csv(tmp_path / "metrics.csv")
    assert df["step"].tolist() == [0, 1, 2] and df["train_loss"].iloc[-1] == 0.5
