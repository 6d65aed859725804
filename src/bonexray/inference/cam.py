"""Class activation maps of the abnormality logit, and their overlay pictures.

``cam_for_batch(net, x)`` runs a pytorch_grad_cam method (Grad-CAM++ by default) on the module
``net.cam_target_layer()`` names (the layer that outputs the last feature map, found from timm's
``feature_info``; never hard-coded per backbone), with the abnormality logit as
the target: the network is wrapped so that it returns ``abnormal_logit[:, None]`` and the target is
``ClassifierOutputTarget(0)``. The result is one map per image at model resolution, each scaled to
[0, 1] (min-max per image, as pytorch_grad_cam does).

``render_overlay`` draws the map with a colormap over the letterboxed radiograph (upscaled to
at least 512 px) and writes the probability and the body part into the picture.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from ..atomic import atomic_write
from ..data.imageio import IMAGE_SUFFIXES
from ..errors import BonexrayError

#: name -> pytorch_grad_cam class name. All take gradients of the abnormality logit.
CAM_METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
}
DEFAULT_METHOD = "gradcam++"
_DISPLAY_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "layercam": "LayerCAM", "hirescam": "HiResCAM"}
#: Not a CAM: the learned fracture map of models trained with --localization-weight.
LOCALIZATION_METHOD = "localization"
DISPLAY_SIZE = 512


class AbnormalLogit(nn.Module):
    """``net`` seen as a one-output classifier: (B, 1, S, S) -> abnormal logit (B, 1)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0][:, None]


def _cam_class(method: str):
    import pytorch_grad_cam

    key = method.strip().lower()
    if key not in CAM_METHODS:
        raise BonexrayError(f"unknown CAM method {method!r}: one of {', '.join(CAM_METHODS)}")
    return getattr(pytorch_grad_cam, CAM_METHODS[key])


