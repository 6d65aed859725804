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


def tiny_train_args(data, out, **overrides) -> dict:
    """Arguments for a seconds-long CPU training run (tiny net input, few images)."""
    args = dict(data=str(data), out=str(out), cache=str(Path(out).parent / f"{Path(out).name}-cache"),
                backbone="efficientnet_lite0", pretrained="none", image_size=64, epochs=2, batch_size=8,
                workers=0, quiet=True, seed=0, valid_frac=0.25, test_frac=0.25)
    args.update(overrides)
    return args


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A model trained for 2 epochs on a synthetic 48-image manifest: run dir + its training result."""
    from builders import make_manifest

    from bonexray.training.train import TrainConfig, run_training

    base = tmp_path_factory.mktemp("trained")
    manifest = make_manifest(base / "data", n=48, parts=("hand", "leg", "shoulder"))
    result = run_training(TrainConfig.from_args(tiny_train_args(manifest, base / "run")))
    result["manifest"] = str(manifest)
    return result


@pytest.fixture(scope="session")
def trained_checkpoint(trained_run) -> Path:
    """Path of best.ckpt of ``trained_run`` (a real, briefly trained bonexray checkpoint)."""
    return Path(trained_run["best_checkpoint"])
