"""The third adversarial pass, every item: each hostile input built in a temporary folder and given to the real
CLI (a subprocess, as a user runs it) or to a real ``bonexray serve`` on a free loopback port.

Run: ``PYTHONPATH=src python bench/adversarial.py`` (all items, a few minutes on CPU; ``--only 10,14,16`` for
some). Prints one line per item: number, what is expected, what was observed, PASS / FAIL (SKIP where the
machine cannot build the input, e.g. no tmpfs mount). Exit status 1 when any item FAILs. Nothing is timed:
this checks answers, not speed. The model is a tiny one trained here for two steps (the answers are about
files, flags and messages, not accuracy). Needs pydicom-data for the real transfer-syntax files.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic images, manifests and servers the tests build

from builders import HtmlPageServer, make_manifest, png_bytes, radiograph_like  # noqa: E402
CLI = "import sys; from bonexray.cli import main; sys.exit(main(sys.argv[1:]))"
# predict --cam with the heatmap captions also written to stderr (the picture's text cannot be read back).
CLI_WITH_CAPTIONS = ("import json, sys; import bonexray.inference.cam as cam; real = cam.caption\n"
                     "def caption(*a, **k):\n    lines = real(*a, **k)\n"
                     "    print('CAPTION ' + json.dumps(lines), file=sys.stderr)\n    return lines\n"
                     "cam.caption = caption\n" + CLI)

SYNTAX_FILES = ["image_dfl.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPGExtended.dcm", "JPEG-lossy.dcm",
                "JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_jpeg_ls_lossless.dcm",
                "JPEGLSNearLossless_16.dcm", "MR_small_jp2klossless.dcm", "MR2_J2KI.dcm", "RG1_J2KR.dcm"]


class Outcome(NamedTuple):
    expected: str
    observed: str
    ok: bool | None  # None: skipped (the input cannot be built on this machine)


class Run(NamedTuple):
    rc: int
    out: str
    err: str

    def lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.strip()]

    def errors(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ": error: " in ln]

    def records(self) -> list[dict]:
        return [json.loads(ln) for ln in self.out.splitlines() if ln.startswith("{")]


def cli(*argv, program: str = CLI, timeout: float = 600, env: dict | None = None) -> Run:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run([sys.executable, "-c", program, *map(str, argv)], env=full_env, capture_output=True,
                       timeout=timeout)
    return Run(p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace"))


def short(text: str, n: int = 150) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def testdata(name: str) -> Path | None:
    try:
        from pydicom.data import get_testdata_file

        found = get_testdata_file(name)
        return Path(found) if found else None
    except Exception:  # noqa: BLE001 - reported by the caller as not installed
        return None


# ---------------------------------------------------------------------------- inputs


def manifest(folder: Path, n: int = 24, labels: dict[int, str] | None = None) -> Path:
    """The tests' synthetic manifest (hand and leg), with ``labels`` written over some rows' abnormal cells."""
    path = make_manifest(folder, n=n, parts=("hand", "leg"))
    rows = list(csv.DictReader(open(path, newline="")))
    for i, label in (labels or {}).items():
        rows[i]["abnormal"] = label
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def dicom_cr(study_uid: str, patient: str, seed: int, body_part: str) -> bytes:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined = "CR", body_part
    ds.PatientID, ds.PatientName, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient, patient, study_uid, generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 96, 80, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = radiograph_like(seed).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def encapsulated_pdf() -> bytes:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.StudyInstanceUID, ds.PatientID = "DOC", generate_uid(), "P9"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


class Workspace:
    """The temporary folder, and a tiny model trained in it on first use (two optimiser steps)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._run: Path | None = None

    def path(self, name: str) -> Path:
        p = self.base / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def run_dir(self) -> Path:
        if self._run is None:
            data = manifest(self.base / "train-data", n=24)
            run = self.base / "run"
            r = cli("train", "--data", data, "--out", run, "--backbone", "efficientnet_lite0", "--pretrained", "none",
                    "--image-size", 64, "--epochs", 1,
                    "--max-steps", 2, "--batch-size", 8, "--workers", 0, "--valid-frac", 0.25, "--test-frac", 0.25,
                    "--quiet", "--cache", self.base / "train-cache")
            if r.rc != 0:
                raise RuntimeError(f"training the tiny model failed: {short(r.err, 400)}")
            self._run = run
        return self._run

    @property
    def model(self) -> Path:
        return self.run_dir / "checkpoints" / "best.ckpt"


