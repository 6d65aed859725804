"""Inference speed of bonexray's engines against plain eager PyTorch, on this machine's CPU.

For each backbone (random init: speed does not depend on the weights) and batch size, every round
runs each path once on the same uint8 batch, alternating, and the figures are medians over rounds:

  (a) baseline   plain eager PyTorch (torchvision resnet50 / timm efficientnet_lite0, 3 channels),
                 NCHW float32 input prepared in advance, ``torch.inference_mode``
  (b) checkpoint ``Predictor(ckpt, backend="torch")``: bonexray's PyTorch path (uint8 in, probabilities out)
  (c) default    what ``bonexray predict/evaluate`` use (``--backend auto``): for a backbone with a bundled
                 model (efficientnet_lite0), the engine ``auto`` picks for that model on this machine (its
                 backend record: openvino-bf16 on a bf16 CPU), run on this network through ``Predictor``;
                 otherwise ``Predictor(ckpt)`` (no record: onnxruntime float32)
  (d) int8       onnxruntime static quantization (QDQ, per-channel int8 weights, uint8 activations),
                 calibrated on training-split images (``--calib-data``), run through ``Predictor``
  (e) bf16       bonexray's network under ``torch.autocast("cpu", bfloat16)``, channels_last (CPUs with
                 AVX-512 BF16 or AMX only)
  (f) openvino   fp32 and bf16 through OpenVINO's own API with a static batch shape (``model.reshape``),
                 against (c)'s engine, which keeps the ONNX graph's dynamic batch dimension

Each is reported as images/s, as a ratio to (a), and as GFLOP/s (the network's FLOPs per image,
counted by ``torch.utils.flop_counter``) against the cores' float32 peak measured here with a large
GEMM in every round.

    python bench/inference.py                                      # both backbones, batch 1 and 16
    python bench/inference.py --models resnet50 --batches 16 --rounds 7
    # the INT8 model of a trained checkpoint, for `bonexray evaluate` (accuracy of INT8):
    python bench/inference.py --write-int8 RUN/checkpoints/best.ckpt --calib-data ../shared/data/FracAtlas --out best.int8.onnx
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZE = 224
BODY_PARTS = ["elbow", "finger", "forearm", "hand", "humerus", "shoulder", "wrist"]  # MURA's seven


def cpu_info() -> dict:
    """CPU model and the instruction-set flags that decide which fast paths exist."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if sys.platform.startswith("linux") else ""
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    from bonexray.inference.backends import physical_cores

    return {"model": fields.get("Model name", platform.processor()).strip(), "flags": [f for f in wanted if f in flags],
            "physical_cores": physical_cores()}


def default_backend(backbone: str, ckpt: Path) -> tuple[str, str]:
    """(engine, why) that ``--backend auto`` runs for this backbone's bundled model here, else for ``ckpt``."""
    from bonexray.inference.backends import choose_backend
    from bonexray.model.hub import BUNDLED, verify_bundled

    for m in BUNDLED:
        if m.info().get("card", {}).get("backbone") == backbone and m.path.is_file():
            return choose_backend("auto", "cpu", verify_bundled(m)), f"auto for bundled {m.name}"
    return choose_backend("auto", "cpu", ckpt), "auto, no backend record"


def gemm_gflops(n: int = 2048) -> float:
    """float32 GFLOP/s of one n x n x n matrix product (the cores' practical peak)."""
    import torch

    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.mm(a, b)
    t = time.perf_counter()
    torch.mm(a, b)
    return 2 * n**3 / (time.perf_counter() - t) / 1e9


def flops_per_image(net) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        net(torch.rand(1, 1, SIZE, SIZE))
    return float(counter.get_total_flops())


def random_checkpoint(backbone: str, folder: Path) -> Path:
    import torch

    from bonexray.model.checkpoint import ModelCard, save_model
    from bonexray.model.network import BoneXrayNet

    torch.manual_seed(0)
    net = BoneXrayNet(backbone, len(BODY_PARTS), pretrained=None).eval()
    card = ModelCard(backbone=backbone, image_size=SIZE, mean=net.mean, std=net.std, body_parts=BODY_PARTS)
    return save_model(folder / f"{backbone}.ckpt", net, card)


