"""Lightning DataModule over a preprocessed cache: uint8 tiles in, labels out; no decoding at train time."""
from __future__ import annotations

import os
from typing import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.preprocess import ImageCache, letterbox_boxes
from ..data.records import RecordSet


class CacheDataset(Dataset):
    """Rows of a cache. Items: (uint8 tensor (1,S,S), abnormal int, body-part index).

    With ``boxes`` (per item: an (n, 4) array of [x0, y0, x1, y1] in tile pixels, or None) items gain
    a uint8 (1,S,S) fracture mask and whether that mask is known (``localized``), for the
    auxiliary localisation loss.
    """

    def __init__(self, cache_root: str, size: int, n: int, rows: Sequence[int], abnormal: Sequence[int], parts: Sequence[int],
                 boxes: Sequence[np.ndarray | None] | None = None, localized: Sequence[bool] | None = None):
        self.cache_root, self.size, self.n = cache_root, size, n
        self.rows = np.asarray(rows, dtype=np.int64)
        self.abnormal = np.asarray(abnormal, dtype=np.int64)
        self.parts = np.asarray(parts, dtype=np.int64)
        self.boxes = list(boxes) if boxes is not None else None
        self.localized = np.asarray(localized if localized is not None else [False] * len(self.rows), dtype=bool)
        self._images: np.ndarray | None = None  # opened lazily: each loader worker maps the file itself

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        if self._images is None:
            self._images = np.memmap(os.path.join(self.cache_root, "images.u8"), dtype=np.uint8, mode="r",
                                     shape=(self.n, self.size, self.size))
        img = torch.from_numpy(np.array(self._images[self.rows[i]]))[None]
        if self.boxes is None:
            return img, int(self.abnormal[i]), int(self.parts[i])
        mask = torch.zeros((1, self.size, self.size), dtype=torch.uint8)
        for x0, y0, x1, y1 in (self.boxes[i] if self.boxes[i] is not None else ()):
            # At least one pixel, so a tiny box never vanishes.
            c0, r0 = int(np.floor(x0)), int(np.floor(y0))
            mask[0, r0:max(r0 + 1, int(np.ceil(y1))), c0:max(c0 + 1, int(np.ceil(x1)))] = 1
        return img, int(self.abnormal[i]), int(self.parts[i]), mask, bool(self.localized[i])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_images"] = None
        return state


def split_datasets(cache: ImageCache, records: RecordSet, body_parts: Sequence[str], with_boxes: bool = False) -> dict[str, CacheDataset]:
    """Join the split assignment with cache rows; unreadable images and unknown labels are left out.

    ``with_boxes``: items also carry fracture masks from the records' ``extras`` (boxes,
    annotated_size, localized), mapped into the cache's letterbox tiles.
    """
    part_index = {p: i for i, p in enumerate(body_parts)}
    idx = cache.index
    row_of = dict(zip(idx["path"], idx["row"]))
    status_of = dict(zip(idx["path"], idx["status"]))
    out: dict[str, list] = {}
    for r in records:
        if status_of.get(r.path) not in ("ok", "truncated") or r.abnormal not in (0, 1) or r.body_part not in part_index:
            continue
        boxes = None
        if with_boxes and r.extras.get("boxes"):
            boxes = letterbox_boxes(r.extras["boxes"], r.extras["annotated_size"], cache.size)
        out.setdefault(r.split, []).append((row_of[r.path], r.abnormal, part_index[r.body_part], boxes,
                                            bool(r.extras.get("localized", False))))
    result = {}
    for split, items in out.items():
        rows, ab, pa, boxes, known = zip(*items)
        result[split] = CacheDataset(str(cache.root), cache.size, len(idx), rows, ab, pa,
                                     boxes=list(boxes) if with_boxes else None, localized=list(known) if with_boxes else None)
    return result


class BoneDataModule(L.LightningDataModule):
    def __init__(self, datasets: dict[str, CacheDataset], batch_size: int = 32, workers: int = 0):
        super().__init__()
        self.datasets, self.batch_size, self.workers = datasets, batch_size, workers

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

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", False)