ITEMS: list[tuple[str, str, bool, Callable[[Workspace], Outcome]]] = []


def item(key: str, title: str, fast: bool = False):
    """Register an adversarial input; ``fast``: needs no model and no server (the test suite runs these)."""
    def register(fn):
        ITEMS.append((key, title, fast, fn))
        return fn
    return register


# ---------------------------------------------------------------------------- data loss


@item("1", "evaluate --out over its own input; calibrate-scope and --cache over foreign files")
def out_folders(ws: Workspace) -> Outcome:
    data = manifest(ws.base / "eval-data", n=8)
    d2 = ws.path("d2")
    for p in data.parent.glob("*.png"):
        (d2 / p.name).write_bytes(p.read_bytes())
    (d2 / "predictions.csv").write_text(data.read_text())
    (d2 / "report.md").write_text("my notes\n")
    before = snapshot(d2)
    base = ["evaluate", ws.model, "--data", d2 / "predictions.csv", "--split", "all", "--bootstrap", 10,
            "--backend", "torch"]
    plain, forced = cli(*base, "--out", d2), cli(*base, "--out", d2, "--overwrite")
    notes = ws.base / "notes.ckpt"
    notes.write_text("not a model")
    calib = cli("calibrate-scope", ws.model, "--data", data, "--out", notes)
    mine = ws.path("my-folder")
    (mine / "index.csv").write_text("my spreadsheet\n")
    cache = cli("evaluate", ws.model, "--data", data, "--split", "all", "--out", ws.base / "res", "--bootstrap", 10,
                "--backend", "torch", "--cache", mine)
    runs = {"evaluate": plain, "evaluate --overwrite": forced, "calibrate-scope": calib, "evaluate --cache": cache}
    kept = snapshot(d2) == before and notes.read_text() == "not a model" and (mine / "index.csv").read_text() == \
        "my spreadsheet\n"
    ok = kept and all(r.rc == 2 and len(r.errors()) == 1 and "Traceback" not in r.err for r in runs.values()) \
        and "over the input" in forced.err and "--overwrite" in plain.err
    return Outcome("each refused in one line (exit 2), every file as it was",
                   "; ".join(f"{k}: exit {r.rc}, {short(r.errors()[0][r.errors()[0].find('error:'):], 70) if r.errors() else short(r.err, 70)}"
                             for k, r in runs.items()) + f"; files kept: {kept}", ok)


@item("2", "66 slow request bodies against serve")
def slow_bodies(ws: Workspace) -> Outcome:
    import httpx

    with serve(ws) as url:
        port = int(url.rsplit(":", 1)[1])
        head = ("POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b"
                "\r\nContent-Length: 100000\r\n\r\n").encode()
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(66)]
        try:
            for s in slow:
                s.sendall(head + b"-")
            time.sleep(0.5)
            for s in slow:
                s.sendall(b"-")
            health = httpx.get(f"{url}/healthz", timeout=5).status_code
            answers = []
            for s in slow:
                s.settimeout(30)
                try:
                    answers.append(s.recv(64).split(b"\r\n", 1)[0].decode(errors="replace"))
                except (socket.timeout, ConnectionError):
                    answers.append("")
            after = httpx.post(f"{url}/api/predict", timeout=60,
                               files=[("files", ("x.png", png_bytes(radiograph_like(0)), "image/png"))]).status_code
        finally:
            for s in slow:
                s.close()
    n408 = sum(a.startswith("HTTP/1.1 408") for a in answers)
    n503 = sum(a.startswith("HTTP/1.1 503") for a in answers)
    return Outcome("/healthz 200 while the slots are held; slow bodies cut off (408); then a predict 200",
                   f"/healthz {health}; slow bodies: {n408}x 408, {n503}x 503, {66 - n408 - n503} other; "
                   f"predict after: {after}", health == 200 and n408 + n503 == 66 and n408 >= 60 and after == 200)


# ---------------------------------------------------------------------------- silent wrong answers


