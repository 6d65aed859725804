"""The torch-free core: decisions and types every front end shares (no torch, no sklearn here)."""
