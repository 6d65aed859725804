"""A CSV logger that keeps a run's ``metrics.csv`` across ``--resume``.

Lightning's CSVLogger starts every fit with a fresh metrics.csv (its writer deletes the old file), and
offers no option to append. This is a logger written against Lightning's public ``Logger`` interface
instead: the same file format (one row per logging call, columns sorted, ``step`` included, empty cells
for metrics not logged in that call), but an existing file is continued. When new columns appear, the
file is rewritten once under the union of old and new columns, atomically, so a killed run never leaves
half a file.
"""
from __future__ import annotations

import csv
import os
from argparse import Namespace
from typing import Any

from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from ..atomic import atomic_write

METRICS_FILE = "metrics.csv"
HPARAMS_FILE = "hparams.yaml"


class ResumableCSVLogger(Logger):
    """Writes ``metrics.csv`` and ``hparams.yaml`` into ``save_dir/name/version`` (both may be empty)."""

    def __init__(self, save_dir: str | os.PathLike, name: str = "", version: str | int = "",
                 flush_logs_every_n_steps: int = 100) -> None:
        super().__init__()
        self._save_dir = os.fspath(save_dir)
        self._name = name or ""
        self._version = version
        self._flush_every = max(1, int(flush_logs_every_n_steps))
        self._pending: list[dict[str, Any]] = []
        self._columns: list[str] | None = None  # header of the file on disk, read on first save

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str | int:
        return self._version

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def log_dir(self) -> str:
        return os.path.join(self._save_dir, self._name, str(self._version))

    @property
    def metrics_file_path(self) -> str:
        return os.path.join(self.log_dir, METRICS_FILE)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        save_hparams_to_yaml(os.path.join(self.log_dir, HPARAMS_FILE), params)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        row["step"] = len(self._pending) if step is None else step
        self._pending.append(row)
        if (row["step"] + 1) % self._flush_every == 0:
            self.save()

    @rank_zero_only
    def save(self) -> None:
        if not self._pending:
            return
        path = self.metrics_file_path
        if self._columns is None:
            self._columns = _header(path)
        added = set().union(*self._pending) - set(self._columns)
        if added:
            columns = sorted(set(self._columns) | added)
            if os.path.isfile(path):  # rewrite the rows so far under the wider header
                with open(path, newline="") as f:
                    old_rows = list(csv.DictReader(f))
                with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=columns)
                    writer.writeheader()
                    writer.writerows(old_rows)
            self._columns = columns
        os.makedirs(self.log_dir, exist_ok=True)
        new_file = not os.path.isfile(path)
        with open(path, "a+", newline="") as f:
            if not new_file and f.tell() and not _ends_with_newline(f):
                f.write("\n")  # a run killed mid-write left half a line: start the next row on its own
            writer = csv.DictWriter(f, fieldnames=self._columns)
            if new_file:
                writer.writeheader()
            writer.writerows(self._pending)
        self._pending = []

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


def _header(path: str) -> list[str]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return next(csv.reader(f), [])  # the file's own column order


def _ends_with_newline(f) -> bool:
    f.seek(f.tell() - 1)
    last = f.read(1)
    f.seek(0, os.SEEK_END)
    return last in ("\n", "\r")