@item("3", "predict --study on a folder with two patients' DICOM studies")
def two_studies(ws: Workspace) -> Outcome:
    from pydicom.uid import generate_uid

    folder = ws.path("mixed-study")
    first, second = generate_uid(), generate_uid()
    (folder / "leg.dcm").write_bytes(dicom_cr(first, "P1", 1, "LEG"))
    (folder / "hand.dcm").write_bytes(dicom_cr(second, "P2", 2, "HAND"))
    r = cli("predict", ws.model, folder, "--study", "--device", "cpu", "--no-scope-check")
    studies = [rec for rec in r.records() if rec.get("type") == "study"]
    found = sorted(s.get("study") for s in studies)
    return Outcome("two study lines, one per StudyInstanceUID", f"exit {r.rc}; {len(studies)} study line(s)",
                   r.rc == 0 and found == sorted([first, second]))


@item("4", "train --resume --image-size 96 on a finished 64 px run")
def resume_image_size(ws: Workspace) -> Outcome:
    return _resume_refused(ws, "--image-size", "96", "(the run has 64)")


@item("5", "evaluate with labels 2, -1, 0.5, nan, blank (and 1.0, yes, True)")
def dropped_rows(ws: Workspace) -> Outcome:
    odd = {0: "2", 1: "-1", 2: "0.5", 3: "nan", 4: "", 5: "1.0", 6: "yes", 7: "True"}
    data = manifest(ws.base / "labels", n=12, labels=odd)
    out = ws.base / "labels-res"
    r = cli("evaluate", ws.model, "--data", data, "--split", "all", "--out", out, "--bootstrap", 0, "--backend",
            "torch", "--cache", ws.base / "labels-cache")
    named = [ln for ln in r.err.splitlines() if "dropped" in ln]
    dropped = {i for i in range(8) if any(f"img{i:03d}.png" in ln for ln in named)}
    try:
        counted = json.loads((out / "metrics.json").read_text())["dropped_rows"]["n"]
        in_report = "dropped_rows" in (out / "report.md").read_text()
    except (OSError, ValueError, KeyError):
        counted, in_report = None, False
    return Outcome("rows 0-4 named on stderr and counted (5) in metrics.json and report.md; 1.0/yes/True kept",
                   f"exit {r.rc}; named: {sorted(dropped)}; metrics.json dropped_rows.n = {counted}; "
                   f"report.md: {in_report}", r.rc == 0 and dropped == {0, 1, 2, 3, 4} and counted == 5 and in_report)


@item("6", "predict --cam on a colour photo: the heatmap caption")
def cam_caption(ws: Workspace) -> Outcome:
    rng = np.random.default_rng(7)
    photo = ws.base / "photo.png"
    photo.write_bytes(png_bytes(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)))
    r = cli("predict", ws.model, photo, "--cam", ws.base / "cams-photo", "--device", "cpu", program=CLI_WITH_CAPTIONS)
    captions = [json.loads(ln[len("CAPTION "):]) for ln in r.err.splitlines() if ln.startswith("CAPTION ")]
    recs = [rec for rec in r.records() if rec.get("type") == "image"]
    text = " ".join(captions[0]) if captions else ""
    refused = bool(recs) and recs[0].get("in_scope") is False and recs[0].get("abnormal") is None
    ok = r.rc == 0 and refused and text.startswith("out of scope") and "p(abnormal) =" not in text \
        and "body part:" not in text
    return Outcome("in_scope false, abnormal null, caption 'out of scope ...' with no verdict or body part",
                   f"exit {r.rc}; in_scope {recs[0].get('in_scope') if recs else '-'}, abnormal "
                   f"{recs[0].get('abnormal') if recs else '-'}; caption: {short(text, 90)!r}", ok)


# ---------------------------------------------------------------------------- tracebacks


