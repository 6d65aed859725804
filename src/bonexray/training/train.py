"""``bonexray train``: config -> records and split -> DataModule + LightningModule + Trainer -> run directory."""
from __future__ import annotations

import datetime as _dt
import os
import sys
from pathlib import Path

import yaml

from .._version import __version__
from ..atomic import atomic_write_text
from ..errors import BonexrayError, DatasetError
from ..output_folder import claim_folder
from .config import TrainConfig, default_micro_batch

__all__ = ["TrainConfig", "run_training", "resolve_data"]

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


def _quiet_known_warnings() -> None:
    """Lightning notices that are expected here and only confuse users."""
    import warnings

    for msg in (r".*exists and is not empty.*", r".*overridden `on_after_batch_transfer`.*", r".*LeafSpec.*is deprecated.*",
                r".*litlogger.*", r".*does not have many workers.*",
                r".*Total length of .list. across ranks is zero.*"):  # --fit-on train+valid: no valid loader, by design
        warnings.filterwarnings("ignore", message=msg)


def _run_files_callback(cfg: TrainConfig, out: Path, records, dm):
    """Writes config.yaml, splits.csv and data_report.yaml once the data is set up (rank zero only)."""
    import lightning as L

    from ..data.splits import write_splits

    class RunFiles(L.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            if not trainer.is_global_zero:
                return
            out.mkdir(parents=True, exist_ok=True)
            resolved = {**cfg.to_dict(), "data": str(records.root), "cache": str(dm.cache_dir), "out": str(out),
                        "body_parts": dm.body_parts, "class_weights_by_part": dm.class_weights, "source": records.source,
                        "n_images": {s: len(d) for s, d in dm.datasets.items()}, "split": pl_module.hparams.split,
                        "precision_used": str(trainer.precision), "micro_batch_used": int(dm.batch_size),
                        "accumulate_grad_batches": int(trainer.accumulate_grad_batches), "bonexray_version": __version__,
                        "command": " ".join(sys.argv)}
            atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
            atomic_write_text(out / "data_report.yaml", yaml.safe_dump(dm.report, sort_keys=False))
            write_splits(records, out / "splits.csv")
            _print_data_report(dm.report, out / "data_report.yaml")

    return RunFiles()


def _print_data_report(rep: dict, where: Path) -> None:
    by = rep["by_split"]
    lines = [f"data: {rep['read_by_reader']} images read"
             + (f", {rep['left_out_by_limit']} left out by --limit" if rep["left_out_by_limit"] else "")
             + f"; train {by['train']}, valid {by['valid']}, test {by['test']}"
             + (f", outside the split {by['none']}" if by["none"] else "")]
    if rep["unreadable"]:
        lines.append(f"  {rep['unreadable']} unreadable image(s) skipped, e.g. "
                     + "; ".join(f"{u['path']}: {u['reason']}" for u in rep["unreadable_images"][:3]))
    if rep["truncated_but_used"]:
        lines.append(f"  {rep['truncated_but_used']} truncated image(s) used as decoded")
    if rep["unlabelled"]:
        lines.append(f"  {rep['unlabelled']} image(s) without a 0/1 label skipped")
    if rep["reader_problems"]:
        lines.append(f"  {len(rep['reader_problems'])} problem(s) reading the dataset, e.g. " + "; ".join(rep["reader_problems"][:3]))
    lines.append(f"  all of it in {where}")
    print("\n".join(lines), file=sys.stderr)


#: Flags that may differ on --resume: how the run is watched or fed, not what it trains.
RESUME_FREE = ("quiet", "workers", "cache", "resume", "out", "overwrite", "allow_unreadable")

#: Flags compared with what the run recorded it used (config.yaml's ``*_used`` keys), not with the flag it was given.
_RECORDED_AS = {"precision": "precision_used", "micro_batch": "micro_batch_used"}
_PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}


def _saved_config(saved: Path) -> dict:
    try:
        before = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}  # a run killed before it wrote config.yaml: nothing to compare with
    return before if isinstance(before, dict) else {}


def _same(key: str, now, before) -> bool:
    if key == "data":
        return os.path.realpath(str(now)) == os.path.realpath(str(before))
    if key == "precision":
        now, before = (_PRECISION_ALIASES.get(str(v), str(v)) for v in (now, before))
    return now == before or str(now) == str(before)


