"""``bonexray train``: config -> data -> Lightning Trainer -> run directory."""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import random
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from ..atomic import atomic_write_text
from ..errors import BonexrayError, DatasetError

DEFAULTS = dict(
    data=None, cache=None, limit=None, valid_frac=0.15, test_frac=0.15, workers=None,
    recipe=None, backbone="resnet50", pretrained="imagenet", weights=None, image_size=224, dropout=0.0,
    epochs=10, batch_size=32, lr=3e-4, weight_decay=1e-4, warmup_epochs=1.0, body_part_weight=1.0, localization_weight=0.0, patience=5, monitor="valid_loss",
    threshold_method="youden", target_sensitivity=0.9, seed=0, split_seed=0,
    out=None, resume=False, accelerator="auto", devices="auto", num_nodes=1, strategy="auto", precision=None,
    max_steps=None, quiet=False,
)


@dataclass
class TrainConfig:
    values: dict[str, Any] = field(default_factory=lambda: dict(DEFAULTS))

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError as e:
            raise AttributeError(name) from e

    @staticmethod
    def load_recipe(name: str) -> dict:
        """A recipe is a YAML file: a shipped name (``fracatlas``, ``mura``) or a path."""
        path = Path(name)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            text = path.read_text()
        else:
            try:
                text = resources.files("bonexray.recipes").joinpath(f"{name}.yaml").read_text()
            except FileNotFoundError as e:
                shipped = sorted(p.name[:-5] for p in resources.files("bonexray.recipes").iterdir() if p.name.endswith(".yaml"))
                raise BonexrayError(f"unknown recipe {name!r}; shipped recipes: {', '.join(shipped)}, or pass a .yaml file") from e
        data = yaml.safe_load(text) or {}
        unknown = set(data) - set(DEFAULTS) - {"description"}
        if unknown:
            raise BonexrayError(f"recipe {name}: unknown keys {', '.join(sorted(unknown))}")
        data.pop("description", None)
        return data

    @classmethod
    def from_args(cls, args: argparse.Namespace | dict) -> "TrainConfig":
        given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        values = dict(DEFAULTS)
        if given.get("recipe"):
            values.update(cls.load_recipe(given["recipe"]))
        for k, v in given.items():
            if k in DEFAULTS and v is not None and not (k in ("resume", "quiet") and v is False):
                values[k] = v
        cfg = cls(values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        v = self.values
        for k in ("epochs", "batch_size", "image_size"):
            if int(v[k]) < 1:
                raise BonexrayError(f"--{k.replace('_', '-')} must be >= 1 (got {v[k]})")
        if v["image_size"] < 32:
            raise BonexrayError("--image-size must be at least 32")
        if not 0 < v["valid_frac"] < 1 or not 0 <= v["test_frac"] < 1 or v["valid_frac"] + v["test_frac"] >= 1:
            raise BonexrayError("--valid-frac and --test-frac must be fractions summing to less than 1")

    def to_dict(self) -> dict:
        return dict(self.values)


def resolve_data(data: str | None, progress: bool = True) -> str:
    """Explicit --data, else ./data/MURA-v1.1, else FracAtlas (downloaded into the user's cache on first use)."""
    if data:
        return data
    local_mura = Path("data/MURA-v1.1")
    if local_mura.is_dir():
        return str(local_mura)
    from ..data.download import FRACATLAS_URL, default_data_home, download_fracatlas

    home = default_data_home()
    print(f"no --data and no ./data/MURA-v1.1: using the open FracAtlas dataset in {home}", file=sys.stderr)
    try:
        return str(download_fracatlas(home, progress=progress))
    except DatasetError as e:
        raise DatasetError(
            f"{e}\nTo train without a network: download {FRACATLAS_URL} (FracAtlas, figshare article 22363012), "
            f"unzip it into {home} (so that {home / 'FracAtlas' / 'dataset.csv'} exists) or anywhere and pass "
            "--data PATH/TO/FracAtlas; or put MURA at ./data/MURA-v1.1 (see `bonexray download mura`)."
        ) from None


def limit_records(recordset, n: int | None, seed: int):
    """Keep about ``n`` images, whole study groups at a time, chosen by the seed (no split leakage)."""
    if not n or n >= len(recordset.records):
        return recordset
    groups: dict[str, list] = {}
    for r in recordset.records:
        groups.setdefault(r.patient_id, []).append(r)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    kept: list = []
    for k in keys:
        if len(kept) >= n:
            break
        kept.extend(groups[k])
    kept_ids = {id(r) for r in kept}
    recordset.records = [r for r in recordset.records if id(r) in kept_ids]
    return recordset


def _quiet_known_warnings() -> None:
    """Lightning notices that are expected here and only confuse users."""
    import warnings

    for msg in (r".*exists and is not empty.*", r".*overridden `on_after_batch_transfer`.*", r".*LeafSpec.*is deprecated.*",
                r".*litlogger.*", r".*does not have many workers.*"):
        warnings.filterwarnings("ignore", message=msg)


def run_training(cfg: TrainConfig) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar

    from ..data.datasets import load_dataset
    from ..data.preprocess import build_cache, default_cache_dir
    from ..data.splits import check_no_leak, make_splits, write_splits
    from .checkpoint_io import AtomicCheckpointIO
    from .csv_logger import ResumableCSVLogger
    from .datamodule import BoneDataModule, split_datasets
    from .losses import abnormal_class_weights
    from .module import BoneXrayModule

    v = cfg.values
    _quiet_known_warnings()
    out = Path(v["out"] or f"runs/{_dt.datetime.now():%Y%m%d-%H%M%S}-{v['backbone']}")
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if v["resume"] and not last.is_file():
        raise BonexrayError(f"--resume: no checkpoint at {last}")
    if not v["resume"] and last.is_file():
        raise BonexrayError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    rank_zero = int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    progress = not v["quiet"]

    data = resolve_data(v["data"], progress=progress)
    L.seed_everything(v["seed"], workers=True, verbose=False)
    records = load_dataset(data)
    cache_dir = Path(v["cache"]) if v["cache"] else default_cache_dir(records.root, v["image_size"])
    cache, _ = build_cache(records, cache_dir, size=v["image_size"], progress=progress and rank_zero)
    records = limit_records(records, v["limit"], v["split_seed"])
    records = make_splits(records, v["valid_frac"], v["test_frac"], seed=v["split_seed"])
    check_no_leak(records)
    body_parts = records.body_parts
    with_boxes = float(v["localization_weight"] or 0) > 0
    if with_boxes and not any(r.extras.get("boxes") for r in records if r.split == "train"):
        raise DatasetError(f"{data}: --localization-weight needs fracture boxes in the training images "
                           f"(FracAtlas ships them in Annotations/COCO JSON); this dataset has none")
    datasets = split_datasets(cache, records, body_parts, with_boxes=with_boxes)
    for split in ("train", "valid"):
        if split not in datasets:
            raise DatasetError(f"{data}: no usable {split} images after splitting; use more data (--limit) or check the dataset")
    train_ds = datasets["train"]
    class_weights = abnormal_class_weights(body_parts, [body_parts[i] for i in train_ds.parts], train_ds.abnormal.tolist())

    out.mkdir(parents=True, exist_ok=True)
    if rank_zero:
        resolved = {**cfg.to_dict(), "data": str(data), "cache": str(cache_dir), "out": str(out),
                    "body_parts": body_parts, "class_weights": class_weights, "source": records.source,
                    "n_images": {s: len(d) for s, d in datasets.items()}, "bonexray_version": __version__,
                    "command": " ".join(sys.argv)}
        atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        write_splits(records, out / "splits.csv")

    on_gpu = torch.cuda.is_available() and v["accelerator"] in ("auto", "gpu", "cuda")
    if not on_gpu:
        from .allocator import keep_freed_memory

        keep_freed_memory()  # ~1.3x faster CPU steps here (bench/cpu_allocator.py)
    precision = v["precision"] or ("16-mixed" if on_gpu else "32-true")
    # Items are memmap slices (no decoding), so on CPU extra loader processes only steal cores.
    workers = v["workers"] if v["workers"] is not None else (min(4, os.cpu_count() or 1) if on_gpu else 0)
    module = BoneXrayModule(
        backbone=v["backbone"], body_parts=body_parts, class_weights=class_weights, image_size=v["image_size"],
        pretrained=None if v["pretrained"] == "none" else v["pretrained"], weights=v["weights"], dropout=v["dropout"],
        lr=v["lr"], weight_decay=v["weight_decay"], warmup_epochs=v["warmup_epochs"],
        body_part_weight=v["body_part_weight"], localization_weight=float(v["localization_weight"] or 0),
        threshold_method=v["threshold_method"], target_sensitivity=v["target_sensitivity"],
    )
    if on_gpu:
        module = module.to(memory_format=torch.channels_last)
    dm = BoneDataModule(datasets, batch_size=v["batch_size"], workers=workers)
    mode = "max" if v["monitor"] == "valid_auroc" else "min"
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=v["monitor"], mode=mode, save_top_k=1,
                        enable_version_counter=False, auto_insert_metric_name=False),
        # A separate unmonitored checkpoint rewritten every epoch: the resume point.
        ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1,
                        enable_version_counter=False, auto_insert_metric_name=False),
        EarlyStopping(monitor=v["monitor"], mode=mode, patience=v["patience"]),
    ]
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    devices = v["devices"]
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    trainer = L.Trainer(
        default_root_dir=str(out), max_epochs=v["epochs"], max_steps=v["max_steps"] or -1,
        accelerator=v["accelerator"], devices=devices, num_nodes=v["num_nodes"], strategy=v["strategy"],
        precision=precision, callbacks=callbacks,
        # Flush every step: a killed run keeps the metrics of the epochs its checkpoints hold.
        logger=ResumableCSVLogger(save_dir=str(out), name="", version="", flush_logs_every_n_steps=1),
        plugins=[AtomicCheckpointIO()], deterministic=not on_gpu, enable_progress_bar=progress,
        enable_model_summary=False, log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if v["resume"] else None)
    best = callbacks[0].best_model_path
    return {
        "run_dir": str(out),
        "best_checkpoint": best,
        "last_checkpoint": str(last),
        "epochs_run": trainer.current_epoch,
        f"best_{v['monitor']}": float(callbacks[0].best_model_score) if callbacks[0].best_model_score is not None else None,
        "threshold": module.threshold,
        "body_parts": body_parts,
    }