@item("7", "predict --cam into a read-only folder and onto a full disk (tmpfs mounts)")
def cam_unwritable(ws: Workspace) -> Outcome:
    images = [ws.base / f"cam{i}.png" for i in range(2)]
    for i, p in enumerate(images):
        p.write_bytes(png_bytes(radiograph_like(10 + i, 400, 320)))
    seen, ok = [], True
    for label, opts in (("read-only", "ro,size=64k"), ("full", "size=4k")):
        mount = ws.base / f"mnt-{label}"
        mount.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mount)], capture_output=True).returncode:
            return Outcome("one line, predictions still printed", "cannot mount a tmpfs here (needs root)", None)
        try:
            r = cli("predict", ws.model, *images, "--cam", mount, "--device", "cpu", "--no-scope-check")
        finally:
            subprocess.run(["umount", str(mount)], capture_output=True)
        n = len([rec for rec in r.records() if rec.get("type") == "image"])
        errs = r.errors() + [ln for ln in r.err.splitlines() if "cannot write" in ln and ": error: " not in ln]
        good = "Traceback" not in r.err and r.rc in (1, 2) and len(errs) == 1 and str(mount) in errs[0] \
            and (n == len(images) or (r.rc == 2 and n == 0))  # refused up front, or the records all printed
        ok &= good
        seen.append(f"{label}: exit {r.rc}, {n} record(s), {short(errs[0] if errs else r.err, 80)!r}")
    return Outcome("one line naming the folder, no traceback; the predictions made are printed", "; ".join(seen), ok)


@item("8", "train --resume --backbone efficientnet_lite1 on a Lite0 run")
def resume_backbone(ws: Workspace) -> Outcome:
    return _resume_refused(ws, "--backbone", "efficientnet_lite1", "(the run has efficientnet_lite0)")


def _resume_refused(ws: Workspace, flag: str, value: str, words: str) -> Outcome:
    run = ws.run_dir
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*")) if p.is_file()}
    r = cli("train", "--out", run, "--resume", flag, value, "--workers", 0, "--quiet")
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*")) if p.is_file()}
    errs = r.errors()
    return Outcome(f"refused in one line naming {flag}, run folder unchanged",
                   f"exit {r.rc}; {short(errs[0][errs[0].find('error:'):] if errs else r.err, 110)!r}; "
                   f"unchanged: {before == after}",
                   r.rc == 2 and len(r.lines()) == 1 and f"{flag} {value} {words}" in r.err and before == after)


# ---------------------------------------------------------------------------- DICOM a hospital sends


@item("9", "every transfer syntax a PACS commonly sends (pydicom-data files)")
def transfer_syntaxes(ws: Workspace) -> Outcome:
    files = {n: testdata(n) for n in SYNTAX_FILES}
    missing = [n for n, p in files.items() if p is None]
    if missing:
        return Outcome("all decode", f"not installed: {', '.join(missing)} (pip install pydicom-data)", False)
    r = cli("predict", ws.model, *files.values(), "--device", "cpu", "--no-scope-check")
    recs = {Path(rec["path"]).name: rec for rec in r.records() if rec.get("type") == "image"}
    failed = [n for n in SYNTAX_FILES if n not in recs or recs[n].get("prob_abnormal") is None]
    return Outcome(f"{len(SYNTAX_FILES)} files, each a prediction", f"exit {r.rc}; {len(SYNTAX_FILES) - len(failed)} "
                   f"predicted" + (f"; not: {', '.join(failed)}" if failed else ""), r.rc == 0 and not failed)


@item("10", "preprocess past a made-up TransferSyntaxUID", fast=True)
def odd_syntax(ws: Workspace) -> Outcome:
    import pydicom

    src = testdata("MR_small.dcm")
    if src is None:
        return Outcome("the file named unreadable, the good images cached", "pydicom's MR_small.dcm missing", False)
    data = manifest(ws.base / "odd-syntax", n=4)
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6"
    ds.save_as(data.parent / "odd.dcm", implicit_vr=False, little_endian=True)
    with open(data, "a") as f:
        f.write("odd.dcm,hand,0,s9\n")
    cache = ws.base / "odd-cache"
    r = cli("preprocess", data, "--out", cache, "--size", 32, "--workers", 1, "--quiet")
    status = {}
    with contextlib.suppress(OSError):
        status = {row["path"].rsplit("/", 1)[-1]: row["status"] for row in csv.DictReader(open(cache / "index.csv"))}
    named = [ln for ln in (r.out + r.err).splitlines() if "odd.dcm" in ln]
    ok = (r.rc in (0, 1) and sum(v == "ok" for v in status.values()) == 4 and status.get("odd.dcm") not in (None, "ok")
          and any("transfer syntax" in ln for ln in named) and not any("decoder" in ln for ln in named))
    return Outcome("the 4 good images cached, odd.dcm named as unreadable (not a missing decoder)",
                   f"exit {r.rc}; cached ok: {sum(v == 'ok' for v in status.values())}; odd.dcm: "
                   f"{status.get('odd.dcm')}; {short(named[0] if named else '-', 90)!r}", ok)