def _resume_conflicts(cfg: TrainConfig, before: dict) -> list[str]:
    """The explicitly given flags that contradict the run's config.yaml, as ``--flag NOW (the run has BEFORE)``."""
    out = []
    for key, now in cfg.given.items():
        if key in RESUME_FREE:
            continue
        recorded = _RECORDED_AS.get(key, key)
        if recorded in before and before[recorded] is not None and not _same(key, now, before[recorded]):
            out.append(f"--{key.replace('_', '-')} {now} (the run has {before[recorded]})")
    return out


def _check_resume_plan(cfg: TrainConfig, saved: Path) -> None:
    """Refuse, before anything is read or written, a --resume whose flags contradict the run's config.yaml."""
    conflicts = _resume_conflicts(cfg, _saved_config(saved))
    if conflicts:
        raise BonexrayError(f"--resume continues {saved.parent} with its own config.yaml, but {'; '.join(conflicts)}; "
                            "leave those flags out (the run's values are kept) or start a new run with another --out")


def _resumed_config(cfg: TrainConfig, saved: Path) -> TrainConfig:
    """The run's own configuration (config.yaml) with the flags that may change on --resume (RESUME_FREE) or
    that agree with it; refused when a flag contradicts it. Without a config.yaml, ``cfg`` as given."""
    _check_resume_plan(cfg, saved)
    before = _saved_config(saved)
    if not before:
        return cfg
    names = set(TrainConfig.field_names())
    values = {k: v for k, v in before.items() if k in names}
    # An automatic choice is kept too, like the precision; runs from before micro-batches used the whole batch.
    values["micro_batch"] = before.get("micro_batch_used") or values.get("batch_size")
    values.update({k: v for k, v in cfg.given.items() if k in RESUME_FREE})
    values.update(resume=True, out=cfg.out)
    if "data" in cfg.given:
        values["data"] = cfg.given["data"]
    resumed = TrainConfig(**values, given=dict(cfg.given))
    resumed.validate()
    return resumed


