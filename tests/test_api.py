"""The Python API (bonexray.load_model / Model.predict / load_dataset), starting with the README's example."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bonexray
from bonexray.cli import main
from bonexray.errors import BonexrayError, CheckpointError, ImageReadError
from builders import make_checkpoint, make_fracatlas_tree, radiograph_like
from conftest import SHARED_DATA

README = Path(__file__).resolve().parents[1] / "README.md"
REAL_JPEG = SHARED_DATA / "FracAtlas" / "images" / "Fractured" / "IMG0000019.jpg"


def readme_example() -> str:
    """The first python block under the README's "Python API" heading."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def example_dir(tmp_path, monkeypatch) -> Path:
    """A folder holding what the example names: a checkpoint, xray.png and data/FracAtlas."""
    make_checkpoint(tmp_path / "runs" / "fa" / "checkpoints" / "best.ckpt", body_parts=("hand", "leg"), threshold=0.4)
    # A real radiograph when ../shared/data is there, a synthetic one otherwise (the API is the same).
    gray = np.asarray(Image.open(REAL_JPEG).convert("L")) if REAL_JPEG.is_file() else radiograph_like(1, 120, 90)
    Image.fromarray(gray).save(tmp_path / "xray.png")
    make_fracatlas_tree(tmp_path / "data", n_groups=4, per_group=2)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_example_runs_verbatim_and_matches_the_cli(example_dir, capsys):
    code = readme_example()
    assert len([ln for ln in code.splitlines() if ln.strip()]) == 6
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - the README's own example
    printed = capsys.readouterr().out.splitlines()
    model, result = scope["model"], scope["result"]
    assert isinstance(result, bonexray.Prediction) and result.path == "xray.png"
    assert 0.0 <= result.prob_abnormal <= 1.0 and result.abnormal == (result.prob_abnormal >= 0.4)
    assert model.threshold == 0.4 and model.card.body_parts == ["hand", "leg"]
    assert list(result.body_part_probs) == ["hand", "leg"] and sum(result.body_part_probs.values()) == pytest.approx(1.0)
    assert result.body_part == max(result.body_part_probs, key=result.body_part_probs.get)
    assert printed[0].startswith(f"{result.prob_abnormal} {result.abnormal} {result.body_part}")
    assert printed[1] == "None"  # this model has no box head: boxes are None, not an empty list
    assert "'images': 8" in printed[2]  # the dataset summary

    # Same numbers as `bonexray predict` on the same file.
    assert main(["predict", "runs/fa/checkpoints/best.ckpt", "xray.png"]) == 0
    rec = json.loads(capsys.readouterr().out.splitlines()[0])
    assert rec["prob_abnormal"] == pytest.approx(result.prob_abnormal, abs=1e-6)
    assert rec["body_part"] == result.body_part and rec["abnormal"] == result.abnormal


def test_lists_arrays_pil_images_and_folders(example_dir):
    model = bonexray.load_model("runs/fa/checkpoints/best.ckpt", device="cpu")
    gray = np.asarray(Image.open("xray.png"))
    Image.fromarray(radiograph_like(7, 80, 100, abnormal=1)).save(example_dir / "other.png")
    results = model.predict(["xray.png", gray, Image.open("xray.png"), "other.png"], batch_size=3)
    assert [r.path for r in results] == ["xray.png", None, None, "other.png"]
    # A decoded array or PIL image gives what its file gives (up to float noise between batch positions).
    assert results[1].prob_abnormal == pytest.approx(results[0].prob_abnormal, abs=1e-6)
    assert results[2].prob_abnormal == pytest.approx(results[0].prob_abnormal, abs=1e-6)
    assert abs(results[3].prob_abnormal - results[0].prob_abnormal) > 1e-4
    folder = model.predict(str(example_dir / "data" / "FracAtlas" / "images"))
    assert len(folder) == 8 and all(r.path.endswith(".jpg") for r in folder)
    assert "efficientnet_lite0" in repr(model)


def test_bad_inputs_are_clear_errors(example_dir):
    model = bonexray.load_model("runs/fa/checkpoints/best.ckpt", device="cpu")
    with pytest.raises(ImageReadError, match="missing.png.*not found"):
        model.predict("missing.png")
    with pytest.raises(BonexrayError, match="2-D grayscale"):
        model.predict(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(BonexrayError, match="cannot predict a dict"):
        model.predict({"x": 1})
    with pytest.raises(BonexrayError, match="checkpoint file not found"):
        bonexray.load_model("nothing.ckpt")


def test_import_bonexray_stays_light():
    code = "import sys, bonexray; bonexray.__version__; print(sorted(m for m in ('torch', 'timm', 'numpy', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bonexray.nope  # noqa: B018


# --------------------------------------------------------------------------- refusals: no verdict, no image


def test_load_model_on_a_folder_says_folder(tmp_path):
    import bonexray

    with pytest.raises(CheckpointError, match="is a folder"):
        bonexray.load_model(tmp_path)


def test_api_gives_no_verdict_for_nan_output(images, tmp_path):
    import bonexray

    nan_ckpt = make_checkpoint(tmp_path / "nan.ckpt", body_parts=("hand", "wrist"), nan_output=True)
    model = bonexray.load_model(nan_ckpt, device="cpu")
    with pytest.raises(BonexrayError, match="not a finite number.*no verdict"):
        model.predict(images[0])
    with pytest.raises(BonexrayError, match=r"image 0 \(ndarray\): the model's output is not a finite number"):
        model.predict(radiograph_like(1))


@pytest.mark.parametrize("array,words", [
    (np.full((40, 40), np.nan), "NaN or infinite"),
    (np.where(np.eye(40) > 0, np.inf, 1.0), "NaN or infinite"),
    (np.full((40, 40), "a"), "must hold real numbers"),
    (np.full((40, 40), None, dtype=object), "must hold real numbers"),
    (np.ones((40, 40), dtype=complex), "must hold real numbers"),
])
def test_api_refuses_arrays_that_are_no_image(array, words, good_ckpt):
    import bonexray

    model = bonexray.load_model(good_ckpt, device="cpu")
    with pytest.raises(BonexrayError, match=words):
        model.predict(array)


def test_api_skips_hidden_files_like_predict(good_ckpt, images):
    import bonexray

    folder = images[0].parent
    Image.fromarray(radiograph_like(9)).save(folder / ".hidden.png")
    model = bonexray.load_model(good_ckpt, device="cpu")
    with pytest.warns(UserWarning, match="skipped"):
        preds = model.predict(folder)
    assert [p.path for p in preds] == [str(p) for p in images]
