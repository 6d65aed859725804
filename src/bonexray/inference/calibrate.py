"""Fit what the scope gate, the calibration and the two operating points need from a model's own data,
and write it into (a copy of) the checkpoint's model card: ``bonexray calibrate-scope``.

* Feature statistics (inference/scope.py ``fit_feature_scope``): PCA of the **train** split's
  embeddings; the score threshold is a quantile of the **valid** split's scores. The test split is
  never read.
* In-scope head (inference/scope.py ``fit_scope_head``): the train split's embeddings against
  outliers (inference/outliers.py: synthetic images, rendered text, CT/MR slices, gray photos when
  scikit-image is installed, inverted train images, train images turned by 90/180/270 degrees or flipped
  upside down, and the user's ``--non-radiographs`` and
  ``--other-regions`` files); its threshold is a quantile of the valid split's p(in scope).
* Calibration (core/decision.py ``fit_temperature_and_bias``) and the operating points
  (``choose_operating_points``: sensitivity / specificity targets) on the valid split's labelled
  predictions. For a model fitted on train only these are held-out predictions. For a train+valid fit
  the valid images were seen in training, so the card says the fit is in-sample; held-out predictions
  for such a model need cross-fitting (k models, each trained without one fold of train+valid).
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
from .scope import DEFAULT_BAND, choose_band, fit_feature_scope, fit_scope_head

BAND_SHARE = 0.2


def embed_rows(predictor, image_cache, rows, batch_size: int = 64, tta: str | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N,), embeddings (N, C)) of cache rows; ``tta``: the predictor's unless given (the
    embedding is the identity view's under any TTA)."""
    probs, embs = [], []
    rows = np.asarray(rows)
    for i in range(0, len(rows), batch_size):
        pred = predictor.predict_batch(np.asarray(image_cache.images[rows[i : i + batch_size]]), boxes=False, tta=tta)
        if pred.embedding is None:
            raise CheckpointError(f"{predictor.path}: the model gives no embedding output (an ONNX file exported "
                                  "before bonexray had it); calibrate the checkpoint instead")
        probs.append(pred.prob)
        embs.append(pred.embedding)
    return np.concatenate(probs), np.concatenate(embs)


def embed_items(predictor, items, batch_size: int = 64) -> np.ndarray:
    """Embeddings of (name, bytes) items through the front ends' decode path (undecodable ones left out)."""
    from ..data.preprocess import read_bytes_for_model

    tiles = []
    for name, data in items:
        try:
            tiles.append(read_bytes_for_model(data, name, predictor.image_size).tile)
        except BonexrayError:
            continue
    embs = [predictor.predict_batch(np.stack(tiles[i : i + batch_size]), boxes=False, tta="none").embedding
            for i in range(0, len(tiles), batch_size)]
    return np.concatenate(embs) if embs else np.zeros((0, 1))


def outlier_sets(image_cache, train_rows, non_radiographs=(), other_regions=(), n_inverted: int = 200,
                 n_rotated: int = 200, seed: int = 0) -> dict[str, list]:
    """Scope reason -> (name, bytes) outliers for the in-scope head (see the module doc)."""
    from . import outliers
    from .scope import INVERTED, NOT_RADIOGRAPH, ROTATED, UNKNOWN_PART

    rng = np.random.default_rng(seed)
    rows = np.asarray(train_rows)

    def pick(n: int) -> list[int]:
        return [int(r) for r in rng.choice(rows, min(n, len(rows)), replace=False)] if len(rows) else []

    inverted = [(f"inverted-{r}.png", outliers.png(255 - np.asarray(image_cache.images[r]))) for r in pick(n_inverted)]
    rotated = [(f"{t}-{r}.png", outliers.png(outliers.turned(np.asarray(image_cache.images[r]), t)))
               for i, r in enumerate(pick(n_rotated)) for t in [outliers.TURNS[i % len(outliers.TURNS)]]]
    return {NOT_RADIOGRAPH: (outliers.synthetic(120) + outliers.rendered_text(80) + outliers.dicom_slices(("CT", "MR"))
                             + outliers.photos() + outliers.files(non_radiographs)),
            UNKNOWN_PART: outliers.files(other_regions), INVERTED: inverted, ROTATED: rotated}


