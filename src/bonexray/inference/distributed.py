"""Inference across processes, GPUs and nodes with the engine training uses: Lightning's
``Trainer.predict`` under DDP, launched the same ways (``--devices N [--num-nodes M]`` on one command,
which starts the other processes itself, or ``torchrun`` / ``srun`` starting one process per device).

Every rank builds the same item list (deterministic), reads its share of it (torch's
``DistributedSampler``; shares padded with repeats, dropped again by index), predicts with its own :class:`Predictor` and keeps plain results;
after ``Trainer.predict`` the results are gathered on global rank 0 (``torch.distributed.gather_object``) and
ordered by input index, so rank 0 writes them once, in input order, exactly as a one-process run
does. Other ranks get ``None`` and write nothing.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BonexrayError, ImageReadError, NotAnImageError


@dataclass
class ItemResult:
    """What one rank found for one input item: its prediction, or the reason it could not be read."""

    index: int
    prob: float | None = None
    parts: np.ndarray | None = None
    #: (n, 5) boxes in tile pixels (model with a box head and boxes asked for), else None.
    boxes: np.ndarray | None = None
    truncated: bool = False
    #: Whatever the loader returned beside the tile (e.g. the image's Letterbox), handed back as is
    #: (or as the caller's ``annotate`` made it once the batch was predicted).
    extra: Any = None
    error: str | None = None
    #: True when ``error`` says why the file is no image (a DICOMDIR, an SR): skipped, not failed.
    skipped: bool = False


def parse_devices(devices: str | int | None):
    """Lightning's devices syntax: ``"2"`` -> 2, ``"auto"`` / ``"0,1"`` / ``-1`` stay as given."""
    if devices is None:
        return 1
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        return int(devices)
    return devices


def wants_distributed(devices: str | int | None, num_nodes: int = 1) -> bool:
    """More than one process: ``--devices`` other than 1, or several nodes."""
    return parse_devices(devices) != 1 or int(num_nodes) > 1


def local_world_size(devices) -> int:
    """Processes on this node: torchrun/SLURM say so in the environment, else ``--devices`` when it is a count."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(var, "").isdigit():
            return max(1, int(os.environ[var]))
    d = parse_devices(devices)
    return d if isinstance(d, int) and d > 0 else 1


def rank_device(device: str | None) -> str:
    """The device of this process: ``cuda`` becomes ``cuda:<local rank>`` so that each rank has its own GPU."""
    from .predictor import resolve_device

    dev = resolve_device(device)
    if dev == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return dev


class _Items:
    """A map-style dataset over item indices; ``load(i)`` -> (uint8 tile (S, S), truncated, extra);
    an item is ``(index, tile, truncated, extra, error, skipped)``."""

    def __init__(self, n: int, load: Callable[[int], tuple[np.ndarray, bool, Any]]) -> None:
        self.n, self.load = n, load

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        try:
            tile, truncated, extra = self.load(i)
            return i, tile, truncated, extra, None, False
        except NotAnImageError as err:  # named as skipped, not failed, as one process names it
            return i, None, False, None, err.reason, True
        except ImageReadError as err:
            return i, None, False, None, err.reason, False
        except BonexrayError:
            raise  # a setup problem (a missing decoder): stop, as one process does
        except Exception as err:  # noqa: BLE001 - one bad file must not stop the others
            return i, None, False, None, f"{type(err).__name__}: {err}", False


def _quiet_lightning() -> None:
    """Lightning's start-up notes (accelerators, tips) say nothing about the images; warnings still show."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for msg in (r".*LeafSpec.*is deprecated.*", r".*litlogger.*", r".*does not have many workers.*",
                r".*predict returned None.*",  # by design: results are gathered after predict
                r".*Total length of .* across ranks is zero.*"):  # fewer items than processes
        warnings.filterwarnings("ignore", message=msg)


def _as_list(batch):
    return batch  # items stay Python objects; tiles are stacked per batch in predict_step


#: ``annotate(extras, prediction)``: per predicted batch on its rank, the loader's extras of its items
#: (input order within the batch) and their BatchPrediction -> what is gathered as each item's ``extra``.
Annotate = Callable[[list[Any], Any], list[Any]]


def _check_strategy(strategy):
    if strategy in ("auto", None, ""):
        return "ddp"
    if "spawn" in str(strategy) or "fork" in str(strategy):
        raise BonexrayError(f"--strategy {strategy}: inference across processes runs with 'ddp' (the command is "
                            "started once per process, as for training); spawn/fork would copy the loaded model")
    return strategy


