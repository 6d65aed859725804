"""Shared test helpers. Keep this small: fixtures used by one test file belong in that file."""
from __future__ import annotations

from pathlib import Path

import pytest

# Real radiographs (FracAtlas, DICOM) live next to the repository, never inside it: ../shared/data.
SHARED_DATA: Path = Path(__file__).resolve().parents[1].parent / "shared" / "data"

requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"real test data not found at {SHARED_DATA} (see shared/data/README.md)",
)
