"""Synthetic datasets built by the tests themselves (MURA may not be redistributed)."""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SRC = Path(__file__).resolve().parents[1] / "src"

# (split, part, patient, study, label, n_images)
MURA_STUDIES = [
    ("train", "WRIST", "patient00001", "study1", 1, 3),
    ("train", "WRIST", "patient00002", "study1", 0, 2),
    ("train", "ELBOW", "patient00003", "study1", 0, 2),
    ("train", "ELBOW", "patient00003", "study2", 1, 1),
    ("train", "HAND", "patient00004", "study1", 1, 2),
    ("train", "HAND", "patient00005", "study1", 0, 2),
    ("train", "SHOULDER", "patient00006", "study1", 1, 2),
    ("train", "FINGER", "patient00007", "study1", 0, 2),
    ("valid", "WRIST", "patient11001", "study1", 1, 2),
    ("valid", "HUMERUS", "patient11002", "study1", 0, 2),
    ("valid", "FOREARM", "patient11003", "study1", 1, 1),
]


def radiograph_like(seed: int, h: int = 96, w: int = 80, abnormal: int = 0) -> np.ndarray:
    """A dark background with a bright 'bone' bar; abnormal ones get a dark 'fracture' gap."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 30, size=(h, w)).astype(np.uint8)
    img[:, w // 3 : 2 * w // 3] = 200
    if abnormal:
        img[h // 2 - 3 : h // 2 + 3, w // 3 : 2 * w // 3] = 40
    return img


def make_mura_tree(base: Path, studies=MURA_STUDIES, image_size=(96, 80)) -> Path:
    """Write a tiny MURA-v1.1 tree in the exact release layout; returns the MURA-v1.1 folder."""
    root = base / "MURA-v1.1"
    seed = 0
    for split in ("train", "valid"):
        img_rows, study_rows = [], []
        for s_split, part, patient, study, label, n in studies:
            if s_split != split:
                continue
            study_dir = f"{split}/XR_{part}/{patient}/{study}_{'positive' if label else 'negative'}"
            (root / study_dir).mkdir(parents=True, exist_ok=True)
            study_rows.append([f"MURA-v1.1/{study_dir}/", label])
            for i in range(1, n + 1):
                seed += 1
                rel = f"{study_dir}/image{i}.png"
                mode_img = Image.fromarray(radiograph_like(seed, *image_size, abnormal=label))
                # MURA mixes grayscale and RGB PNGs; keep both kinds in the fixture.
                (mode_img.convert("RGB") if seed % 3 == 0 else mode_img).save(root / rel)
                img_rows.append([f"MURA-v1.1/{rel}"])
        with open(root / f"{split}_image_paths.csv", "w", newline="") as f:
            csv.writer(f).writerows(img_rows)
        with open(root / f"{split}_labeled_studies.csv", "w", newline="") as f:
            csv.writer(f).writerows(study_rows)
    return root


def make_manifest(base: Path, n: int = 24, parts=("hand", "wrist"), with_split: bool = False) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = (i // 2) % 2  # two images per study, one label per study
        name = f"img{i:03d}.png"
        Image.fromarray(radiograph_like(i, abnormal=label)).save(base / name)
        row = {"path": name, "body_part": parts[i % len(parts)], "abnormal": label, "study_id": f"s{i // 2}"}
        if with_split:
            row["split"] = "train" if i < n * 3 // 4 else "valid"
        rows.append(row)
    path = base / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def make_fracatlas_tree(base: Path, n_groups: int = 12, per_group: int = 3, h: int = 96, w: int = 80,
                        unannotated: int = 1) -> Path:
    """A small tree in FracAtlas's release layout, with COCO fracture boxes.

    Groups alternate body part (hand/leg) and label; in every fractured image the 'fracture' gap of
    ``radiograph_like`` is annotated, except in the first ``unannotated`` fractured images.
    """
    import json

    root = base / "FracAtlas"
    for folder in ("Fractured", "Non_fractured"):
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
    rows, coco_images, coco_anns = [], [], []
    skipped = 0
    for g in range(n_groups):
        part, fractured = ("hand", "leg")[g % 2], (g // 2) % 2
        for k in range(per_group):
            i = g * per_group + k
            name = f"IMG{i:07d}.jpg"
            folder = "Fractured" if fractured else "Non_fractured"
            Image.fromarray(radiograph_like(i, h, w, abnormal=fractured)).save(root / "images" / folder / name, quality=95)
            rows.append({"image_id": name, "hand": int(part == "hand"), "leg": int(part == "leg"), "hip": 0, "shoulder": 0,
                         "mixed": 0, "hardware": 0, "multiscan": 0, "fractured": fractured, "fracture_count": fractured,
                         "frontal": 1, "lateral": 0, "oblique": 0})
            if fractured:
                if skipped < unannotated:
                    skipped += 1
                    continue
                coco_images.append({"id": i, "width": w, "height": h, "file_name": name})
                coco_anns.append({"id": len(coco_anns), "image_id": i, "category_id": 0, "iscrowd": 0,
                                  "bbox": [w // 3, h // 2 - 3, w // 3, 6], "area": (w // 3) * 6, "segmentation": []})
    with open(root / "dataset.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    (root / "Annotations" / "COCO JSON").mkdir(parents=True)
    (root / "Annotations" / "COCO JSON" / "COCO_fracture_masks.json").write_text(json.dumps(
        {"info": {}, "images": coco_images, "annotations": coco_anns, "categories": [{"id": 0, "name": "fractured"}]}))
    return root


def make_checkpoint(path: Path, body_parts=("hand", "leg", "shoulder"), image_size: int = 64,
                    backbone: str = "efficientnet_lite0", localization_head: bool = False, threshold: float = 0.5,
                    seed: int = 0, split: dict | None = None, nan_output: bool = False) -> Path:
    """An untrained bonexray checkpoint (random weights, seeded): enough to exercise every consumer.

    ``split``: the model card's training-split record (e.g. ``{"fit_on": "train+valid"}``).
    ``nan_output``: the abnormality head's bias NaN, what a diverged training run leaves (its hash recorded)."""
    import torch

    from bonexray.model.checkpoint import ModelCard, save_model
    from bonexray.model.network import BoneXrayNet

    torch.manual_seed(seed)
    net = BoneXrayNet(backbone, num_body_parts=len(body_parts), pretrained=None, localization_head=localization_head)
    if nan_output:
        with torch.no_grad():
            net.abnormal_head.bias.fill_(float("nan"))
    card = ModelCard(backbone=backbone, image_size=image_size, mean=net.mean, std=net.std,
                     body_parts=list(body_parts), threshold=threshold, split=split)
    return save_model(path, net, card)


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """``bonexray ARGV`` run in this process: (exit code, stdout, stderr); a traceback in either fails the test."""
    from bonexray.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return rc, out, err


