"""Lightning DataModule over a preprocessed cache: uint8 tiles in, labels out; no decoding at train time."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.preprocess import ImageCache, Letterbox, build_cache, cache_is_current, fingerprint, letterbox_boxes
from ..data.records import RecordSet
from ..errors import DatasetError
from .losses import abnormal_class_weights


#: Fracture boxes per training image are padded to this many (FracAtlas images have at most a few).
MAX_BOXES = 16
#: Points per fracture outline (FracAtlas outlines have at most 15); longer outlines, and boxes
#: without one, use the box's 4 corners.
OUTLINE_POINTS = 16


def outline_points(box_xyxy: np.ndarray, outline: np.ndarray | None) -> np.ndarray:
    """(OUTLINE_POINTS, 2) points of one fracture's outline in tile pixels, padded by repeating its
    last point (min and max, hence the box, are unchanged); the box's corners when there is no
    usable outline."""
    if outline is None or not 3 <= len(outline) <= OUTLINE_POINTS:
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
        outline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)
    pts = np.asarray(outline, np.float32)
    return np.concatenate([pts, np.repeat(pts[-1:], OUTLINE_POINTS - len(pts), 0)], 0)


def letterbox_outlines(polygons, image_wh: tuple[int, int], size: int) -> list[np.ndarray | None]:
    """Flat COCO polygons [x0, y0, x1, y1, ...] (or None) in the pixels of a (w, h) image -> (n, 2)
    points in its letterbox tile (None stays None)."""
    lb = Letterbox(size, int(image_wh[0]), int(image_wh[1]))
    out = []
    for poly in polygons:
        if poly is None:
            out.append(None)
            continue
        pts = np.asarray(poly, np.float64).reshape(-1, 2)
        out.append(lb.to_tile(np.concatenate([pts, pts], 1))[:, :2])
    return out


class CacheDataset(Dataset):
    """Rows of a cache. Items: (uint8 tensor (1,S,S), abnormal int, body-part index).

    With ``boxes`` (per item: an (n, 4) array of [x0, y0, x1, y1] in tile pixels, or None) items gain
    the boxes padded to ``MAX_BOXES`` rows (float32 (M, 4)), which rows are real (bool (M,)), whether
    the image's fracture boxes are known (``localized``: annotated fractures, and images without a
    fracture), for the box and fracture-map losses, and each box's outline (float32 (M,
    ``OUTLINE_POINTS``, 2), see :func:`outline_points`; ``outlines`` per item: a list of (k, 2) point
    arrays or None per box, or None), which augmentation warps to get a tight box after rotation.
    """

    def __init__(self, cache_root: str, size: int, n: int, rows: Sequence[int], abnormal: Sequence[int], parts: Sequence[int],
                 boxes: Sequence[np.ndarray | None] | None = None, localized: Sequence[bool] | None = None,
                 outlines: Sequence[list | None] | None = None):
        self.cache_root, self.size, self.n = cache_root, size, n
        self.rows = np.asarray(rows, dtype=np.int64)
        self.abnormal = np.asarray(abnormal, dtype=np.int64)
        self.parts = np.asarray(parts, dtype=np.int64)
        self.boxes = list(boxes) if boxes is not None else None
        self.outlines = list(outlines) if outlines is not None else [None] * len(self.rows)
        self.localized = np.asarray(localized if localized is not None else [False] * len(self.rows), dtype=bool)
        self._fd: int | None = None  # opened lazily: each loader worker opens the file itself

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        img = torch.from_numpy(self._read_tile(int(self.rows[i])))[None]
        if self.boxes is None:
            return img, int(self.abnormal[i]), int(self.parts[i])
        boxes = torch.zeros((MAX_BOXES, 4), dtype=torch.float32)
        valid = torch.zeros(MAX_BOXES, dtype=torch.bool)
        outlines = torch.zeros((MAX_BOXES, OUTLINE_POINTS, 2), dtype=torch.float32)
        own = self.boxes[i] if self.boxes[i] is not None else np.zeros((0, 4), np.float32)
        own_outlines = self.outlines[i] or [None] * len(own)
        keep = np.nonzero((own[:, 2] > own[:, 0]) & (own[:, 3] > own[:, 1]))[0][:MAX_BOXES]
        for k, j in enumerate(keep):
            outlines[k] = torch.from_numpy(outline_points(own[j], own_outlines[j] if j < len(own_outlines) else None))
        own = own[keep]
        boxes[: len(own)] = torch.from_numpy(np.asarray(own, dtype=np.float32))
        valid[: len(own)] = True
        return img, int(self.abnormal[i]), int(self.parts[i]), boxes, valid, bool(self.localized[i]), outlines

    def _read_tile(self, row: int) -> np.ndarray:
        # A positioned read, not a memmap: pages read through a mapping stay in the resident set, so an
        # epoch would hold the whole cache (4 GB for MURA at 320 px); these reads go through the page cache.
        if self._fd is None:
            self._fd = os.open(os.path.join(self.cache_root, "images.u8"), os.O_RDONLY)
        tile = np.empty((self.size, self.size), np.uint8)
        got = os.preadv(self._fd, [memoryview(tile).cast("B")], row * self.size * self.size)
        if got != tile.size:
            raise DatasetError(f"{self.cache_root}: images.u8 ends inside row {row}; run `bonexray preprocess` again")
        return tile

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = None
        return state

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


def split_datasets(cache: ImageCache, records: RecordSet, body_parts: Sequence[str], with_boxes: bool = False,
                   fit_on: str = "train") -> dict[str, CacheDataset]:
    """Join the split assignment with cache rows; unreadable images and unknown labels are left out.

    ``with_boxes``: items also carry fracture boxes from the records' ``extras`` (boxes, polygons,
    annotated_size, localized), mapped into the cache's letterbox tiles. ``fit_on="train+valid"``:
    the valid images join train (the final fit); there is then no "valid" dataset.
    """
    part_index = {p: i for i, p in enumerate(body_parts)}
    idx = cache.index
    row_of = dict(zip(idx["path"], idx["row"]))
    status_of = dict(zip(idx["path"], idx["status"]))
    out: dict[str, list] = {}
    for r in records:
        if status_of.get(r.path) not in ("ok", "truncated") or r.abnormal not in (0, 1) or r.body_part not in part_index:
            continue
        boxes = outlines = None
        if with_boxes and r.extras.get("boxes"):
            boxes = letterbox_boxes(r.extras["boxes"], r.extras["annotated_size"], cache.size)
            if r.extras.get("polygons") and len(r.extras["polygons"]) == len(boxes):
                outlines = letterbox_outlines(r.extras["polygons"], r.extras["annotated_size"], cache.size)
        split = "train" if fit_on == "train+valid" and r.split == "valid" else r.split
        out.setdefault(split, []).append((row_of[r.path], r.abnormal, part_index[r.body_part], boxes,
                                            bool(r.extras.get("localized", False)), outlines))
    result = {}
    for split, items in out.items():
        rows, ab, pa, boxes, known, outlines = zip(*items)
        result[split] = CacheDataset(str(cache.root), cache.size, len(idx), rows, ab, pa,
                                     boxes=list(boxes) if with_boxes else None, localized=list(known) if with_boxes else None,
                                     outlines=list(outlines) if with_boxes else None)
    return result


#: Above this share of unreadable images, training stops unless --allow-unreadable is given.
MAX_UNREADABLE = 0.05


def data_report(records: RecordSet, index, n_read: int) -> dict:
    """What happened to every image of the run: read, limited, unreadable (with reasons), unlabelled, used."""
    status_of = dict(zip(index["path"], index["status"]))
    reason_of = dict(zip(index["path"], index["reason"]))
    unreadable = [r.path for r in records if status_of.get(r.path) not in ("ok", "truncated")]
    return {
        "read_by_reader": n_read,
        "in_this_run": len(records),
        "left_out_by_limit": n_read - len(records),
        "truncated_but_used": sum(1 for r in records if status_of.get(r.path) == "truncated"),
        "unreadable": len(unreadable),
        "unlabelled": sum(1 for r in records if r.abnormal not in (0, 1)),
        "by_split": {s: sum(1 for r in records if r.split == s) for s in ("train", "valid", "test", "none")},
        "unreadable_images": [{"path": p, "reason": str(reason_of.get(p, "not in cache"))} for p in unreadable],
        "reader_problems": list(records.problems),
    }


class BoneDataModule(L.LightningDataModule):
    """Data work as Lightning intends: ``prepare_data`` decodes and caches once per node (under DDP,
    torchrun or srun only local rank 0 writes the cache); ``setup`` joins the split with the cache,
    accounts for every image and computes the loss's class weights, on every rank."""

    def __init__(self, records: RecordSet, cache_records: RecordSet, cache_dir: str, image_size: int,
                 batch_size: int = 32, workers: int = 0, with_boxes: bool = False, class_weights: str = "per_body_part",
                 allow_unreadable: bool = False, progress: bool = True, n_read: int | None = None, fit_on: str = "train"):
        super().__init__()
        self.fit_on = fit_on
        self.records, self.cache_records, self.cache_dir = records, cache_records, cache_dir
        self.image_size, self.batch_size, self.workers = image_size, batch_size, workers
        self.with_boxes, self.class_weight_mode, self.allow_unreadable = with_boxes, class_weights, allow_unreadable
        self.progress = progress
        self.n_read = len(cache_records) if n_read is None else n_read
        self.body_parts = records.body_parts
        self.datasets: dict[str, CacheDataset] = {}
        self.class_weights: list[list[float]] | None = None
        self.report: dict = {}

    def prepare_data(self) -> None:
        cache, reused = build_cache(self.cache_records, self.cache_dir, size=self.image_size, progress=self.progress)
        if not reused:
            print(f"cached {len(cache.index)} images at {self.image_size} px in {cache.root}", file=sys.stderr)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        fp = fingerprint(self.cache_records.records, self.image_size)
        if not cache_is_current(Path(self.cache_dir), fp):
            raise DatasetError(f"{self.cache_dir}: the preprocessed cache is missing or stale on this process "
                               "(with several nodes, put --cache on a disk every node sees, or on each node's own disk)")
        cache = ImageCache.open(self.cache_dir)
        if cache.meta.get("fingerprint") != fp:  # rebuilt for other data between the check and the open
            raise DatasetError(f"{self.cache_dir}: the preprocessed cache was rebuilt for other data by another run "
                               "while this one started; give each dataset its own --cache")
        self.report = data_report(self.records, cache.index, self.n_read)
        n, bad = self.report["in_this_run"], self.report["unreadable"]
        if n and bad / n > MAX_UNREADABLE and not self.allow_unreadable:
            shown = "; ".join(f"{u['path']}: {u['reason']}" for u in self.report["unreadable_images"][:3])
            raise DatasetError(f"{bad} of {n} images ({bad / n:.0%}) cannot be read (more than {MAX_UNREADABLE:.0%}), "
                               f"e.g. {shown}. Fix the data, or pass --allow-unreadable to train on the rest")
        self.datasets = split_datasets(cache, self.records, self.body_parts, with_boxes=self.with_boxes, fit_on=self.fit_on)
        for split in ("train",) if self.fit_on == "train+valid" else ("train", "valid"):
            if split not in self.datasets:
                raise DatasetError(f"{self.records.root}: no usable {split} images after splitting; "
                                   "use more data (--limit) or check the dataset")
        train = self.datasets["train"]
        labels = train.abnormal.tolist()
        if self.class_weight_mode == "per_body_part":
            self.class_weights = abnormal_class_weights(self.body_parts, [self.body_parts[i] for i in train.parts], labels)
        else:  # one weight pair for every body part (BCE's pos_weight, up to scale)
            self.class_weights = abnormal_class_weights(["*"], ["*"] * len(labels), labels) * len(self.body_parts)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader | list:
        # The final fit (train+valid) has nothing left to validate on; Lightning skips an empty list.
        return self._loader("valid", False) if "valid" in self.datasets else []
