"""Fit what the scope gate and the borderline band need from a model's own training data, and write it
into (a copy of) the checkpoint's model card: ``bonexray calibrate-scope`` and the bundled-model build.

* Feature statistics (inference/scope.py ``fit_feature_scope``): PCA of the **train** split's
  embeddings; the score threshold is a quantile of the **valid** split's scores. The test split is
  never read.
* Borderline band: for a model whose threshold was chosen on the held-out valid split
  (``fit_on: train``), the half-width holding the :data:`BAND_SHARE` of valid images closest to the
  threshold; for a train+valid fit (no held-out split left) the stated default
  (inference/scope.py ``DEFAULT_BAND``), said so in ``borderline_source``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BonexrayError, CheckpointError, DatasetError
from .scope import DEFAULT_BAND, choose_band, fit_feature_scope

BAND_SHARE = 0.2


def embed_rows(predictor, image_cache, rows, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N,), embeddings (N, C)) of cache rows."""
    probs, embs = [], []
    rows = np.asarray(rows)
    for i in range(0, len(rows), batch_size):
        pred = predictor.predict_batch(np.asarray(image_cache.images[rows[i : i + batch_size]]), boxes=False)
        if pred.embedding is None:
            raise CheckpointError(f"{predictor.path}: the model gives no embedding output (an ONNX file exported "
                                  "before bonexray had it); calibrate the checkpoint instead")
        probs.append(pred.prob)
        embs.append(pred.embedding)
    return np.concatenate(probs), np.concatenate(embs)


def scope_calibration(model: str | os.PathLike, data: str | os.PathLike, quantile: float = 0.995,
                      cache: str | os.PathLike | None = None, batch_size: int = 64, device: str = "auto",
                      progress: bool = False) -> dict[str, Any]:
    """Card fields ``scope``, ``borderline_band``, ``borderline_source`` for ``model`` on its training data."""
    from ..data.datasets import load_dataset
    from ..data.preprocess import build_cache, default_cache_dir
    from ..data.splits import assign_eval_splits
    from ..runs import find_run_dir
    from .predictor import Predictor

    if not 0.5 <= quantile < 1:
        raise BonexrayError(f"--quantile {quantile}: use a share between 0.5 and 1 (e.g. 0.995)")
    predictor = Predictor(model, device=device, backend="torch")
    card = predictor.card
    records = load_dataset(data)
    image_cache, _ = build_cache(records, Path(cache) if cache else default_cache_dir(records.root, predictor.image_size),
                                 size=predictor.image_size, progress=progress)
    records, how = assign_eval_splits(records, card.split, find_run_dir(predictor.path), None)
    status = dict(zip(image_cache.index["path"], image_cache.index["status"]))
    row_of = dict(zip(image_cache.index["path"], image_cache.index["row"]))

    def rows(split: str) -> tuple[list[int], list]:
        chosen = [r for r in records if r.split == split and status.get(r.path) in ("ok", "truncated")]
        return [int(row_of[r.path]) for r in chosen], chosen

    train_rows, _ = rows("train")
    valid_rows, valid = rows("valid")
    if len(train_rows) < 2 or not valid_rows:
        raise DatasetError(f"{data}: the model's train/valid splits hold {len(train_rows)}/{len(valid_rows)} readable "
                           "images; the scope statistics need both")
    _, train_emb = embed_rows(predictor, image_cache, train_rows, batch_size)
    valid_prob, valid_emb = embed_rows(predictor, image_cache, valid_rows, batch_size)
    fit_on = (card.split or {}).get("fit_on", "train")
    seen = " (this model was also trained on it: --fit-on train+valid)" if fit_on == "train+valid" else ""
    fs = fit_feature_scope(train_emb, valid_emb, quantile=quantile, info={
        "fitted_on": f"train split ({len(train_rows)} images)",
        "threshold_source": f"{quantile} quantile of the valid split's scores ({len(valid_rows)} images){seen}; "
                            f"split: {how}"})
    out: dict[str, Any] = {"scope": fs.to_card()}
    labelled = np.array([r.abnormal in (0, 1) for r in valid])
    if fit_on == "train" and labelled.sum() >= 10:
        out["borderline_band"] = round(choose_band(valid_prob[labelled], card.threshold, BAND_SHARE), 4)
        out["borderline_source"] = (f"the {BAND_SHARE:.0%} of the held-out valid split's images closest to the threshold "
                                    f"({int(labelled.sum())} images)")
    else:
        out["borderline_band"] = DEFAULT_BAND
        out["borderline_source"] = (f"stated default {DEFAULT_BAND}: the model was fitted on train+valid, so no held-out "
                                    "split was left to set it on (never tuned on test)")
    return out


def rewrite_checkpoint(src: str | os.PathLike, out: str | os.PathLike, card_updates: Mapping[str, Any],
                       half: bool = False) -> Path:
    """A compact copy of a checkpoint: only the card (updated) and the network's tensors; with ``half``,
    floating weights as float16 (batch-norm statistics stay float32). The weights hash is re-stamped."""
    import torch

    from ..atomic import atomic_write
    from ..model.checkpoint import CARD_KEY, NET_PREFIX, STATE_KEY, _read_checkpoint, stamp_weights_sha256

    ckpt = _read_checkpoint(Path(src), "cpu")
    state = {}
    for k, v in ckpt[STATE_KEY].items():
        if not k.startswith(NET_PREFIX):
            continue
        keep32 = k.endswith(("running_mean", "running_var"))
        state[k] = v.half() if half and v.is_floating_point() and not keep32 else v.float() if v.is_floating_point() else v
    card = dict(ckpt[CARD_KEY])
    card.update(card_updates)
    new = {CARD_KEY: card, STATE_KEY: state}
    stamp_weights_sha256(new)
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(p) as tmp:
        torch.save(new, tmp)
    return p


def calibrate_model(model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
                    quantile: float = 0.995, cache: str | os.PathLike | None = None, batch_size: int = 64,
                    device: str = "auto") -> Path:
    """``bonexray calibrate-scope``: a copy of the checkpoint whose card holds the scope statistics and band."""
    from ..model.hub import resolve_model
    from .predictor import is_onnx_file

    src = resolve_model(model)
    if is_onnx_file(src):
        raise BonexrayError(f"{src}: calibrate the checkpoint (.ckpt), then export it")
    if Path(out).resolve() == src.resolve():
        raise BonexrayError(f"--out {out}: write a new file, not over the model")
    updates = scope_calibration(src, data, quantile=quantile, cache=cache, batch_size=batch_size, device=device,
                                progress=True)
    return rewrite_checkpoint(src, out, updates)