def baseline_model(backbone: str):
    """What a user would write without bonexray: the stock model, 3-channel input, eager."""
    import timm
    import torchvision

    if backbone == "resnet50":
        return torchvision.models.resnet50().eval()
    return timm.create_model(backbone, pretrained=False).eval()


# ----------------------------------------------------------------------------- INT8


def calibration_images(data: str | None, checkpoint: Path | None, n: int = 64) -> tuple[np.ndarray, str]:
    """uint8 (n, SIZE, SIZE) tiles from the training split of ``data`` (the run's split when known)."""
    from bonexray.data.preprocess import letterbox, load_for_model

    if data is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from builders import radiograph_like

        tiles = [letterbox(radiograph_like(i, 300 + i, 240, abnormal=i % 2), SIZE) for i in range(n)]
        return np.stack(tiles), f"{n} synthetic radiograph-like images (no --calib-data)"
    from bonexray.data.datasets import load_dataset
    from bonexray.data.splits import make_splits
    from bonexray.evaluation.evaluate import assign_eval_splits, find_run_dir
    from bonexray.model.checkpoint import read_card

    if checkpoint is not None:  # that model's own training split (card, or its run's splits.csv)
        records, _ = assign_eval_splits(load_dataset(data), read_card(checkpoint).split, find_run_dir(checkpoint))
    else:  # speed runs of random-init models: the default split's training images
        records = make_splits(load_dataset(data))
    train = [r for r in records if r.split == "train"]
    picked = [train[i] for i in np.linspace(0, len(train) - 1, n).astype(int)]
    return np.stack([load_for_model(r.path, SIZE)[0] for r in picked]), f"{n} training-split images of {data}"


def quantize_int8(float_onnx: Path, calib: np.ndarray, out: Path) -> Path:
    """Static INT8 (QDQ) quantization of a bonexray ONNX file; the model card travels along."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from bonexray.inference.onnx_format import ONNX_INPUT

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{ONNX_INPUT: (calib[i : i + 8].astype(np.float32) / 255.0)[:, None]}
                                 for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(float_onnx), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    from bonexray.inference.export import ONNX_HASH_KEY, onnx_graph_sha256

    model, source = onnx.load(str(out)), onnx.load(str(float_onnx))
    del model.metadata_props[:]
    for p in source.metadata_props:  # the model card travels; the integrity hash is the new graph's
        if p.key != ONNX_HASH_KEY:
            model.metadata_props.add(key=p.key, value=p.value)
    model.metadata_props.add(key=ONNX_HASH_KEY, value=onnx_graph_sha256(model))
    onnx.save(model, str(out))
    return out


# ----------------------------------------------------------------------------- paths


def build_paths(backbone: str, batch: int, work: Path, calib: np.ndarray, info: dict) -> tuple[dict, float]:
    """name -> callable running one batch; and the FLOPs per image of bonexray's network."""
    import torch

    from bonexray.inference.backends import cpu_has_bf16, exported_onnx
    from bonexray.inference.predictor import Predictor

    ckpt = random_checkpoint(backbone, work)
    u8 = np.random.default_rng(0).integers(0, 256, (batch, SIZE, SIZE), dtype=np.uint8)
    base, x3 = baseline_model(backbone), torch.rand(batch, 3, SIZE, SIZE)
    engine, why = default_backend(backbone, ckpt)
    torch_path, default_path = Predictor(ckpt, device="cpu", backend="torch"), Predictor(ckpt, device="cpu", backend=engine)

    def baseline():
        with torch.inference_mode():
            base(x3)

    paths = {"(a) baseline eager fp32": baseline, "(b) checkpoint (torch)": lambda: torch_path.predict_arrays(u8),
             f"(c) default ({default_path.backend}; {why})": lambda: default_path.predict_arrays(u8)}
    float_onnx = exported_onnx(ckpt).path
    int8 = Predictor(quantize_int8(float_onnx, calib, work / f"{backbone}.int8.onnx"), device="cpu")
    paths["(d) int8 (onnxruntime)"] = lambda: int8.predict_arrays(u8)
    if cpu_has_bf16():
        net_cl = torch_path.net.to(memory_format=torch.channels_last)
        x1 = torch_path.to_tensor(u8).contiguous(memory_format=torch.channels_last)

        def bf16():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                net_cl(x1)

        paths["(e) bf16 (torch autocast)"] = bf16
    try:
        import openvino as ov
    except ImportError:
        pass
    else:
        from bonexray.inference.backends import physical_cores

        core = ov.Core()
        model = core.read_model(str(float_onnx))
        model.reshape({model.inputs[0].any_name: [batch, 1, SIZE, SIZE]})
        xf = (u8.astype(np.float32) / 255.0)[:, None]
        for prec in ("f32", "bf16") if cpu_has_bf16() else ("f32",):
            compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": prec,
                                                         "INFERENCE_NUM_THREADS": physical_cores()})
            paths[f"(f) openvino {prec} static"] = (lambda c: lambda: c(xf))(compiled)
    return paths, flops_per_image(torch_path.net)