def fit_calibration(prob: np.ndarray, labels: np.ndarray, fit_on: str, sensitivity: float = 0.95,
                    specificity: float = 0.95) -> dict[str, Any]:
    """Card fields ``calibration`` and ``operating_points`` from labelled valid-split predictions."""
    from ..core.decision import choose_operating_points, fit_temperature_and_bias, temperature_scaled

    where = (f"valid split ({len(prob)} labelled images), held out" if fit_on == "train" else
             f"valid split ({len(prob)} labelled images), which this model was trained on (fit_on train+valid): "
             "in-sample, not held out")
    try:
        t, b = fit_temperature_and_bias(prob, labels)
    except ValueError as err:  # e.g. a model no better than chance on valid: no calibration, said so
        calibration, shown, note = None, np.asarray(prob, np.float64), f"; uncalibrated ({err})"
    else:
        calibration = {"method": "temperature+bias", "temperature": round(t, 6), "bias": round(b, 6),
                       "fitted_on": where, "rule": "sigmoid(logit / temperature + bias), the pair minimising the log loss"}
        shown, note = temperature_scaled(prob, t, b), ""
    pts = choose_operating_points(shown, labels, sensitivity, specificity, source=where + note)
    return {"calibration": calibration,
            "operating_points": {"suspicious": round(pts.suspicious, 6), "definite": round(pts.definite, 6),
                                 "source": pts.source}}


def scope_calibration(model: str | os.PathLike, data: str | os.PathLike, quantile: float = 0.995,
                      cache: str | os.PathLike | None = None, batch_size: int = 64, device: str = "auto",
                      progress: bool = False, head: bool = True, head_quantile: float = 0.99,
                      non_radiographs=(), other_regions=(), sensitivity: float = 0.95,
                      specificity: float = 0.95, tta: str | None = None) -> dict[str, Any]:
    """Card fields ``scope`` (with its ``head``), ``calibration``, ``operating_points``,
    ``borderline_band``, ``borderline_source`` and ``tta`` for ``model`` on its training data.

    ``tta`` (None: the card's): the test-time augmentation the valid-split probabilities, hence the
    calibration and operating points, are taken under and that the card then asks every front end for.
    When it differs from the card's, the decision threshold is chosen again on the valid split under it
    (the run's threshold method; Youden without a run folder), except for a train+valid fit."""
    from ..data.datasets import load_dataset
    from ..data.preprocess import build_cache, default_cache_dir
    from ..data.splits import assign_eval_splits
    from ..runs import find_run_dir
    from .predictor import Predictor

    if not 0.5 <= quantile < 1:
        raise BonexrayError(f"--quantile {quantile}: use a share between 0.5 and 1 (e.g. 0.995)")
    predictor = Predictor(model, device=device, backend="torch", tta=tta)
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
    _, train_emb = embed_rows(predictor, image_cache, train_rows, batch_size, tta="none")  # only embeddings needed
    valid_prob, valid_emb = embed_rows(predictor, image_cache, valid_rows, batch_size)
    fit_on = (card.split or {}).get("fit_on", "train")
    threshold, updates = card.threshold, {"tta": predictor.tta}
    if predictor.tta != (card.tta or "none") and fit_on == "train":
        threshold = updates["threshold"] = threshold_on_valid(valid, valid_prob, find_run_dir(predictor.path))
    seen = " (this model was also trained on it: --fit-on train+valid)" if fit_on == "train+valid" else ""
    fs = fit_feature_scope(train_emb, valid_emb, quantile=quantile, info={
        "fitted_on": f"train split ({len(train_rows)} images)",
        "threshold_source": f"{quantile} quantile of the valid split's scores ({len(valid_rows)} images){seen}; "
                            f"split: {how}"})
    scope_card = fs.to_card()
    if head:
        outs = {k: embed_items(predictor, v, batch_size) for k, v in
                outlier_sets(image_cache, train_rows, non_radiographs, other_regions).items() if v}
        scope_card["head"] = fit_scope_head(train_emb, outs, valid_emb, quantile=head_quantile, info={
            "fitted_on": f"train split ({len(train_rows)} images) against outliers: "
                         + ", ".join(f"{k} {len(v)}" for k, v in outs.items()),
            "threshold_source": f"{head_quantile} of the valid split's images pass ({len(valid_rows)} images){seen}"}
        ).to_card()
    return {"scope": scope_card, **updates, **_valid_split_fields(valid, valid_prob, threshold, fit_on, sensitivity,
                                                                 specificity)}


