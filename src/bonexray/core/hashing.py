"""SHA-256 of a file or of bytes: the one definition every integrity check uses."""
from __future__ import annotations

import hashlib
import os

_BLOCK = 1 << 20


def file_sha256(path: str | os.PathLike, prefix: bytes = b"") -> str:
    """Hex SHA-256 of ``prefix`` followed by the file's bytes, read in blocks."""
    h = hashlib.sha256(prefix)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()
