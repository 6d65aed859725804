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


#: Fixtures that train a model: every test using them is slow.
_TRAINING_FIXTURES = {"trained_run", "trained_checkpoint"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _isolated_user_dirs(tmp_path_factory):
    """Keep the per-user cache and dataset folders of the test run out of the real home directory."""
    import os

    base = tmp_path_factory.mktemp("home")
    old = {k: os.environ.get(k) for k in ("BONEXRAY_CACHE", "BONEXRAY_DATA")}
    os.environ["BONEXRAY_CACHE"] = str(base / "cache")
    os.environ["BONEXRAY_DATA"] = str(base / "datasets")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def tiny_train_args(data, out, **overrides) -> dict:
    """Arguments for a seconds-long CPU training run (tiny net input, few images)."""
    args = dict(data=str(data), out=str(out), cache=str(Path(out).parent / f"{Path(out).name}-cache"),
                backbone="efficientnet_lite0", pretrained="none", image_size=64, epochs=2, batch_size=8,
                workers=0, quiet=True, seed=0, valid_frac=0.25, test_frac=0.25)
    args.update(overrides)
    return args


def cli_argv(args: dict) -> list[str]:
    """``tiny_train_args``-style keyword arguments as `bonexray train` flags (True: a bare flag; None/False: left out)."""
    out = []
    for k, v in args.items():
        if v is True:
            out.append(f"--{k.replace('_', '-')}")
        elif v not in (None, False):
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> Path:
    """An untrained, intact checkpoint of make_manifest's body parts (hand, wrist): to damage, edit or run."""
    from builders import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("models") / "good.ckpt", body_parts=("hand", "wrist"))


@pytest.fixture
def images(tmp_path) -> list[Path]:
    """Two good radiograph-like PNGs, tmp_path/in/good0.png and good1.png."""
    from builders import radiograph_like
    from PIL import Image

    out = []
    for i in range(2):
        p = tmp_path / "in" / f"good{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(radiograph_like(i)).save(p)
        out.append(p)
    return out


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