def measure(paths: dict, batch: int, rounds: int, min_images: int = 16) -> tuple[dict, list]:
    calls = max(1, -(-min_images // batch))
    for run in paths.values():  # warm-up: graph optimisation, caches, oneDNN primitives
        run()
        run()
    speeds: dict[str, list[float]] = {name: [] for name in paths}
    peaks = []
    for _ in range(rounds):
        peaks.append(gemm_gflops())
        for name, run in paths.items():
            t = time.perf_counter()
            for _ in range(calls):
                run()
            speeds[name].append(calls * batch / (time.perf_counter() - t))
    return speeds, peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_lite0"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calib-data", default=None, help="dataset whose training-split images calibrate INT8")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--write-int8", default=None, metavar="CKPT", help="only write the INT8 ONNX of CKPT to --out")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch

    from bonexray.inference.backends import physical_cores

    torch.set_num_threads(physical_cores())
    if a.write_int8:
        from bonexray.inference.backends import exported_onnx

        ckpt = Path(a.write_int8)
        calib, how = calibration_images(a.calib_data, ckpt)
        out = quantize_int8(exported_onnx(ckpt).path, calib, Path(a.out or ckpt.with_suffix(".int8.onnx")))
        print(f"wrote {out} (calibrated on {how})")
        return

    info = cpu_info()
    print(f"CPU: {info['model']}; {info['physical_cores']} physical cores; flags: {' '.join(info['flags'])}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    calib, how = calibration_images(a.calib_data, None)
    print(f"INT8 calibration: {how}")
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": info, "command": " ".join(sys.argv), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in a.models:
            for batch in a.batches:
                paths, flops = build_paths(backbone, batch, Path(tmp), calib, info)
                speeds, peaks = measure(paths, batch, a.rounds)
                peak = statistics.median(peaks)
                base = statistics.median(speeds["(a) baseline eager fp32"])
                print(f"\n{backbone} {SIZE}px batch {batch}: {flops / 1e9:.2f} GFLOP/image; "
                      f"fp32 GEMM peak {peak:.0f} GFLOP/s (median of {a.rounds})")
                print(f"  {'path':58s} {'img/s':>8s} {'x (a)':>7s} {'GFLOP/s':>8s} {'% peak':>7s}")
                for name, s in speeds.items():
                    ips = statistics.median(s)
                    row = {"model": backbone, "batch": batch, "path": name, "img_s": round(ips, 2),
                           "ratio": round(ips / base, 2), "gflop_s": round(ips * flops / 1e9, 1),
                           "pct_fp32_peak": round(100 * ips * flops / 1e9 / peak, 1), "peak_gflop_s": round(peak, 1)}
                    results["rows"].append(row)
                    print(f"  {name:58s} {ips:8.2f} {row['ratio']:7.2f} {row['gflop_s']:8.1f} {row['pct_fp32_peak']:6.1f}%",
                          flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