@item("11", "predict on a DICOM media folder (DICOMDIR, SR, RT plan, encapsulated PDF, one CR)")
def media_folder(ws: Workspace) -> Outcome:
    from pydicom.uid import generate_uid

    folder = ws.path("media")
    for name in ("DICOMDIR", "test-SR.dcm", "rtplan.dcm"):
        src = testdata(name)
        if src is None:
            return Outcome("non-images skipped, exit 0", f"pydicom's {name} missing", False)
        (folder / (name if name != "DICOMDIR" else "DICOMDIR")).write_bytes(src.read_bytes())
    (folder / "report.dcm").write_bytes(encapsulated_pdf())
    (folder / "cr.dcm").write_bytes(dicom_cr(generate_uid(), "P1", 3, "HAND"))
    r = cli("predict", ws.model, folder, "--device", "cpu", "--no-scope-check")
    recs = [rec for rec in r.records() if rec.get("type") == "image"]
    predicted = [rec for rec in recs if rec.get("prob_abnormal") is not None]
    skipped = [ln for ln in r.err.splitlines() if "skip" in ln.lower()]
    return Outcome("exit 0, the CR predicted, the 4 other objects listed as skipped",
                   f"exit {r.rc}; {len(predicted)} predicted; {len(skipped)} skip line(s); "
                   f"{len(r.errors())} error line(s)",
                   r.rc == 0 and len(predicted) == 1 and not r.errors() and "Traceback" not in r.err)


@item("12", "predict a DICOM whose header pydicom warns about")
def dicom_warnings(ws: Workspace) -> Outcome:
    src = testdata("SC_rgb_jpeg.dcm")
    if src is None:
        return Outcome("warnings name the file", "pydicom's SC_rgb_jpeg.dcm missing", False)
    r = cli("predict", ws.model, src, "--device", "cpu")
    raw = [ln for ln in r.err.splitlines() if "UserWarning" in ln or ln.lstrip().startswith("warnings.warn")]
    said = [ln for ln in r.err.splitlines() if "warning" in ln.lower() and ln not in raw]
    return Outcome("no raw pydicom UserWarning; each warning line names the file, once",
                   f"exit {r.rc}; raw: {len(raw)}; bonexray warnings: {len(said)}",
                   r.rc == 0 and not raw and all(src.name in ln for ln in said) and len(said) == len(set(said)))


@item("13", "multi-frame DICOM, multi-page TIFF, animated GIF")
def frames(ws: Workspace) -> Outcome:
    paths = []
    mf = testdata("emri_small.dcm")
    if mf is not None:
        paths.append(mf)
    pages = [Image.fromarray(radiograph_like(20 + i)) for i in range(3)]
    for fmt, suffix in (("TIFF", ".tif"), ("GIF", ".gif")):
        p = ws.base / f"three{suffix}"
        pages[0].save(p, format=fmt, save_all=True, append_images=pages[1:])
        paths.append(p)
    r = cli("predict", ws.model, *paths, "--device", "cpu", "--no-scope-check")
    told = [p.name for p in paths if any(p.name in ln and "frame" in ln for ln in r.err.splitlines())]
    return Outcome("each file: a line saying how many frames and which is read",
                   f"exit {r.rc}; said for {len(told)}/{len(paths)}: {', '.join(told)}",
                   r.rc == 0 and len(told) == len(paths) == 3)


# ---------------------------------------------------------------------------- clear messages


