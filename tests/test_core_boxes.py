"""core/boxes.py: the numpy box decoder gives the boxes of model/detection.py's torch decoder."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest


@pytest.mark.parametrize("seed", range(6))
def test_numpy_decoder_matches_torch_decoder_on_random_head_outputs(seed):
    import torch

    from bonexray.core.boxes import BoxSettings, decode_boxes
    from bonexray.model.detection import decode_boxes as torch_decode

    rng = np.random.default_rng(seed)
    b, h, w = 3, 12, 10
    logits = rng.normal(-1.0, 2.0, (b, 1, h, w)).astype(np.float32)
    ltrb = np.exp(rng.normal(2.0, 0.8, (b, 4, h, w))).astype(np.float32)
    centerness = rng.normal(0.0, 1.5, (b, 1, h, w)).astype(np.float32)
    logits[0, 0, 3, 4] = np.nan  # a non-finite score is never a box
    settings = BoxSettings(threshold=float(rng.uniform(0.05, 0.5)), nms_iou=float(rng.uniform(0.2, 0.7)),
                           max_detections=int(rng.integers(1, 30)))
    ours = decode_boxes(logits, ltrb, centerness, settings)
    theirs = torch_decode(torch.from_numpy(logits), torch.from_numpy(ltrb), torch.from_numpy(centerness), settings)
    assert sum(len(x) for x in ours) > 0
    for a, t in zip(ours, theirs, strict=True):
        assert a.shape == tuple(t.shape)
        np.testing.assert_allclose(a, t.numpy(), rtol=1e-5, atol=1e-4)


def test_empty_maps_give_no_boxes():
    from bonexray.core.boxes import BoxSettings, decode_boxes

    z = np.full((2, 1, 4, 4), -20.0, np.float32)
    out = decode_boxes(z, np.ones((2, 4, 4, 4), np.float32), z, BoxSettings())
    assert [x.shape for x in out] == [(0, 5), (0, 5)]


def test_core_decoding_and_findings_import_no_torch():
    code = ("import sys, numpy as np; from bonexray.core.boxes import BoxSettings, decode_boxes; "
            "import bonexray.core.findings; "
            "decode_boxes(np.zeros((1,1,2,2),np.float32), np.ones((1,4,2,2),np.float32), np.zeros((1,1,2,2),np.float32), "
            "BoxSettings()); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("seed", range(4))
def test_nms_stopped_at_a_limit_keeps_the_first_boxes_of_the_full_pass(seed):
    """The decoder stops the greedy pass at max_detections: the same boxes, in the same order, as the
    whole pass cut there (many overlapping candidates, ties in score included)."""
    from bonexray.core.boxes import nms

    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 300, (800, 2)).astype(np.float32)
    wh = rng.uniform(4, 60, (800, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + wh], 1)
    scores = np.round(rng.uniform(0, 1, 800), 2).astype(np.float32)  # ties
    full = nms(boxes, scores, 0.5)
    assert len(full) > 120
    for limit in (1, 10, 100, len(full) + 5):
        np.testing.assert_array_equal(nms(boxes, scores, 0.5, limit=limit), full[:limit])
