"""The package version: a leaf module, so importing it pulls in nothing else of bonexray."""
__version__ = "0.1.0"
