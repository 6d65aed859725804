"""Lightning DataModule over a preprocessed cache: uint8 tiles in, labels out; no decoding at train time."""
from __future__ import annotations

import os
from typing import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.preprocess import ImageCache
from ..data.records import RecordSet


class CacheDataset(Dataset):
    """Rows of a cache. Items: (uint8 tensor (1,S,S), abnormal int, body-part index)."""

    def __init__(self, cache_root: str, size: int, n: int, rows: Sequence[int], abnormal: Sequence[int], parts: Sequence[int]):
        self.cache_root, self.size, self.n = cache_root, size, n
        self.rows = np.asarray(rows, dtype=np.int64)
        self.abnormal = np.asarray(abnormal, dtype=np.int64)
        self.parts = np.asarray(parts, dtype=np.int64)
        self._images: np.ndarray | None = None  # opened lazily: each loader worker maps the file itself

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        if self._images is None:
            self._images = np.memmap(os.path.join(self.cache_root, "images.u8"), dtype=np.uint8, mode="r",
                                     shape=(self.n, self.size, self.size))
        img = torch.from_numpy(np.array(self._images[self.rows[i]]))[None]
        return img, int(self.abnormal[i]), int(self.parts[i])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_images"] = None
        return state


def split_datasets(cache: ImageCache, records: RecordSet, body_parts: Sequence[str]) -> dict[str, CacheDataset]:
    """Join the split assignment with cache rows; unreadable images and unknown labels are left out."""
    part_index = {p: i for i, p in enumerate(body_parts)}
    idx = cache.index
    row_of = dict(zip(idx["path"], idx["row"]))
    status_of = dict(zip(idx["path"], idx["status"]))
    out: dict[str, list] = {}
    for r in records:
        if status_of.get(r.path) not in ("ok", "truncated") or r.abnormal not in (0, 1) or r.body_part not in part_index:
            continue
        out.setdefault(r.split, []).append((row_of[r.path], r.abnormal, part_index[r.body_part]))
    result = {}
    for split, items in out.items():
        rows, ab, pa = zip(*items)
        result[split] = CacheDataset(str(cache.root), cache.size, len(idx), rows, ab, pa)
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
