"""Fetch open datasets. FracAtlas is open (CC BY 4.0, figshare); MURA needs registration."""
from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from ..core.hashing import file_sha256
from ..errors import DatasetError
from .fracatlas import find_fracatlas_root

FRACATLAS_URL = "https://figshare.com/ndownloader/files/43283628"  # figshare article 22363012
#: SHA-256 of the FracAtlas release zip, checked before unpacking. None: no authoritative value was
#: available when this was written (figshare publishes MD5 only, and the release could not be fetched
#: from the development machine); until it is set, pass --sha256, and every download prints the
#: SHA-256 it got so a maintainer can pin it here.
FRACATLAS_SHA256: str | None = None

MURA_HELP = """\
MURA cannot be downloaded automatically: Stanford requires you to register and accept its
research-use agreement.
  1. Request access at https://stanfordmlgroup.github.io/competitions/mura/
  2. Download MURA-v1.1.zip from the link you receive and unzip it so you have
       ./data/MURA-v1.1/train_image_paths.csv  (and train/, valid/, the other CSVs)
     (any folder works: pass it with --data PATH/TO/MURA-v1.1)
  3. Check it: bonexray preprocess ./data/MURA-v1.1 --out ./cache/mura
"""


def default_data_home() -> Path:
    base = os.environ.get("BONEXRAY_DATA") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bonexray", "datasets"
    )
    return Path(base)


def _fetch(url: str, dest: Path, progress: bool = True, timeout: float = 60.0) -> None:
    tmp = dest.with_name(dest.name + ".part")
    req = urllib.request.Request(url, headers={"User-Agent": "bonexray"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(tmp, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", disable=not progress) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        if total is not None and tmp.stat().st_size != total:
            raise DatasetError(f"download of {url} is incomplete ({tmp.stat().st_size} of {total} bytes); run again")
    except ValueError as e:  # urllib's "unknown url type" and other malformed URLs
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"cannot download {url!r}: {e}") from e
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise DatasetError(
            f"could not download {url}: {reason}. Are you offline? Download it by hand and unzip it, "
            f"then pass the folder with --data"
        ) from e
    os.replace(tmp, dest)


def _safe_extract(zip_path: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise DatasetError(f"{zip_path}: corrupt member {bad}; delete the file and download again")
            root = dest.resolve()
            for m in zf.infolist():
                target = (dest / m.filename).resolve()
                if root not in target.parents and target != root:
                    raise DatasetError(f"{zip_path}: unsafe path in archive: {m.filename}")
            zf.extractall(dest)
    except zipfile.BadZipFile as e:
        raise DatasetError(f"{zip_path}: not a valid zip archive ({e}); delete it and download again") from e




def download_fracatlas(dest: str | Path | None = None, url: str | None = None, sha256: str | None = None,
                       progress: bool = True, report=print) -> Path:
    """Download, verify and unpack FracAtlas into ``dest``; returns the folder holding dataset.csv.

    ``url`` defaults to :data:`FRACATLAS_URL`, ``sha256`` to :data:`FRACATLAS_SHA256`; a mismatch
    deletes the zip and refuses. ``report`` receives the one line saying what was verified.
    """
    url = url or FRACATLAS_URL
    expected = (sha256 or FRACATLAS_SHA256 or "").strip().lower() or None
    if expected is not None and (len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected)):
        raise DatasetError(f"--sha256 {sha256!r}: not a SHA-256 (64 hexadecimal digits)")
    dest = Path(dest) if dest else default_data_home()
    if dest.exists() and not dest.is_dir():
        raise DatasetError(f"--dest {dest}: exists and is not a folder")
    dest.mkdir(parents=True, exist_ok=True)
    existing = find_fracatlas_root(dest)
    if existing:
        return existing
    final = dest / "FracAtlas"
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        # Not a FracAtlas tree (find_fracatlas_root said so): someone else's folder, never replaced.
        raise DatasetError(f"{final}: exists and is not a FracAtlas tree (no dataset.csv with images/); "
                           "move it away or choose another --dest")
    zip_path = dest / "FracAtlas.zip"
    fetched = not zip_path.is_file()
    if fetched:
        _fetch(url, zip_path, progress=progress)
    got = file_sha256(zip_path)
    if expected is not None and got != expected:
        if fetched:
            zip_path.unlink()
            raise DatasetError(f"{zip_path}: SHA-256 mismatch (expected {expected}, got {got}); deleted it. "
                               "Download again; if it persists, the file on the server differs from the pinned release")
        raise DatasetError(f"{zip_path}: SHA-256 mismatch (expected {expected}, got {got}); it was there before this "
                           "download, so it is kept: move it away to download the pinned release")
    report(f"{zip_path.name}: SHA-256 {got} " + ("(verified)" if expected else
           "(not verified: no pinned value; pass --sha256 to check it; the zip's CRCs are checked)"))
    staging = dest / ".unpack"
    shutil.rmtree(staging, ignore_errors=True)
    _safe_extract(zip_path, staging)
    found = next((p.parent for p in sorted(staging.rglob("dataset.csv")) if (p.parent / "images").is_dir()), None)
    if found is None:
        shutil.rmtree(staging, ignore_errors=True)
        raise DatasetError(f"{zip_path}: archive has no FracAtlas dataset.csv with images/; is it the right file?")
    if final.is_dir():
        final.rmdir()  # empty (checked above)
    os.replace(found, final)
    shutil.rmtree(staging, ignore_errors=True)
    zip_path.unlink(missing_ok=True)
    return final