def nonblank_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def strict_json_lines(out: str) -> list[dict]:
    """The JSON lines of ``out``; a bare NaN or Infinity (not JSON) fails the test."""
    def no_constants(name):
        raise AssertionError(f"bare {name} in JSON output")

    return [json.loads(ln, parse_constant=no_constants) for ln in out.splitlines() if ln.strip()]


def leftovers(folder: Path) -> list[str]:
    """Temporary files left behind (the cache folder's lock file and the output marker are meant to stay)."""
    from bonexray.data.preprocess import LOCK_NAME

    return sorted(p.name for p in folder.iterdir() if p.name not in (LOCK_NAME, ".bonexray-out.json") and (
        p.name.startswith(".") or p.name.endswith((".tmp", ".part", ".partial"))))


def bonexray_cmd(*argv) -> list[str]:
    """``bonexray ARGV`` as a command line for a fresh Python process (run it with :func:`subprocess_env`)."""
    return [sys.executable, "-c", "import sys; from bonexray.cli import main; sys.exit(main(sys.argv[1:]))",
            *[str(a) for a in argv]]


def subprocess_env() -> dict:
    """The environment of this process with the repository's src/ first on PYTHONPATH."""
    return {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def png_bytes(array: np.ndarray) -> bytes:
    """An image array encoded as PNG, in memory."""
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(array: np.ndarray, quality: int) -> bytes:
    """An image array encoded as JPEG at IJG ``quality``, in memory."""
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def lossy_jpeg_dicom(gray: np.ndarray, quality: int, modality: str = "DX") -> bytes:
    """A DICOM file (Part 10 bytes) whose 8-bit gray pixel data is one JPEG baseline frame at ``quality``."""
    import io

    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray image storage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate([jpeg_bytes(gray, quality)])
    ds["PixelData"].VR = "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


class LiveServer:
    """Run an ASGI app under uvicorn in a thread on 127.0.0.1 (a free port); ``.url``; a context manager."""

    def __init__(self, app, **config) -> None:
        """``config``: more uvicorn.Config settings (e.g. ``bonexray.web.server.uvicorn_settings()``)."""
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **{"timeout_keep_alive": 5, **config}))
        self.thread = None

    def __enter__(self) -> "LiveServer":
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


#: What a hospital portal answers where a DICOMweb server was expected: a login page.
LOGIN_PAGE = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Hospital portal</body></html>"


class HtmlPageServer:
    """An HTTP server on 127.0.0.1 (a free port) answering every GET with :data:`LOGIN_PAGE` (200, text/html);
    ``.url``; a context manager."""

    def __enter__(self) -> "HtmlPageServer":
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class LoginPage(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(LOGIN_PAGE)))
                self.end_headers()
                self.wfile.write(LOGIN_PAGE)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), LoginPage)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
