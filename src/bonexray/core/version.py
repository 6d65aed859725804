"""The package version: a leaf module (the torch-free core stamps it on model cards)."""
__version__ = "0.1.0"