@item("14", "pacs analyze against a server answering an HTML login page", fast=True)
def pacs_html(ws: Workspace) -> Outcome:
    with HtmlPageServer() as portal:
        r = cli("pacs", "analyze", "--url", f"{portal.url}/portal", "--model", ws.base / "unused.ckpt", "--date",
                "20240101")
    line = r.lines()[0] if r.lines() else ""
    return Outcome("one line: not DICOMweb, HTTP 200 text/html, the page's start quoted",
                   f"exit {r.rc}; {short(line[line.find('error:'):], 120)!r}",
                   r.rc == 2 and len(r.lines()) == 1 and "Expecting value" not in r.err
                   and all(w in line for w in ("not DICOMweb", "text/html", "Sign in")))


@item("15", "a multipart upload cut off before its closing boundary")
def cut_upload(ws: Workspace) -> Outcome:
    import httpx

    part = (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + png_bytes(radiograph_like(1)) + b"\r\n")
    with serve(ws) as url:
        r = httpx.post(f"{url}/api/predict", content=part, timeout=30,
                       headers={"Content-Type": "multipart/form-data; boundary=b"})
    detail = r.json().get("detail", "") if r.headers.get("content-type", "").startswith("application/json") else r.text
    return Outcome("400 'incomplete upload ...'", f"{r.status_code} {short(detail, 100)!r}",
                   r.status_code == 400 and detail.startswith("incomplete upload"))


@item("16", "a ;-delimited manifest", fast=True)
def semicolons(ws: Workspace) -> Outcome:
    data = manifest(ws.base / "semicolon", n=4)
    data.write_text(data.read_text().replace(",", ";"))
    r = cli("preprocess", data, "--out", ws.base / "semicolon-cache", "--size", 32, "--workers", 1, "--quiet")
    line = r.lines()[0] if r.lines() else ""
    return Outcome("one line naming the delimiter", f"exit {r.rc}; {short(line[line.find('error:'):], 120)!r}",
                   r.rc == 2 and len(r.lines()) == 1 and "semicolon" in line)


@item("17", "a 20000 x 20000 PNG header (decompression bomb) uploaded to serve")
def bomb(ws: Workspace) -> Outcome:
    import struct
    import zlib

    import httpx

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    with serve(ws) as url:
        r = httpx.post(f"{url}/api/predict", files=[("files", ("bomb.png", data, "image/png"))], timeout=30)
    text = r.text
    return Outcome("refused quoting bonexray's max_pixels (40,000,000), not Pillow's limit",
                   f"{r.status_code} {short(text, 120)!r}",
                   "40,000,000" in text and "178,956,970" not in text and "89,478,485" not in text)


# ---------------------------------------------------------------------------- cosmetic


@item("18", "a model card with body parts 'hand\\nleg' and '<script>'")
def card_names(ws: Workspace) -> Outcome:
    import torch

    from bonexray.model.checkpoint import CARD_KEY, stamp_weights_sha256

    seen, ok = [], True
    for name in ("hand\nleg", "<script>alert(1)</script>"):
        ckpt = torch.load(ws.model, map_location="cpu", weights_only=True)
        ckpt[CARD_KEY] = {**ckpt[CARD_KEY], "body_parts": [name, *ckpt[CARD_KEY]["body_parts"][1:]]}
        stamp_weights_sha256(ckpt)  # a consistent hash: only the names are wrong
        path = ws.base / f"card-{len(seen)}.ckpt"
        torch.save(ckpt, path)
        r = cli("predict", path, ws.base / "train-data" / "img000.png", "--format", "csv", "--device", "cpu")
        good = r.rc == 2 and len(r.lines()) == 1 and "not a plain name" in r.err and not r.out
        ok &= good
        seen.append(f"{name!r}: exit {r.rc}, {short(r.err[r.err.find('error:'):], 70)!r}")
    return Outcome("the model refused in one line, nothing printed", "; ".join(seen), ok)


