"""What ``bonexray predict`` reads: PATHs (images, DICOM, folders, MURA study folders) -> an
:class:`InputPlan` of images to predict, errors to report and files skipped with a reason.
Every file met in a folder is either an item or named in ``errors`` / ``skipped``.
"""
from __future__ import annotations

import errno
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data.imageio import is_image_file


@dataclass
class InputItem:
    path: Path  # as the user spelled it (joined with the relative path inside a folder)
    study: str | None = None  # parent folder, when this image belongs to an aggregated study


@dataclass
class InputPlan:
    items: list[InputItem] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): counted as failures
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why): named, not failures


_STUDY_DIR = re.compile(r"^study\d+(_(positive|negative))?$", re.IGNORECASE)


def _unreachable(p: Path) -> str | None:
    """Why ``p`` cannot be opened (symlink loop, broken link, missing), or None when it can."""
    try:
        os.stat(p)
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop (too many levels of symbolic links)"
        if os.path.islink(p):
            return f"broken symlink (its target {os.readlink(p)} does not exist)"
        if err.errno == errno.ENOENT:
            return "no such file or directory"
        return err.strerror or str(err)


def _walk_images(folder: Path, plan: InputPlan) -> list[Path]:
    """Images under ``folder`` (sorted); every other file is recorded in ``plan`` as skipped or failed.

    Folder symlinks are followed once; one that points back to a folder it is in is a loop (failed).
    """
    found: list[Path] = []
    visited: set[str] = set()

    def unreadable_folder(err: OSError) -> None:
        plan.errors.append((str(err.filename or folder), f"cannot read folder ({err.strerror or err})"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable_folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # reached again through a link: its files are already in the list
            dirnames[:] = []
            continue
        visited.add(real)
        keep = []
        for d in sorted(dirnames):
            sub = Path(dirpath) / d
            if d.startswith("."):
                plan.skipped.append((str(sub), "hidden folder, not searched"))
            elif os.path.islink(sub) and (real + os.sep).startswith(os.path.realpath(sub) + os.sep):
                plan.errors.append((str(sub), f"symlink loop (points back to {os.path.realpath(sub)}, a folder it is in)"))
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            p = Path(dirpath) / name
            problem = _unreachable(p)
            if problem is not None:
                plan.errors.append((str(p), problem))
            elif name.startswith("."):
                plan.skipped.append((str(p), "hidden file"))
            elif p.is_file() and is_image_file(p):
                found.append(p)
            else:
                plan.skipped.append((str(p), f"not an image file ({p.suffix or 'no suffix'})"))
    return sorted(found, key=lambda p: p.parts)


def collect_inputs(paths: Sequence[str | os.PathLike], study: bool = False) -> InputPlan:
    """Expand PATHs into images (files as given, folders recursively and sorted).

    A MURA-style study folder (``studyN`` or ``studyN_positive/negative``, holding its images
    directly) is aggregated even without ``study``; with ``study`` every image is aggregated by
    its parent folder. Other folders (e.g. FracAtlas' ``images/Fractured``) are not studies.
    The same file reached twice is predicted once.
    """
    plan = InputPlan()
    seen: set[str] = set()

    def add(p: Path, study_key: str | None) -> None:
        key = os.path.realpath(p)
        if key in seen:
            return
        seen.add(key)
        plan.items.append(InputItem(p, study_key))

    for raw in paths:
        p = Path(raw)
        problem = _unreachable(p)
        if problem is not None:
            plan.errors.append((str(raw), problem))
        elif p.is_dir():
            images = _walk_images(p, plan)
            if not images:
                plan.errors.append((str(raw), "no image files in this folder"))
                continue
            leaf = bool(_STUDY_DIR.match(p.name)) and all(img.parent == p for img in images)
            for img in images:
                add(img, str(img.parent) if (study or leaf) else None)
        else:
            add(p, str(p.parent) if study else None)
    return plan
