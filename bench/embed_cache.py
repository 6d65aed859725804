"""Model outputs (probability, body-part probabilities, pooled embedding) of (name, bytes) items through
the front ends' path (bytes -> ``read_bytes_for_model`` -> model), cached on disk so that the scope and
robustness benches can be rerun without embedding thousands of images again.

The cache key is the model's weights hash, the set's name and a hash of the items' names and sizes, so
a changed set or model is embedded afresh. Undecodable items are left out (said on stderr).
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

DEFAULT_CACHE = os.environ.get("BONEXRAY_BENCH_CACHE", str(Path(__file__).resolve().parents[2] / "scope-cache"))


def _key(predictor, set_name: str, items, tta: str) -> str:
    h = hashlib.sha256()
    h.update(str(predictor.card.weights_sha256 or predictor.path).encode())
    if tta != "none":  # keys of caches written before TTA was part of them stay valid
        h.update(f"tta={tta}".encode())
    h.update(set_name.encode())
    for name, data in items:
        h.update(name.encode())
        h.update(hashlib.sha1(data).digest())
    return h.hexdigest()[:16]


def embed_items(predictor, set_name: str, items, cache: str | None = DEFAULT_CACHE, batch_size: int = 32,
                tta: str | None = None) -> dict:
    """{"names", "prob", "parts", "embedding"} for the decodable items (order kept); ``tta``: the
    predictor's unless given (the embedding is the identity view's under any)."""
    tta = predictor.tta if tta is None else tta
    from bonexray.data.preprocess import read_bytes_for_model

    path = None
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() else "-" for c in set_name)[:60]
        path = Path(cache) / f"{safe}-{_key(predictor, set_name, items, tta)}.npz"
        if path.is_file():
            z = np.load(path, allow_pickle=False)
            return {k: z[k] for k in z.files}
    names, probs, parts, embs = [], [], [], []
    for i in range(0, len(items), batch_size):
        tiles, chunk = [], []
        for name, data in items[i : i + batch_size]:
            try:
                tiles.append(read_bytes_for_model(data, name, predictor.image_size).tile)
            except Exception as err:  # noqa: BLE001 - an undecodable negative is left out, said so
                print(f"  {name}: not decoded ({type(err).__name__}: {err})", file=sys.stderr)
                continue
            chunk.append(name)
        if not tiles:
            continue
        pred = predictor.predict_batch(np.stack(tiles), boxes=False, tta=tta)
        names += chunk
        probs.append(pred.prob)
        parts.append(pred.parts)
        embs.append(pred.embedding.astype(np.float32))
    out = {"names": np.asarray(names, dtype=str),
           "prob": np.concatenate(probs) if probs else np.zeros(0),
           "parts": np.concatenate(parts) if parts else np.zeros((0, len(predictor.card.body_parts))),
           "embedding": np.concatenate(embs) if embs else np.zeros((0, 0), np.float32)}
    if path is not None:
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **out)
        os.replace(tmp, path)
    return out
