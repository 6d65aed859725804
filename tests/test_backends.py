"""The default inference engine: a checkpoint runs through its cached ONNX export, with torch's answers."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from builders import nonblank_lines, radiograph_like, run_main
from conftest import SHARED_DATA, requires_shared_data

from bonexray.cli import main
from bonexray.data.preprocess import letterbox, load_for_model
from bonexray.inference import backends
from bonexray.inference.predictor import Predictor

PROB_TOL = 1e-4


@pytest.fixture()
def ckpt(trained_checkpoint, tmp_path) -> Path:
    """A private copy of the trained checkpoint, so the export cached beside it is this test's own."""
    target = tmp_path / "run" / "best.ckpt"
    target.parent.mkdir()
    shutil.copy(trained_checkpoint, target)
    return target


def _synthetic(size: int, n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(1)
    tiles = [letterbox(radiograph_like(i, 120 + 10 * i, 90, abnormal=i % 2), size) for i in range(n - 2)]
    tiles += [rng.integers(0, 256, (size, size), dtype=np.uint8), np.zeros((size, size), np.uint8)]
    return np.stack(tiles)


def _assert_same_probs(a: Predictor, b: Predictor, batch: np.ndarray) -> None:
    pa, ba = a.predict_arrays(batch)
    pb, bb = b.predict_arrays(batch)
    assert np.max(np.abs(pa - pb)) <= PROB_TOL
    assert np.max(np.abs(ba - bb)) <= PROB_TOL


def test_default_backend_is_onnx_on_cpu_and_matches_torch(ckpt):
    fast, ref = Predictor(ckpt, device="cpu"), Predictor(ckpt, device="cpu", backend="torch")
    assert (fast.backend, ref.backend) == ("onnx", "torch")
    assert fast.card == ref.card
    batch = _synthetic(fast.image_size)
    _assert_same_probs(fast, ref, batch)
    # One image at a time (batch 1) and with flip TTA too.
    _assert_same_probs(fast, ref, batch[:1])
    _assert_same_probs(Predictor(ckpt, device="cpu", tta="flip"), Predictor(ckpt, device="cpu", tta="flip", backend="torch"),
                       batch)


@requires_shared_data
def test_default_backend_matches_torch_on_real_radiographs(ckpt):
    fast, ref = Predictor(ckpt, device="cpu"), Predictor(ckpt, device="cpu", backend="torch")
    jpegs = sorted((SHARED_DATA / "FracAtlas" / "images" / "Fractured").glob("*.jpg"))[:4]
    jpegs += sorted((SHARED_DATA / "FracAtlas" / "images" / "Non_fractured").glob("*.jpg"))[:4]
    dicoms = sorted(p for p in (SHARED_DATA / "dicom").rglob("*") if p.is_file() and p.suffix.lower() in ("", ".dcm"))[:2]
    batch = np.stack([load_for_model(p, fast.image_size)[0] for p in jpegs + dicoms])
    _assert_same_probs(fast, ref, batch)


def test_export_is_cached_beside_the_checkpoint_keyed_by_its_content(ckpt, monkeypatch):
    Predictor(ckpt, device="cpu")
    digest = backends.checkpoint_digest(ckpt)
    cached = ckpt.with_name(f"best.ckpt.{digest[:backends.DIGEST_CHARS]}.onnx")
    assert cached.is_file()
    assert [p.name for p in ckpt.parent.iterdir() if p.suffix == ".onnx"] == [cached.name]

    def no_export(*a, **k):
        raise AssertionError("exported again although the cached file fits")

    monkeypatch.setattr("bonexray.inference.export.export_onnx", no_export)
    assert Predictor(ckpt, device="cpu").backend == "onnx"
    # Another checkpoint's bytes -> another key: never the stale graph.
    with open(ckpt, "ab") as f:
        f.write(b"\0")
    assert backends.checkpoint_digest(ckpt) != digest
    with pytest.raises(AssertionError, match="exported again"):
        Predictor(ckpt, device="cpu")


def test_unwritable_checkpoint_folder_falls_back_to_user_cache_then_memory(ckpt, tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    user = tmp_path / "user-onnx"
    digest = backends.checkpoint_digest(ckpt)
    monkeypatch.setattr(backends, "onnx_cache_locations", lambda c, d: [blocked / "x.onnx", user / f"{d[:8]}.onnx"])
    pr = Predictor(ckpt, device="cpu")
    assert pr.backend == "onnx" and (user / f"{digest[:8]}.onnx").is_file()

    monkeypatch.setattr(backends, "onnx_cache_locations", lambda c, d: [blocked / "x.onnx", blocked / "y.onnx"])
    made = []
    real_mkdtemp = backends.tempfile.mkdtemp
    monkeypatch.setattr(backends.tempfile, "mkdtemp", lambda **k: made.append(real_mkdtemp(**k)) or made[-1])
    in_memory = Predictor(ckpt, device="cpu")
    assert in_memory.backend == "onnx"
    assert made and not os.path.exists(made[0])  # the scratch export is gone once loaded
    _assert_same_probs(in_memory, Predictor(ckpt, device="cpu", backend="torch"), _synthetic(pr.image_size, 3))


def test_failed_export_falls_back_to_torch_under_auto_only(ckpt, monkeypatch, capsys):
    from bonexray.errors import BonexrayError

    def broken(*a, **k):
        raise BonexrayError("ONNX export differs from the torch model")

    monkeypatch.setattr("bonexray.inference.export.export_onnx", broken)
    assert Predictor(ckpt, device="cpu").backend == "torch"
    assert "running it with PyTorch" in capsys.readouterr().err
    with pytest.raises(BonexrayError, match="differs"):
        Predictor(ckpt, device="cpu", backend="onnx")


def test_cam_gets_the_torch_network_of_an_onnx_run(ckpt):
    pr = Predictor(ckpt, device="cpu")
    assert pr.backend == "onnx" and pr._net is None  # not loaded unless needed
    assert pr.net is not None and pr.net.num_body_parts == len(pr.body_parts)


def test_backend_choice_on_the_command_line(ckpt, tmp_path, capsys):
    img = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(radiograph_like(3)).save(img)
    outs = {}
    for backend in ("torch", "onnx", "auto"):
        assert main(["predict", str(ckpt), str(img), "--backend", backend]) == 0
        outs[backend] = json.loads(capsys.readouterr().out.splitlines()[0])["prob_abnormal"]
    assert outs["onnx"] == pytest.approx(outs["torch"], abs=PROB_TOL) and outs["auto"] == outs["onnx"]
    onnx_file = next(ckpt.parent.glob("*.onnx"))
    assert main(["predict", str(onnx_file), str(img), "--backend", "torch"]) == 2
    assert "needs a checkpoint" in capsys.readouterr().err


def test_physical_cores_is_within_the_allowed_cpus():
    assert 1 <= backends.physical_cores() <= len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- OpenVINO and the backend record

@pytest.fixture()
def small_ckpt(tmp_path) -> Path:
    """A small untrained checkpoint of its own (no training run needed: these tests compare engines)."""
    from builders import make_checkpoint

    target = tmp_path / "model" / "best.ckpt"
    target.parent.mkdir()
    return make_checkpoint(target)


try:
    import openvino  # noqa: F401 - the dev extra installs it
    HAVE_OPENVINO = True
except ImportError:
    HAVE_OPENVINO = False
requires_openvino = pytest.mark.skipif(not HAVE_OPENVINO, reason="OpenVINO is not installed (pip install -e \".[openvino]\"); "
                                       "its absence is tested by test_explicit_unavailable_backend_*")
HAVE_BF16 = backends.cpu_has_bf16()
requires_bf16 = pytest.mark.skipif(not HAVE_BF16,
                                   reason="this CPU has no native bfloat16 (avx512_bf16 / amx_bf16): openvino-bf16 "
                                          "is refused here, as tested by test_explicit_unavailable_backend_*")


def _assert_same_outputs(a: Predictor, b: Predictor, batch: np.ndarray, tol: float) -> None:
    oa, ob = a.outputs(batch), b.outputs(batch)
    assert sorted(oa) == sorted(ob)
    for name in oa:
        assert oa[name].shape == ob[name].shape, name
        scale = max(1.0, float(np.max(np.abs(oa[name]))))  # untrained features can be large: relative beyond 1
        assert np.max(np.abs(oa[name] - ob[name])) <= tol * scale, name


@requires_openvino
def test_openvino_gives_onnxruntimes_outputs_at_every_batch_size(small_ckpt):
    ort, ov = Predictor(small_ckpt, device="cpu", backend="onnx"), Predictor(small_ckpt, device="cpu", backend="openvino")
    assert ov.backend == "openvino" and ov.card == ort.card
    batch = _synthetic(ort.image_size, 7)
    # One compiled model serves 7, 1 and 3 images in a row (the last batch of a run is smaller).
    for n in (7, 1, 3):
        _assert_same_outputs(ort, ov, batch[:n], PROB_TOL)
        _assert_same_probs(ort, ov, batch[:n])
    flipped = Predictor(small_ckpt, device="cpu", backend="openvino", tta="flip")
    _assert_same_probs(Predictor(small_ckpt, device="cpu", backend="onnx", tta="flip"), flipped, batch)


@requires_openvino
def test_openvino_runs_an_onnx_file_too(small_ckpt):
    onnx_file = backends.exported_onnx(small_ckpt).path
    ov = Predictor(onnx_file, device="cpu", backend="openvino")
    assert ov.backend == "openvino" and ov.checkpoint is None
    _assert_same_probs(Predictor(onnx_file, device="cpu"), ov, _synthetic(ov.image_size, 4))


@requires_openvino
@requires_bf16
def test_openvino_bf16_stays_close_to_float32(small_ckpt):
    ort, bf16 = Predictor(small_ckpt, device="cpu", backend="onnx"), Predictor(small_ckpt, device="cpu", backend="openvino-bf16")
    assert bf16.backend == "openvino-bf16"
    batch = _synthetic(ort.image_size, 6)
    pa, _ = ort.predict_arrays(batch)
    pb, _ = bf16.predict_arrays(batch)
    # bfloat16 keeps 8 bits of mantissa: close, not equal (the backend check measures real models).
    assert np.max(np.abs(pa - pb)) <= 0.05
    la, lb = ort.outputs(batch)["embedding"], bf16.outputs(batch)["embedding"]
    assert np.max(np.abs(la - lb)) > 1e-4 * max(1.0, float(np.abs(la).max()))  # bf16 did run, not float32


def _fake_record(model: Path, speeds: dict, accepted: dict, sha: str | None = None) -> None:
    from bonexray.model.hub import file_sha256

    record = {"format": backends.RECORD_FORMAT, "model_sha256": sha or file_sha256(model),
              "backends": {n: {"img_s": s, "accepted": accepted[n]} for n, s in speeds.items()}}
    backends.backend_record_path(model).write_text(json.dumps(record))


@requires_openvino
def test_auto_follows_the_record_of_this_exact_file_and_the_cpu(small_ckpt, monkeypatch):
    fast = {"onnx": 100.0, "openvino": 200.0, "openvino-bf16": 400.0}
    _fake_record(small_ckpt, fast, {"onnx": True, "openvino": True, "openvino-bf16": True})
    monkeypatch.setattr(backends, "cpu_has_bf16", lambda: True)
    assert backends.choose_backend("auto", "cpu", small_ckpt) == "openvino-bf16"
    if HAVE_BF16:  # compiling for bf16 needs the real thing
        assert Predictor(small_ckpt, device="cpu").backend == "openvino-bf16"
    monkeypatch.setattr(backends, "cpu_has_bf16", lambda: False)  # bf16 only where the CPU has it
    assert Predictor(small_ckpt, device="cpu").backend == "openvino"
    assert backends.choose_backend("auto", "cuda", small_ckpt) == "torch"  # a GPU keeps PyTorch
    # Refused engines, and engines the check measured slower than onnxruntime, are never chosen.
    _fake_record(small_ckpt, fast, {"onnx": True, "openvino": False, "openvino-bf16": False})
    assert Predictor(small_ckpt, device="cpu").backend == "onnx"
    _fake_record(small_ckpt, {"onnx": 100.0, "openvino": 80.0}, {"onnx": True, "openvino": True})
    assert Predictor(small_ckpt, device="cpu").backend == "onnx"
    # Nor one whose gain would not pay OpenVINO's compile time on every load.
    _fake_record(small_ckpt, {"onnx": 100.0, "openvino": 100.0 * backends.MIN_SPEEDUP - 1}, {"onnx": True, "openvino": True})
    assert Predictor(small_ckpt, device="cpu").backend == "onnx"
    # A record made for another file's bytes is ignored.
    _fake_record(small_ckpt, fast, {"onnx": True, "openvino": True, "openvino-bf16": True}, sha="0" * 64)
    assert Predictor(small_ckpt, device="cpu").backend == "onnx"


def test_a_damaged_record_is_ignored_with_a_note(small_ckpt, capsys):
    backends.backend_record_path(small_ckpt).write_text("{not json")
    assert Predictor(small_ckpt, device="cpu").backend == "onnx"
    assert "unreadable backend record" in capsys.readouterr().err


@requires_openvino
def test_auto_falls_back_to_onnxruntime_when_openvino_fails_here(small_ckpt, monkeypatch, capsys):
    from bonexray.errors import CheckpointError
    from bonexray.inference import openvino_engine

    _fake_record(small_ckpt, {"onnx": 100.0, "openvino": 200.0}, {"onnx": True, "openvino": True})

    def broken(path, *a, **k):
        raise openvino_engine.OpenVinoCompileError(f"{path}: OpenVINO cannot compile this ONNX model (test)")

    monkeypatch.setattr(openvino_engine, "OpenVinoSession", broken)
    pr = Predictor(small_ckpt, device="cpu")
    assert pr.backend == "onnx" and pr.session is not None
    assert "running it on onnxruntime" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="cannot compile"):
        Predictor(small_ckpt, device="cpu", backend="openvino")


def test_explicit_unavailable_backend_is_one_line_exit_2(small_ckpt, tmp_path, monkeypatch, capsys):
    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray(radiograph_like(3)).save(img)
    monkeypatch.setattr(backends, "cpu_has_bf16", lambda: False)
    assert main(["predict", str(small_ckpt), str(img), "--backend", "openvino-bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--backend openvino-bf16" in err[0] and "no native bfloat16" in err[0]
    monkeypatch.setattr(backends, "openvino_version", lambda: None)
    assert main(["predict", str(small_ckpt), str(img), "--backend", "openvino"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "OpenVINO is not installed" in err[0]


@requires_openvino
def test_backend_check_writes_the_record_that_auto_reads(small_ckpt, tmp_path, monkeypatch):
    from builders import make_manifest

    from bonexray.inference.backend_check import check_backends, format_record, write_record
    from bonexray.model.hub import file_sha256

    data = make_manifest(tmp_path / "data", n=16, parts=("hand", "leg", "shoulder"))
    monkeypatch.setattr(backends, "cpu_has_bf16", lambda: False)  # the same test on every CPU: float32 only
    record = check_backends(small_ckpt, data, split="all", batch=4, rounds=1)
    assert record["model_sha256"] == file_sha256(small_ckpt) and record["data"]["split"] == "all"
    rows = record["backends"]
    assert list(rows) == ["onnx", "openvino", "openvino-bf16"]
    assert rows["onnx"]["accepted"] and rows["onnx"]["auroc_delta"] == 0
    assert rows["openvino-bf16"] == {"accepted": False, "why": rows["openvino-bf16"]["why"]}
    assert "no native bfloat16" in rows["openvino-bf16"]["why"]
    ov = rows["openvino"]
    assert ov["max_abs_prob_delta"] <= PROB_TOL and ov["verdict_changes"] == 0 and ov["accepted"] is True
    assert ov["img_s"] > 0 and record["machine"]["cpu"] and record["versions"]["openvino"]
    assert ov["load_s"] > 0 and rows["onnx"]["load_s"] > 0
    path = write_record(small_ckpt, record)
    assert path == small_ckpt.with_name("best.ckpt.backends.json")
    # OpenVINO only when the check measured it MIN_SPEEDUP x faster than onnxruntime; the printout says which.
    expected = "openvino" if ov["img_s"] >= backends.MIN_SPEEDUP * rows["onnx"]["img_s"] else "onnx"
    assert Predictor(small_ckpt, device="cpu").backend == expected
    assert format_record(record).splitlines()[-1].startswith(f"--backend auto runs {expected} ")
    # A tolerance nothing can meet (below zero) refuses OpenVINO, and auto stays on onnxruntime.
    strict = check_backends(small_ckpt, data, split="all", batch=4, rounds=1, prob_tolerance=-1.0,
                            candidates=("openvino",))
    refused = strict["backends"]["openvino"]
    assert refused["accepted"] is False and "max |prob delta|" in refused["why"]
    write_record(small_ckpt, strict)
    assert Predictor(small_ckpt, device="cpu").backend == "onnx"


def test_cpu_bf16_detection_reads_the_flags(monkeypatch):
    from bonexray import hardware

    assert backends.cpu_has_bf16 is hardware.cpu_has_bf16  # one definition for training and inference
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert backends.cpu_has_bf16() is False
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert backends.cpu_has_bf16() is True


def test_damaged_cached_onnx_export_is_rebuilt(good_ckpt, images, tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(good_ckpt.read_bytes())
    rc, out, _ = run_main(capsys, "predict", ckpt, *images, "--backend", "onnx", "--device", "cpu")
    assert rc == 0
    [cached] = list(tmp_path.glob("model.ckpt.*.onnx"))
    cached.write_bytes(cached.read_bytes()[:4000])  # a killed copy, a disk error
    rc, out2, err = run_main(capsys, "predict", ckpt, *images, "--backend", "onnx", "--device", "cpu")
    assert rc == 0 and out2 == out
    assert nonblank_lines(err) == [ln for ln in nonblank_lines(err)
                                   if "cached ONNX export is damaged" in ln and "rebuilding it" in ln]
    assert len(nonblank_lines(err)) == 1 and "corrupt ONNX model" not in err.split("(")[0]
    from bonexray.inference.export import verify_onnx_integrity

    verify_onnx_integrity(cached, require_hash=True)  # rebuilt intact