def _resumed_precision(saved: Path, on_gpu: bool) -> str | None:
    """The precision a resumed run trained in (runs from before ``precision_used`` was recorded trained in
    the then default, fp32 on CPU), so that --resume does not switch it mid-run."""
    try:
        before = yaml.safe_load(saved.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    if not before:
        return None
    return before.get("precision_used") or before.get("precision") or ("16-mixed" if on_gpu else "32-true")


def _check_both_labels(records, cfg: TrainConfig, data) -> None:
    """Refuse, before an epoch is spent, training data whose images are all normal or all abnormal."""
    fit = ("train", "valid") if cfg.fit_on == "train+valid" else ("train",)
    labels = {r.abnormal for r in records if r.split in fit and r.abnormal in (0, 1)}
    if len(labels) < 2:
        which = "abnormal" if labels == {1} else "normal" if labels == {0} else "labelled"
        raise DatasetError(f"{data}: the training images are all {which}; the abnormality head needs both normal and "
                           "abnormal images to learn (check the labels, --limit or the split)")


#: What a run directory holds (the output guard checks these names).
TRAIN_FILES = ("config.yaml", "data_report.yaml", "splits.csv", "metrics.csv", "hparams.yaml",
               "checkpoints/last.ckpt", "checkpoints/best.ckpt")


def _is_run_folder(folder: Path) -> bool:
    """A run directory from before the output marker existed."""
    return (folder / "checkpoints" / "last.ckpt").is_file() or "bonexray_version" in _saved_config(folder / "config.yaml")


def _first_process() -> bool:
    """Not one of the further processes of a run across processes (torchrun, srun, Lightning's own launcher)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def split_info(records, cfg: TrainConfig) -> dict:
    """What travels in the model card so that evaluate can find (or refuse) the training split."""
    from ..data.splits import split_counts, split_fingerprint

    return {"source": records.source, "data": Path(records.root).name, "seed": cfg.split_seed,
            "valid_frac": cfg.valid_frac, "test_frac": cfg.test_frac, "limit": cfg.limit,
            "fingerprint": split_fingerprint(records), "counts": split_counts(records),
            # Which splits the weights saw: with "train+valid" the valid split is training data too.
            "fit_on": cfg.fit_on}


def _resume_point(last: Path) -> str:
    """Where --resume would continue: the epoch the last whole checkpoint ends."""
    if not last.is_file():
        return "no checkpoint was written yet: start the run again"
    try:
        import torch

        epoch = int(torch.load(last, map_location="cpu", weights_only=True).get("epoch", -1))
    except Exception:  # noqa: BLE001 - a damaged file: --resume names the problem itself
        return f"continue with --resume from {last}"
    return f"continue with --resume (from {last}, after epoch {epoch})"


def _fit(trainer, module, dm, last: Path, resume: bool) -> None:
    """trainer.fit, with an interrupt or a failed write (full disk, read-only folder) told in one line
    that says how to continue. Checkpoints are written whole or not at all (atomic_write), so the
    last one on disk is always a sound resume point."""
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume else None)
    except SystemExit as err:  # Lightning turns Ctrl-C into a graceful stop and sys.exit(1)
        if not trainer.interrupted:
            raise
        raise TrainingInterrupted(_resume_point(last)) from err
    except KeyboardInterrupt as err:
        raise TrainingInterrupted(_resume_point(last)) from err
    except OSError as err:
        where = f" {err.filename}" if getattr(err, "filename", None) else ""
        raise BonexrayError(f"cannot write the run:{where} {err.strerror or err}; {_resume_point(last)} once the "
                            "problem is fixed") from err


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says how to continue."""


def run_training(cfg: TrainConfig) -> dict:
    import lightning as L
    import torch

    from ..data.datasets import detect_source

    _quiet_known_warnings()
    progress = not cfg.quiet
    if cfg.resume:
        cfg = _checked_resumed_config(cfg)
    data = resolve_data(cfg.data, progress=progress)
    if not cfg.resume:
        cfg = cfg.with_dataset_recipe(detect_source(data))
    out = _claim_out(cfg, data)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"

    # Records and split are cheap and deterministic: every rank computes them; only files are rank zero's.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    all_records, records, n_read = _read_and_split(cfg, data)
    with_boxes = _check_boxes(cfg, records, data)

    on_gpu = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    if not on_gpu:
        from .allocator import keep_freed_memory

        keep_freed_memory()  # faster CPU steps (bench/cpu_allocator.py)
    precision = _precision(cfg, out, on_gpu)
    # Smaller forward passes, same optimiser steps: the memory of fp32 training on CPUs without native bf16.
    micro_batch = int(cfg.micro_batch or default_micro_batch(cfg.batch_size, precision, on_gpu))
    accumulate = int(cfg.batch_size) // micro_batch
    dm = _datamodule(cfg, records, all_records, n_read, with_boxes, micro_batch, on_gpu, progress)
    module = _module(cfg, records, on_gpu)
    callbacks = _callbacks(cfg, out, records, dm, progress)
    trainer = _trainer(cfg, out, precision, callbacks, accumulate, on_gpu, progress)
    _fit(trainer, module, dm, last, cfg.resume)
    best = callbacks[0].best_model_path or str(ckpt_dir / "best.ckpt")
    score = callbacks[0].best_model_score
    if trainer.is_global_zero and not Path(best).is_file() and last.is_file():
        _final_as_best(cfg, best, last)
    return _summary(cfg, out, trainer, records, best, score, last)


def _checked_resumed_config(cfg: TrainConfig) -> TrainConfig:
    """``--resume``: the run's own settings, once its folder and last checkpoint are found (nothing written
    before this check: a refused --resume leaves the run as it was)."""
    if not cfg.out:
        raise BonexrayError("--resume needs --out, the run directory to continue")
    last = Path(cfg.out) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise BonexrayError(f"--resume: no checkpoint at {last}")
    return _resumed_config(cfg, Path(cfg.out) / "config.yaml")


def _claim_out(cfg: TrainConfig, data: str) -> Path:
    """The run folder (``--out``, or a new one under runs/), claimed for training once nothing refuses the run."""
    from ..data.preprocess import check_cache_folder

    out = Path(cfg.out or f"runs/{_dt.datetime.now():%Y%m%d-%H%M%S}-{cfg.backbone}")
    if not cfg.resume and (out / "checkpoints" / "last.ckpt").is_file():
        raise BonexrayError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if cfg.cache:  # checked before the run folder is made: a refused run leaves nothing behind
        check_cache_folder(cfg.cache, [data])
    if _first_process():  # the other processes of a run across processes start after (or with) it
        claim_folder(out, "train", TRAIN_FILES, overwrite=cfg.overwrite, inputs=[data, cfg.weights],
                     legacy=_is_run_folder)
    return out


def _read_and_split(cfg: TrainConfig, data: str):
    """Every record of ``data``, the (``--limit``-ed) records split for this run, and how many were read."""
    from ..data.datasets import load_dataset
    from ..data.splits import check_no_leak, limit_records, make_splits

    all_records = load_dataset(data)
    n_read = len(all_records)
    records = limit_records(all_records, cfg.limit, cfg.split_seed)
    records = make_splits(records, cfg.valid_frac, cfg.test_frac, seed=cfg.split_seed)
    check_no_leak(records)
    _check_both_labels(records, cfg, data)
    return all_records, records, n_read


def _check_boxes(cfg: TrainConfig, records, data: str) -> bool:
    """Whether the run learns from fracture boxes; refused when it would and the training images have none."""
    with_boxes = cfg.localization_weight > 0 or cfg.box_weight > 0
    if with_boxes and not any(r.extras.get("boxes") for r in records if r.split == "train"):
        raise DatasetError(f"{data}: --localization-weight and --box-weight need fracture boxes in the training images "
                           f"(FracAtlas ships them in Annotations/COCO JSON); this dataset has none")
    return with_boxes


def _precision(cfg: TrainConfig, out: Path, on_gpu: bool) -> str:
    """``--precision``, else the resumed run's, else this machine's default."""
    from ..hardware import default_training_precision

    return cfg.precision or (_resumed_precision(out / "config.yaml", on_gpu) if cfg.resume else None) \
        or default_training_precision(on_gpu)


def _datamodule(cfg: TrainConfig, records, all_records, n_read: int, with_boxes: bool, micro_batch: int,
                on_gpu: bool, progress: bool):
    """The run's data: the preprocessing cache's tiles in batches of ``micro_batch``."""
    from ..data.preprocess import default_cache_dir
    from .datamodule import BoneDataModule

    cache_dir = Path(cfg.cache) if cfg.cache else default_cache_dir(all_records.root, cfg.image_size)
    # Items are cache reads (no decoding), so on CPU extra loader processes only steal cores.
    workers = cfg.workers if cfg.workers is not None else (min(4, os.cpu_count() or 1) if on_gpu else 0)
    return BoneDataModule(records, all_records, str(cache_dir), cfg.image_size, batch_size=micro_batch,
                          workers=workers, with_boxes=with_boxes, class_weights=cfg.class_weights,
                          allow_unreadable=cfg.allow_unreadable, progress=progress, n_read=n_read, fit_on=cfg.fit_on)


def _module(cfg: TrainConfig, records, on_gpu: bool):
    """The network to train, with the split it is trained on (for its card)."""
    import torch

    from .module import BoneXrayModule

    module = BoneXrayModule(
        backbone=cfg.backbone, body_parts=records.body_parts, class_weights=None, image_size=cfg.image_size,
        pretrained=None if cfg.pretrained == "none" else cfg.pretrained, weights=cfg.weights, dropout=cfg.dropout,
        lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs, schedule=cfg.schedule,
        body_part_weight=cfg.body_part_weight, localization_weight=cfg.localization_weight,
        box_weight=cfg.box_weight, box_threshold=cfg.box_threshold, box_stride=cfg.box_stride, box_quality=cfg.box_quality, threshold_method=cfg.threshold_method, target_sensitivity=cfg.target_sensitivity, augment=cfg.augment,
        split=split_info(records, cfg),
    )
    if on_gpu:
        module = module.to(memory_format=torch.channels_last)
    return module


def _callbacks(cfg: TrainConfig, out: Path, records, dm, progress: bool) -> list:
    """best.ckpt's checkpointer first (run_training reads it), then the others."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar

    from .averaging import DelayedEMA

    ckpt_dir = out / "checkpoints"
    select_best = cfg.select == "best"
    mode = "max" if cfg.monitor == "valid_auroc" else "min"
    callbacks = [
        # best.ckpt: the chosen model (best epoch on --monitor, or simply the final epoch with --select last).
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=cfg.monitor if select_best else None, mode=mode,
                        save_top_k=1, enable_version_counter=False, auto_insert_metric_name=False),
        # A separate unmonitored checkpoint rewritten every epoch: the resume point.
        ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1,
                        enable_version_counter=False, auto_insert_metric_name=False),
        _run_files_callback(cfg, out, records, dm),
    ]
    if select_best and cfg.patience > 0:
        # Not strict: valid AUROC does not exist while the valid split holds one class only.
        callbacks.append(EarlyStopping(monitor=cfg.monitor, mode=mode, patience=cfg.patience, strict=False))
    if cfg.ema_decay > 0:
        # Validation and checkpoints use the averaged weights once averaging has started.
        callbacks.append(DelayedEMA(decay=cfg.ema_decay, update_starting_at_step=_ema_start(cfg, records)))
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    return callbacks


def _ema_start(cfg: TrainConfig, records) -> int:
    """The step averaging starts: after the first 30% of the steps (one-cycle's warm-up), not from the ImageNet
    start."""
    n_train = sum(1 for r in records if r.split == "train" or (cfg.fit_on == "train+valid" and r.split == "valid"))
    start = int(0.3 * cfg.epochs * -(-n_train // cfg.batch_size))
    if cfg.max_steps:  # never end before the average has started (it would replace the trained weights)
        start = min(start, max(0, cfg.max_steps - 1))
    return start


def _trainer(cfg: TrainConfig, out: Path, precision: str, callbacks: list, accumulate: int, on_gpu: bool,
             progress: bool):
    """The Lightning trainer; its CSV log flushed every step and its checkpoints written atomically."""
    import lightning as L

    from .checkpoint_io import AtomicCheckpointIO
    from .csv_logger import ResumableCSVLogger

    devices = int(cfg.devices) if isinstance(cfg.devices, str) and cfg.devices.isdigit() else cfg.devices
    return L.Trainer(
        default_root_dir=str(out), max_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        accelerator=cfg.accelerator, devices=devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
        precision=precision, callbacks=callbacks, accumulate_grad_batches=accumulate,
        # Flush every step: a killed run keeps the metrics of the epochs its checkpoints hold.
        logger=ResumableCSVLogger(save_dir=str(out), name="", version="", flush_logs_every_n_steps=1),
        plugins=[AtomicCheckpointIO()], deterministic=not on_gpu, enable_progress_bar=progress,
        enable_model_summary=False, log_every_n_steps=1,
    )


def _final_as_best(cfg: TrainConfig, best: str, last: Path) -> None:
    """No best.ckpt (its metric was never computed): the final model, ``last``, copied there."""
    import shutil

    from ..atomic import atomic_write

    print(f"{cfg.monitor} was never computed (a valid split with one class, or stopped before validation): "
          f"best.ckpt is the final model", file=sys.stderr)
    with atomic_write(Path(best)) as tmp:
        shutil.copyfile(last, tmp)


def _summary(cfg: TrainConfig, out: Path, trainer, records, best: str, score, last: Path) -> dict:
    """What run_training returns."""
    from ..model.checkpoint import read_card

    select_best = cfg.select == "best"
    return {
        "run_dir": str(out),
        "recipe": cfg.recipe,
        "best_checkpoint": best,
        "last_checkpoint": str(last),
        "epochs_run": trainer.current_epoch,
        "selected": f"best {cfg.monitor}" if select_best else "final epoch",
        "fit_on": cfg.fit_on,
        **({f"best_{cfg.monitor}": float(score)} if select_best and score is not None else {}),
        # The threshold that the chosen checkpoint carries (not the last epoch's, which may differ).
        "threshold": read_card(best).threshold if Path(best).is_file() else None,
        "body_parts": records.body_parts,
        "data_report": str(out / "data_report.yaml"),
    }
