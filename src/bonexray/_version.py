"""The package version, importable from its old place; the literal is in :mod:`bonexray.core.version`."""
from .core.version import __version__

__all__ = ["__version__"]