@item("19", "a non-UTF-8 file name (caf\\xe9.png) in JSON and CSV")
def non_utf8(ws: Workspace) -> Outcome:
    folder = ws.path("names")
    raw = os.fsencode(folder) + b"/caf\xe9.png"
    with open(raw, "wb") as f:
        f.write(png_bytes(radiograph_like(3)))
    name = os.fsdecode(raw)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    seen, ok = [], True
    for fmt in ("json", "csv"):
        p = subprocess.run([sys.executable, "-c", CLI, "predict", str(ws.model), name, "--format", fmt, "--device",
                            "cpu", "--no-scope-check"], env=full_env, capture_output=True, timeout=600)
        try:
            text = p.stdout.decode("utf-8")
            shown = json.loads(text.splitlines()[0])["path"] if fmt == "json" else text
            valid = "caf\\xe9.png" in shown and not any(0xD800 <= ord(c) <= 0xDFFF for c in shown)
        except (UnicodeDecodeError, ValueError, IndexError, KeyError):
            valid = False
        ok &= p.returncode == 0 and valid
        seen.append(f"{fmt}: exit {p.returncode}, UTF-8 with the byte escaped: {valid}")
    return Outcome("exit 0; the name escaped as caf\\xe9.png, output valid UTF-8, no surrogates", "; ".join(seen), ok)


@item("20", "Content-Security-Policy of /docs and /openapi.json")
def docs_csp(ws: Workspace) -> Outcome:
    import httpx

    with serve(ws) as url:
        got = {p: httpx.get(f"{url}{p}", timeout=30) for p in ("/docs", "/openapi.json")}
    csp = {p: r.headers.get("content-security-policy", "") for p, r in got.items()}
    scripts = next((d for d in csp["/docs"].split(";") if d.strip().startswith("script-src")), "")
    ok = all(r.status_code == 200 for r in got.values()) and "default-src 'none'" in csp["/openapi.json"] \
        and scripts and "'unsafe-inline'" not in scripts and "*" not in scripts
    return Outcome("both 200 with a CSP; /docs scripts without 'unsafe-inline'",
                   "; ".join(f"{p} {r.status_code} CSP {short(csp[p], 60)!r}" for p, r in got.items()), bool(ok))


# ---------------------------------------------------------------------------- the server


_SERVER: dict = {}


@contextlib.contextmanager
def serve(ws: Workspace):
    """A real ``bonexray serve`` of the tiny model on a free loopback port (one per run, kept for every item)."""
    if "url" not in _SERVER:
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        log = open(ws.base / "serve.log", "wb")
        proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", str(ws.model), "--port", str(port), "--device",
                                 "cpu"], env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        _SERVER.update(proc=proc, url=url, log=log)
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited {proc.returncode}: {(ws.base / 'serve.log').read_text()[-400:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        else:
            raise RuntimeError("serve did not answer /healthz within 180 s")
    yield _SERVER["url"]


def stop_server() -> None:
    proc = _SERVER.pop("proc", None)
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        _SERVER.pop("log").close()
        _SERVER.clear()


# ---------------------------------------------------------------------------- entry point


def run_items(keys: list[str] | None = None, fast_only: bool = False, base: Path | None = None,
              echo: Callable[[str], None] = print) -> dict[str, Outcome]:
    """Run the chosen items (all by default) in a temporary folder; one printed line each; their outcomes."""
    chosen = [it for it in ITEMS if (keys is None or it[0] in keys) and (it[2] or not fast_only)]
    results: dict[str, Outcome] = {}
    with tempfile.TemporaryDirectory(prefix="bonexray-adversarial-", dir=base) as tmp:
        ws = Workspace(Path(tmp))
        try:
            for key, title, _, fn in chosen:
                try:
                    outcome = fn(ws)
                except Exception as err:  # noqa: BLE001 - the harness itself failing is a FAIL, said so
                    outcome = Outcome("-", f"the check itself failed: {type(err).__name__}: {short(err, 200)}", False)
                results[key] = outcome
                verdict = "SKIP" if outcome.ok is None else "PASS" if outcome.ok else "FAIL"
                echo(f"{key:>2} | {title} | expected: {outcome.expected} | observed: {outcome.observed} | {verdict}")
        finally:
            stop_server()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="comma-separated item numbers (default: all)")
    p.add_argument("--fast", action="store_true", help="only the items that need no model or server")
    args = p.parse_args(argv)
    keys = args.only.split(",") if args.only else None
    results = run_items(keys, args.fast)
    failed = [k for k, o in results.items() if o.ok is False]
    skipped = [k for k, o in results.items() if o.ok is None]
    print(f"{len(results) - len(failed) - len(skipped)} PASS, {len(failed)} FAIL"
          + (f" ({', '.join(failed)})" if failed else "") + (f", {len(skipped)} SKIP ({', '.join(skipped)})"
                                                              if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
