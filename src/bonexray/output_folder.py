"""The one guard for what a command writes: ``--out`` folders and files, checked before any work.

A command claims its output folder with :func:`claim_folder`. The folder may be new, empty, or one
that the same command wrote before: it holds the marker file ``.bonexray-out.json``, naming the
command and the files it writes (folders from before the marker are recognised by a ``legacy`` test
where the command has one, e.g. a run directory's ``config.yaml``). Anything else is refused in one
line that names the folder and ``--overwrite``. Whatever the flags, a command never writes over one
of its own inputs (``--data``, the checkpoint): that is refused even with ``--overwrite``.
A single output file (``export --out model.onnx``) is claimed with :func:`claim_file` the same way.

Torch-free, so every command can check before it loads a model.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Callable, Iterable

from ._version import __version__
from .atomic import atomic_write_text
from .errors import BonexrayError

#: The marker file a command leaves in a folder it writes.
MARKER = ".bonexray-out.json"
#: Files a folder may hold without counting as content: the marker and the cache build's lock.
BOOKKEEPING = frozenset({MARKER, ".bonexray.lock"})


def _resolved(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(p)))


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker's content (``{"command", "files", ...}``), or None when there is none or it is unreadable."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("command"), str) else None


def check_writable_folder(path: str | os.PathLike, flag: str) -> Path:
    """Refuse a folder that is a file, or cannot be created or written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise BonexrayError(f"{flag} {p}: exists and is not a folder")
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BonexrayError(f"{flag} {p}: cannot create it, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BonexrayError(f"{flag} {p}: no permission to write in {existing}")
    return p


def refuse_overwriting_inputs(folder: str | os.PathLike, files: Iterable[str], inputs: Iterable[str | os.PathLike],
                              flag: str = "--out") -> None:
    """Refuse, with or without --overwrite, when one of the ``files`` a command writes into ``folder`` is one
    of its ``inputs`` (a manifest, an image of the dataset, a checkpoint)."""
    _refuse_inputs([Path(folder) / f for f in files], inputs, flag, Path(folder))


def _refuse_inputs(targets: Iterable[Path], inputs: Iterable[str | os.PathLike], flag: str, where: Path) -> None:
    wanted = {_resolved(t): t for t in targets}
    for given in inputs:
        if given is None:
            continue
        hit = wanted.get(_resolved(given))
        if hit is not None:
            raise BonexrayError(f"{flag} {where}: would write {hit.name} over the input {given}; choose another {flag} "
                                "(--overwrite never replaces a command's own input)")


def claim_folder(path: str | os.PathLike, command: str, files: Iterable[str], *, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike] = (), legacy: Callable[[Path], bool] | None = None,
                 flag: str = "--out", write_marker: bool = True, create: bool = True, hint: str | None = None) -> Path:
    """Check ``path`` for ``command`` (e.g. ``"evaluate"``), which writes ``files`` (names relative to the
    folder) and reads ``inputs``; then create the folder and write the marker. Returns the folder.

    Refused: a path that is a file or not writable; an output name that is one of ``inputs`` (always);
    without ``overwrite``, a non-empty folder without this command's marker (and not ``legacy``), and a
    file the command would write that its earlier runs did not write (the marker lists those).
    ``write_marker=False`` checks only (for processes other than the one that writes).
    ``create=False`` leaves a folder that does not exist yet alone (a command that fails before writing
    leaves nothing behind); the command then calls :func:`mark_folder` once it has made the folder.
    ``hint`` replaces the refusal's advice (default: a new or empty folder, or --overwrite).
    """
    folder = check_writable_folder(path, flag)
    files = list(files)
    _refuse_inputs([folder / f for f in files], inputs, flag, folder)
    marker = read_marker(folder) if folder.is_dir() else None
    entries = [e.name for e in folder.iterdir() if e.name not in BOOKKEEPING] if folder.is_dir() else []
    hint = hint or f"choose a new or empty {flag}, or pass --overwrite to write into it"
    if entries and not overwrite:
        if marker is None and not (legacy is not None and legacy(folder)):
            raise BonexrayError(f"{flag} {folder}: not empty and not written by `bonexray {command}` (no {MARKER}); "
                                f"{hint}")
        if marker is not None and marker["command"] != command:
            raise BonexrayError(f"{flag} {folder}: holds the output of `bonexray {marker['command']}`, not of "
                                f"`bonexray {command}`; {hint}")
        if marker is not None:
            made = set(marker.get("files") or ())
            foreign = [f for f in files if f not in made and (folder / f).exists()]
            if foreign:
                raise BonexrayError(f"{flag} {folder}: {', '.join(foreign)} were not written by `bonexray {command}`; "
                                    f"{hint}")
    if write_marker and (create or folder.is_dir()):
        mark_folder(folder, command, files)
    return folder


def mark_folder(folder: str | os.PathLike, command: str, files: Iterable[str]) -> None:
    """Create ``folder`` if needed and record that ``command`` writes ``files`` there (the marker)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = read_marker(folder)
    before = set((marker or {}).get("files") or ()) if (marker or {}).get("command") == command else set()
    atomic_write_text(folder / MARKER, json.dumps({
        "command": command, "files": sorted(before | set(files)), "bonexray_version": __version__,
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }, indent=2) + "\n")


def claim_file(path: str | os.PathLike, command: str, *, overwrite: bool = False,
               inputs: Iterable[str | os.PathLike] = (), ours: Callable[[Path], bool] | None = None,
               flag: str = "--out") -> Path:
    """Check a single output file: never one of ``inputs``; an existing file only if ``ours`` says the
    command wrote it (e.g. an ONNX file with a bonexray model card), or with ``overwrite``."""
    target = Path(path)
    check_writable_folder(target.parent if str(target.parent) else ".", flag)
    if target.is_dir():
        raise BonexrayError(f"{flag} {target}: is a folder")
    _refuse_inputs([target], inputs, flag, target)
    if target.exists() and not overwrite and not (ours is not None and ours(target)):
        raise BonexrayError(f"{flag} {target}: exists and was not written by `bonexray {command}`; choose another "
                            f"{flag}, or pass --overwrite to replace it")
    return target