def cam_for_batch(net: nn.Module, x: torch.Tensor | np.ndarray, method: str = DEFAULT_METHOD) -> np.ndarray:
    """CAM of the abnormality logit for a batch -> float32 (N, S, S) in [0, 1].

    ``x``: float tensor (N, 1, S, S) in [0, 1] (what the net takes), or uint8 array (N, S, S).
    Works when called under ``torch.inference_mode`` / ``no_grad`` too (it re-enables autograd
    for itself). Parameter gradients are not computed (only the path to the input), so the
    network's ``.grad`` fields are left alone.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    param = next(net.parameters())
    if isinstance(x, np.ndarray):
        if x.ndim != 3:
            raise ValueError(f"expected a uint8 array (N, S, S), got shape {x.shape}")
        x = torch.from_numpy(np.ascontiguousarray(x)).float().div(255.0)[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected a tensor (N, 1, S, S), got shape {tuple(x.shape)}")
    n = int(x.shape[0])
    if n == 0:
        return np.zeros((0, *x.shape[-2:]), np.float32)
    if method.strip().lower() == LOCALIZATION_METHOD:
        return localization_for_batch(net, x)
    cam_cls = _cam_class(method)

    target_layer = net.cam_target_layer()
    was_training = net.training
    flags = [(p, p.requires_grad) for p in net.parameters()]
    with torch.inference_mode(False), torch.enable_grad():
        # clone() outside inference mode turns an inference tensor into a normal one.
        inp = x.detach().to(param.device, torch.float32).clone().requires_grad_(True)
        for p, _ in flags:
            p.requires_grad_(False)
        cam = cam_cls(model=AbnormalLogit(net), target_layers=[target_layer])
        try:
            maps = cam(input_tensor=inp, targets=[ClassifierOutputTarget(0)] * n)
        except ValueError as err:
            acts = cam.activations_and_grads.activations
            if acts and acts[-1].ndim != 4:  # tokens (B, N, C) of a transformer, not a (B, C, h, w) map
                raise BonexrayError(
                    f"CAM needs a backbone whose last feature map is a 2-D grid; {type(target_layer).__name__} "
                    f"outputs shape {tuple(acts[-1].shape)} (a transformer?). Use a CNN backbone."
                ) from err
            raise
        finally:
            cam.activations_and_grads.release()  # not the context manager: it swallows IndexError
            for p, flag in flags:
                p.requires_grad_(flag)
            net.train(was_training)
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0)
    return np.clip(maps, 0.0, 1.0)


def _require_localization_head(net: nn.Module) -> None:
    if getattr(net, "localization_head", None) is None:
        raise BonexrayError("this checkpoint has no localisation head: train with --localization-weight "
                            f"(FracAtlas boxes), or use a CAM method ({', '.join(CAM_METHODS)})")


def localization_for_batch(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The localisation head's fracture probability, upsampled to the input: float32 (N, S, S) in [0, 1].

    Unlike a CAM it is not rescaled per image: a low map means the model sees no fracture.
    """
    _require_localization_head(net)
    param = next(net.parameters())
    with torch.inference_mode():
        maps = net.localization_map(x.to(param.device, torch.float32))
        maps = torch.nn.functional.interpolate(maps, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    return maps[:, 0].float().cpu().numpy().clip(0.0, 1.0)


# --------------------------------------------------------------------------- pictures


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable (FreeType) font, Pillow >= 10.1
    except Exception:  # no FreeType: the small bitmap font
        return ImageFont.load_default()


def _colormap(values: np.ndarray, name: str = "jet") -> np.ndarray:
    """float (H, W) in [0, 1] -> uint8 RGB (H, W, 3)."""
    from matplotlib import colormaps

    rgba = colormaps[name](np.clip(values, 0.0, 1.0))
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def render_overlay(
    gray: np.ndarray,
    cam: np.ndarray,
    lines: Sequence[str] = (),
    display_size: int | None = DISPLAY_SIZE,
    colormap: str = "jet",
    boxes: np.ndarray | None = None,
) -> Image.Image:
    """The radiograph (uint8 (H, W)) with the heat map (float (H, W) in [0, 1]) blended in.

    The colour's opacity grows with the map's value (15% to 60%), so cold regions keep the
    radiograph visible. ``display_size``: a square tile is upscaled to at least this many pixels;
    None keeps the image's own size and aspect (the full-resolution original; one smaller than
    ``DISPLAY_SIZE`` is upscaled to that long side). ``boxes`` (n, 5) [x0, y0, x1, y1,
    score] in the pixels of ``gray`` are outlined with their scores. ``lines`` are written on a black
    band added above the picture, so the caption never hides any of the radiograph.
    """
    if gray.ndim != 2 or cam.shape != gray.shape:
        raise ValueError(f"gray {gray.shape} and cam {cam.shape} must be the same 2-D shape")
    h0, w0 = gray.shape
    if display_size is None:  # the original's own pixels; a small original is upscaled to be legible
        up = max(1.0, DISPLAY_SIZE / max(h0, w0))
        size = (round(w0 * up), round(h0 * up))
    else:
        size = (max(int(display_size), w0),) * 2
    base = Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8))
    heat = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32))  # float32 -> mode "F"
    if size != (w0, h0):
        base = base.resize(size, Image.Resampling.BICUBIC)
        heat = heat.resize(size, Image.Resampling.BILINEAR)
    h = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    g = np.asarray(base, dtype=np.float32)[..., None].repeat(3, axis=2)
    alpha = (0.15 + 0.45 * h)[..., None]
    rgb = g * (1.0 - alpha) + _colormap(h, colormap).astype(np.float32) * alpha
    img = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8))
    if boxes is not None and len(boxes):
        draw_boxes(img, np.asarray(boxes, dtype=np.float64) * np.array([size[0] / w0, size[1] / h0] * 2 + [1.0]))
    if not lines:
        return img
    font = _font(max(12, size[0] // 28))
    pad = max(4, size[0] // 100)
    probe = ImageDraw.Draw(img)
    extents = [probe.textbbox((0, 0), t, font=font) for t in lines]
    band = sum(b[3] - b[1] for b in extents) + pad * (len(lines) + 1)
    canvas = Image.new("RGB", (size[0], size[1] + band), (0, 0, 0))
    canvas.paste(img, (0, band))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for t, b in zip(lines, extents):
        draw.text((pad - b[0], y - b[1]), t, font=font, fill=(255, 255, 255))
        y += b[3] - b[1] + pad
    return canvas


#: Box outline colour: white-bordered green reads on both bone (bright) and background (dark).
BOX_COLOUR = (0, 230, 64)


def draw_boxes(img: Image.Image, boxes: np.ndarray) -> None:
    """Outline (n, 5) [x0, y0, x1, y1, score] boxes on ``img`` (in its pixels), each with its score."""
    draw = ImageDraw.Draw(img)
    w = max(2, round(max(img.size) / 300))
    font = _font(max(11, max(img.size) // 45))
    for x0, y0, x1, y1, score in boxes:
        draw.rectangle([x0 - w, y0 - w, x1 + w, y1 + w], outline=(255, 255, 255), width=1)
        draw.rectangle([x0, y0, x1, y1], outline=BOX_COLOUR, width=w)
        label = f"{score:.2f}"
        tb = draw.textbbox((0, 0), label, font=font)
        ty = y0 - (tb[3] - tb[1]) - 2 * w if y0 - (tb[3] - tb[1]) - 2 * w >= 0 else y1 + w
        draw.rectangle([x0, ty, x0 + tb[2] - tb[0] + 2 * w, ty + tb[3] - tb[1] + w], fill=(0, 0, 0))
        draw.text((x0 + w - tb[0], ty - tb[1]), label, font=font, fill=BOX_COLOUR)


def cam_to_original(cam: np.ndarray, geometry) -> np.ndarray:
    """A map over the letterbox tile (S, S) -> the same map over the original image (H, W): the
    padding is cut off and the image's part resized, so the colours sit on the right pixels."""
    left, top, nw, nh = geometry.content
    w, h = geometry.original_size
    part = Image.fromarray(np.ascontiguousarray(cam[top:top + nh, left:left + nw], dtype=np.float32))
    return np.asarray(part.resize((int(w), int(h)), Image.Resampling.BILINEAR), dtype=np.float32)


def caption(finding, threshold: float, method: str = "") -> list[str]:
    """The lines above a heatmap picture, from the image's core/findings.py ImageFinding: an image out of
    scope gets the reason and no verdict, no body part."""
    if finding.in_scope is False:
        lines = [f"out of scope: {finding.scope_reason}", "no verdict: the model cannot judge this image"]
    else:
        verdict = "ABNORMAL" if finding.abnormal else "normal"
        state = f", finding {finding.finding}" if finding.finding else ""
        part = finding.body_part
        lines = [f"{verdict}: p(abnormal) = {finding.prob_abnormal:.3f} (threshold {threshold:.2f}){state}",
                 f"body part: {part} ({finding.body_part_probs.get(part, 0.0):.0%})"]
    if method:  # say what the colours are: a learned fracture probability or a rescaled CAM
        key = method.strip().lower()
        lines.append("heatmap: learned fracture map (probability)" if key == LOCALIZATION_METHOD
                     else f"heatmap: {_DISPLAY_NAMES.get(key, method)} of p(abnormal), scaled per image")
    return lines


def cam_stem(path: str | os.PathLike) -> str:
    """File stem for the CAM picture; suffix-less DICOM names like ``1.2.840.99`` stay whole."""
    p = Path(path)
    return p.stem if p.suffix.lower() in IMAGE_SUFFIXES else p.name


class CamWriter:
    """Writes ``<stem>_cam.png`` per image into ``out_dir``; repeated stems get ``<stem>-2_cam.png``..."""

    def __init__(self, out_dir: str | os.PathLike, predictor, method: str = DEFAULT_METHOD) -> None:
        if predictor.net is None:
            raise BonexrayError("CAM needs the torch network: give a checkpoint, not an ONNX file")
        if method.strip().lower() == LOCALIZATION_METHOD:  # fail early: a model without the head, a bad name
            _require_localization_head(predictor.net)
        else:
            _cam_class(method)
        self.out_dir = Path(out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise BonexrayError(f"--cam {out_dir}: cannot create the folder ({err.strerror or err})") from err
        self.predictor = predictor
        self.method = method
        self._used: set[str] = set()

    def _name(self, path: str | os.PathLike) -> Path:
        stem = cam_stem(path)
        name, k = f"{stem}_cam.png", 1
        while name.lower() in self._used:
            k += 1
            name = f"{stem}-{k}_cam.png"
        self._used.add(name.lower())
        return self.out_dir / name

    def write_batch(self, findings: Sequence, decoded: Sequence) -> list[str]:
        """One overlay per image (``findings``: their core/findings.py ImageFinding; ``decoded``: their
        bonexray.pipeline Decoded): the original radiograph at full resolution, decoded again without draft
        scaling, with the map cut to the image and the reported boxes outlined (none when out of scope).
        An image without a file (array) gets its tile upscaled. Writing errors (OSError) reach the caller."""
        pr = self.predictor
        batch = np.stack([d.tile for d in decoded])
        maps = cam_for_batch(pr.net, pr.to_tensor(batch), method=self.method)
        written = []
        for f, d, cam in zip(findings, decoded, maps, strict=True):
            img = self._picture(f, d, cam)
            out = self._name(d.path or d.label)
            with atomic_write(out) as tmp:
                img.save(tmp, format="PNG")
            written.append(str(out))
        return written

    def _picture(self, finding, decoded, cam: np.ndarray) -> Image.Image:
        from ..data.imageio import read_image, to_uint8

        lines = caption(finding, self.predictor.threshold, self.method)
        boxes = None
        if finding.boxes is not None:
            boxes = np.array([[b.x0, b.y0, b.x1, b.y1, b.score] for b in finding.boxes]).reshape(-1, 5)
            lines.append(f"boxes: {len(boxes)} reported" if len(boxes) else "boxes: none reported")
        if decoded.path is None:
            return render_overlay(decoded.tile, cam, lines, boxes=boxes)
        full = to_uint8(read_image(decoded.path).pixels)
        return render_overlay(full, cam_to_original(cam, decoded.geometry), lines, display_size=None, boxes=boxes)