def threshold_on_valid(valid, valid_prob: np.ndarray, run_dir) -> float:
    """The decision threshold chosen again on the labelled valid images, by the run's method."""
    import yaml

    from ..training.threshold import choose_threshold

    cfg = {}
    if run_dir is not None and (Path(run_dir) / "config.yaml").is_file():
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    y = np.array([r.abnormal if r.abnormal in (0, 1) else -1 for r in valid])
    lab = y >= 0
    if len(set(y[lab])) < 2:
        raise DatasetError("the valid split needs images of both labels to choose the threshold under the new TTA")
    return float(choose_threshold(y[lab], valid_prob[lab], method=cfg.get("threshold_method", "youden"),
                                  target=cfg.get("target_sensitivity", 0.9)))


def _valid_split_fields(valid, valid_prob: np.ndarray, threshold: float, fit_on: str, sensitivity: float,
                        specificity: float) -> dict[str, Any]:
    """``calibration``, ``operating_points`` (with enough labelled valid images of both labels) and the
    borderline band from the valid split's records and predictions."""
    out: dict[str, Any] = {}
    labelled = np.array([r.abnormal in (0, 1) for r in valid])
    y = np.array([int(r.abnormal) if r.abnormal in (0, 1) else -1 for r in valid])
    if labelled.sum() >= 10 and len(set(y[labelled])) == 2:
        out.update(fit_calibration(valid_prob[labelled], y[labelled], fit_on, sensitivity, specificity))
    if fit_on == "train" and labelled.sum() >= 10:
        out["borderline_band"] = round(choose_band(valid_prob[labelled], threshold, BAND_SHARE), 4)
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


def is_calibrated_checkpoint(path: str | os.PathLike) -> bool:
    """A compact bonexray checkpoint whose card holds a scope section: what ``calibrate-scope`` writes."""
    from ..model.checkpoint import CARD_KEY, STATE_KEY, _read_checkpoint

    try:
        ckpt = _read_checkpoint(Path(path), "cpu")
    except (BonexrayError, OSError):
        return False
    card = ckpt.get(CARD_KEY) if isinstance(ckpt, Mapping) else None
    return set(ckpt) == {CARD_KEY, STATE_KEY} and isinstance(card, Mapping) and isinstance(card.get("scope"), Mapping)


def calibrate_model(model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
                    quantile: float = 0.995, cache: str | os.PathLike | None = None, batch_size: int = 64,
                    device: str = "auto", overwrite: bool = False, **options) -> Path:
    """``bonexray calibrate-scope``: a copy of the checkpoint whose card holds the scope gate, the
    calibration, the operating points and the band (``options``: :func:`scope_calibration`'s).

    ``out`` is checked before any work (bonexray/output_folder.py): an existing file is replaced only
    when it is a calibrated checkpoint (:func:`is_calibrated_checkpoint`) or with ``overwrite``, and
    never when it is the model, the data or one of the outlier files given."""
    from ..model.hub import resolve_model
    from ..output_folder import claim_file
    from .predictor import is_onnx_file

    src = resolve_model(model)
    if is_onnx_file(src):
        raise BonexrayError(f"{src}: calibrate the checkpoint (.ckpt), then export it")
    inputs = [src, data, *options.get("non_radiographs", ()), *options.get("other_regions", ())]
    target = claim_file(out, "calibrate-scope", overwrite=overwrite, inputs=inputs, ours=is_calibrated_checkpoint)
    updates = scope_calibration(src, data, quantile=quantile, cache=cache, batch_size=batch_size, device=device,
                                progress=True, **options)
    return rewrite_checkpoint(src, target, updates)