def _predict_module(predictor, n_items: int, load, batch_size: int, boxes: bool, box_settings,
                    annotate: Annotate | None):
    """The LightningModule each rank runs: reads its share, predicts it batch by batch, keeps ItemResults."""
    import lightning as L
    from torch.utils.data import DataLoader

    class PredictModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            # A plain attribute, not a submodule: Lightning must neither move nor broadcast it.
            self._engine = [predictor]
            self.found: list[ItemResult] = []

        def predict_dataloader(self):
            from torch.utils.data.distributed import DistributedSampler

            # torch's sampler pads every share to the same length with repeated items (dropped again
            # below by index), so no rank is left without a batch when there are fewer items than ranks;
            # Lightning's own predict sampler would give such a rank nothing, and it would not join the
            # collective calls of the others.
            items = _Items(n_items, load)
            sampler = DistributedSampler(items, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                                         shuffle=False)
            return DataLoader(items, batch_size=batch_size, sampler=sampler, collate_fn=_as_list)

        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            return batch  # numpy tiles and Python objects: the Predictor moves what it runs

        def predict_step(self, batch, batch_idx):
            ok = [b for b in batch if b[4] is None]
            self.found.extend(ItemResult(b[0], error=b[4], skipped=b[5]) for b in batch if b[4] is not None)
            if ok:
                pred = self._engine[0].predict_batch(np.stack([b[1] for b in ok]), boxes=boxes, box_settings=box_settings)
                extras = [b[3] for b in ok]
                if annotate is not None:
                    extras = annotate(extras, pred)
                for j, (i, _, truncated, *_) in enumerate(ok):
                    self.found.append(ItemResult(i, float(pred.prob[j]), np.asarray(pred.parts[j]),
                                                 pred.boxes[j] if pred.boxes is not None else None, bool(truncated),
                                                 extras[j]))
            return None

    return PredictModule()


def _gather_on_rank0(found: list[ItemResult]) -> list[list[ItemResult] | None]:
    """Every rank's results on global rank 0 (elsewhere: only this rank's); the process group ends here."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [found]
    rank0 = dist.get_rank() == 0
    gathered = [None] * dist.get_world_size() if rank0 else None
    dist.gather_object(found, gathered, dst=0)
    # Done with the other ranks: what rank 0 computes next (e.g. torchmetrics' detection AP in
    # evaluate) must not try to synchronise with processes that have moved on.
    dist.destroy_process_group()
    return gathered if rank0 else [found]


def _in_index_order(gathered, n_items: int) -> list[ItemResult]:
    by_index: dict[int, ItemResult] = {}
    for part in gathered:
        for res in part or []:
            by_index.setdefault(res.index, res)
    missing = [i for i in range(n_items) if i not in by_index]
    if missing:  # never write a partial table as if it were whole
        raise BonexrayError(f"inference across processes lost {len(missing)} of {n_items} items (first: {missing[0]})")
    return [by_index[i] for i in range(n_items)]


def predict_distributed(predictor, n_items: int, load: Callable[[int], tuple[np.ndarray, bool, Any]], *,
                        batch_size: int = 16, devices="auto", num_nodes: int = 1, strategy: str = "ddp",
                        boxes: bool = False, box_settings=None, annotate: Annotate | None = None
                        ) -> list[ItemResult] | None:
    """Predict items ``0..n_items-1`` over all ranks; on global rank 0 their results in index order, else None.

    ``annotate``: see :data:`Annotate` (predict decides the scope gate's embedding checks there, on the
    rank that holds the embedding, so only the decision is gathered)."""
    import lightning as L
    import torch

    strategy = _check_strategy(strategy)
    _quiet_lightning()
    on_gpu = str(predictor.device).startswith("cuda")
    if not on_gpu:
        # Share the cores: one process per core (torch ops outside onnxruntime, e.g. box decoding).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size(devices)))
    module = _predict_module(predictor, n_items, load, batch_size, boxes, box_settings, annotate)
    trainer = L.Trainer(accelerator="gpu" if on_gpu else "cpu", devices=parse_devices(devices), num_nodes=num_nodes,
                        strategy=strategy, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, use_distributed_sampler=False)
    trainer.predict(module, return_predictions=False)
    # Gathered here, after predict, not in a hook: a rank whose share is empty (fewer items than ranks)
    # runs no predict epoch at all, and a collective in a hook would wait for it forever. Lightning
    # keeps the process group until the process exits.
    gathered = _gather_on_rank0(module.found)
    if not trainer.is_global_zero:
        return None
    return _in_index_order(gathered, n_items)
