"""``bonexray serve``: a web page and a JSON API around one model (see :mod:`bonexray.web.app`)."""
from __future__ import annotations

__all__ = ["create_app"]


def create_app(*args, **kwargs):
    """:func:`bonexray.web.app.create_app`, imported lazily (FastAPI and torch load on first use)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
