"""How time and memory grow with the data: MURA-layout trees of N images, each stage in its own process.

For every N in ``--sizes`` this script

1. builds (once; reused when already there) a tree in MURA-v1.1's exact layout and CSVs
   (``train|valid/XR_<PART>/patientNNNNN/studyN_positive|negative/imageN.png``,
   ``{train,valid}_image_paths.csv``, ``{train,valid}_labeled_studies.csv``) from the FracAtlas
   radiographs: image i is FracAtlas image ``i mod 3481`` (sorted by name), changed by a rule seeded
   with (``--seed``, i): a crop keeping 85-100% of each side, a horizontal flip with probability 1/2,
   gamma in [0.8, 1.25], a rotation in [-5, 5] degrees, long side at most 512 px (as MURA's). Any
   result whose pixels equal an earlier one is drawn again, so no two files are identical.
   Labels and body parts follow a stated rule (they are not medical truth; only speed and memory
   are measured): patient p has ``1 + p % 2`` studies, the study with running number s has
   ``1 + s % 4`` images (2.5 on average; MURA: 2.7), body part ``MURA_BODY_PARTS[p % 7]``, positive
   when ``s % 5`` is 0 or 2 (40% of studies; MURA: 41%), patients with ``p % 10 == 9`` in ``valid``;
2. runs, each in a separate process (``sys.executable -m bonexray.cli ...``): reading the dataset
   (``load_dataset``), ``bonexray preprocess`` (time, peak RSS, cache size), ``bonexray train
   --max-steps K`` (a fixed number of optimiser steps; images = K x batch), ``bonexray evaluate
   --split all`` and ``bonexray predict --study`` over all N images;
3. prints a table with the issue's targets marked met / not met, and writes a JSON and a plot
   (time per image and peak RSS against N).

Peak RSS: ``ru_maxrss`` of the stage's process from ``os.wait4`` (what ``/usr/bin/time -v`` reports
as "Maximum resident set size": the largest single process, counting file pages it has mapped, e.g.
a memory-mapped cache), plus the largest sum over the process tree sampled from ``/proc`` every
0.2 s (preprocess's decoder workers) with its anonymous part (``RssAnon``: memory the process itself
holds, not reclaimable page cache).

    python bench/scale.py --sizes 300 1200                       # quick
    python bench/scale.py --sizes 2000 10000 40000 --json scale.json --plot scale.png   # the issue's run

The ONNX export of the trained checkpoint is made before evaluate and predict are timed (a fixed
cost paid once per checkpoint, cached beside it), so they measure inference over the data.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "FracAtlas"
MURA_BODY_PARTS = ("elbow", "finger", "forearm", "hand", "humerus", "shoulder", "wrist")
STAGES = ("read", "preprocess", "train", "evaluate", "predict")
#: Rows in the table: the stages, and "train steps" (the train stage's extra steps, start-up taken out).
ROWS = ("read", "preprocess", "train", "train steps", "evaluate", "predict")
#: Stages whose peak RSS must not grow with N (the issue's list). Training holds a model and optimiser, not
#: the data; reading holds one record per image (path, labels: about 1.5 kB each), which is reported but
#: not required to be flat.
FLAT_RSS_STAGES = ("preprocess", "evaluate", "predict")
REPORTED_RSS_STAGES = ("read",) + FLAT_RSS_STAGES
MAX_RSS_MB = 2048
TIME_TOLERANCE = 0.20


# --------------------------------------------------------------------------- the tree


def source_images(source: Path) -> list[Path]:
    images = sorted(p for p in (source / "images").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not images:
        raise SystemExit(f"{source}: no FracAtlas images under images/ (give --source)")
    return images


def distinct_variant(gray: np.ndarray, rng: np.random.Generator, max_side: int = 512) -> np.ndarray:
    """One seeded variant of a grayscale radiograph: crop, flip, gamma, small rotation, long side <= max_side."""
    from PIL import Image

    h, w = gray.shape
    ch, cw = max(8, int(h * rng.uniform(0.85, 1.0))), max(8, int(w * rng.uniform(0.85, 1.0)))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img = gray[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        img = img[:, ::-1]
    gamma = rng.uniform(0.8, 1.25)
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** gamma + 0.5, 0, 255).astype(np.uint8)
    im = Image.fromarray(lut[np.ascontiguousarray(img)])
    im = im.rotate(float(rng.uniform(-5.0, 5.0)), resample=Image.BILINEAR, expand=False, fillcolor=0)
    if max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.BILINEAR)
    return np.asarray(im)


def tree_layout(n: int) -> list[tuple[str, str, str, str, int, int]]:
    """(split, PART, patientNNNNN, studyN, label, image number) for images 0..n-1, by the rule in the module doc."""
    out: list[tuple[str, str, str, str, int, int]] = []
    p = s = 0
    while len(out) < n:
        split = "valid" if p % 10 == 9 else "train"
        part = MURA_BODY_PARTS[p % 7].upper()
        for k in range(1 + p % 2):
            label = int(s % 5 in (0, 2))
            for i in range(1 + s % 4):
                if len(out) < n:
                    out.append((split, part, f"patient{p + 1:05d}", f"study{k + 1}", label, i + 1))
            s += 1
        p += 1
    return out


def build_tree(base: Path, n: int, source: Path, seed: int = 0) -> Path:
    """The MURA-v1.1 folder of N distinct images under ``base`` (reused when complete with the same rule)."""
    from PIL import Image

    from bonexray.data.imageio import read_image

    root = base / "MURA-v1.1"
    stamp = root / ".scale-bench.json"
    want = {"n": n, "seed": seed, "source": str(source.resolve()), "rule": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return root
    sources = source_images(source)
    seen: set[bytes] = set()
    rows: dict[str, list] = {"train": [], "valid": []}
    studies: dict[str, dict[str, int]] = {"train": {}, "valid": {}}
    for idx, (split, part, patient, study, label, number) in enumerate(tree_layout(n)):
        study_dir = f"{split}/XR_{part}/{patient}/{study}_{'positive' if label else 'negative'}"
        rel = f"{study_dir}/image{number}.png"
        (root / study_dir).mkdir(parents=True, exist_ok=True)
        gray = read_image(sources[idx % len(sources)]).pixels
        if gray.dtype != np.uint8:
            gray = (gray >> 8).astype(np.uint8)
        rng = np.random.default_rng([seed, idx])
        while True:  # draw again on the (unlikely) event of an identical result
            pixels = distinct_variant(gray, rng)
            digest = hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).digest()
            if digest not in seen:
                seen.add(digest)
                break
        Image.fromarray(pixels).save(root / rel, compress_level=1)
        rows[split].append([f"MURA-v1.1/{rel}"])
        studies[split][f"MURA-v1.1/{study_dir}/"] = label
    for split in ("train", "valid"):
        with open(root / f"{split}_image_paths.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows[split])
        with open(root / f"{split}_labeled_studies.csv", "w", newline="") as f:
            csv.writer(f).writerows([[d, lab] for d, lab in studies[split].items()])
    stamp.write_text(json.dumps(want))
    return root


# --------------------------------------------------------------------------- measuring a process


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def tree_rss(pid: int) -> tuple[int, int]:
    """(RSS, anonymous RSS) in bytes summed over ``pid`` and its descendants (Linux /proc)."""
    kids, todo, total, anon = _children(), [pid], 0, 0
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total, anon


def measure(cmd: list[str], stdout_path: Path | None = None, interval: float = 0.2) -> dict:
    """Run ``cmd``; wall time, exit status, ru_maxrss (wait4) and the sampled peak of the process tree."""
    out = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE)
    peak = {"tree": 0, "anon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, anon = tree_rss(proc.pid)
            peak["tree"], peak["anon"] = max(peak["tree"], rss), max(peak["anon"], anon)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    err = proc.stderr.read()  # drain while it runs (a full pipe would block it)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    if stdout_path:
        out.close()
    return {"seconds": seconds, "rc": proc.returncode, "peak_rss_mb": usage.ru_maxrss / 1024,
            "peak_tree_rss_mb": peak["tree"] / 2**20, "peak_tree_anon_mb": peak["anon"] / 2**20,
            "stderr_tail": err.decode(errors="replace")[-1500:]}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------- the stages


def run_size(n: int, args, work: Path) -> list[dict]:
    py = [sys.executable, "-m", "bonexray.cli"]
    base = work / f"mura-{n}"
    t = time.perf_counter()
    root = build_tree(base, n, Path(args.source), seed=args.seed)
    print(f"N={n}: tree {root} ready in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    cache, run, ckpt = base / f"cache-{args.image_size}", base / "run", base / "run" / "checkpoints" / "last.ckpt"
    rows = []

    def stage(name: str, cmd: list[str], items: int, stdout_path: Path | None = None, **extra) -> dict:
        print(f"N={n}: {name} ...", file=sys.stderr, flush=True)
        m = measure(cmd, stdout_path)
        if m["rc"] != 0:
            raise SystemExit(f"N={n} {name} failed (exit {m['rc']}): {' '.join(cmd)}\n{m['stderr_tail']}")
        row = {"n": n, "stage": name, "items": items, "s_per_image": m["seconds"] / items, **m, **extra}
        row.pop("stderr_tail")
        rows.append(row)
        print(f"N={n}: {name} {m['seconds']:.1f}s, peak RSS {m['peak_rss_mb']:.0f} MB "
              f"(tree {m['peak_tree_rss_mb']:.0f}, anon {m['peak_tree_anon_mb']:.0f})", file=sys.stderr, flush=True)
        return row

    if "read" in args.stages:
        stage("read", [sys.executable, "-c", "import sys; from bonexray.data.datasets import load_dataset; "
                       "rs = load_dataset(sys.argv[1]); assert len(rs.records) == int(sys.argv[2]), len(rs.records)",
                       str(root), str(n)], n)
    if "preprocess" in args.stages:
        r = stage("preprocess", py + ["preprocess", str(root), "--out", str(cache), "--size", str(args.image_size),
                                      "--workers", str(args.workers), "--force", "--quiet"], n)
        r["cache_mb"] = folder_bytes(cache) / 2**20
    if "train" in args.stages:
        import shutil

        def train_cmd(out: Path, steps: int) -> list[str]:
            return py + ["train", "--data", str(root), "--cache", str(cache), "--out", str(out),
                         "--backbone", args.backbone, "--image-size", str(args.image_size),
                         "--batch-size", str(args.batch_size), "--epochs", "1", "--max-steps", str(steps),
                         "--select", "last", "--patience", "0", "--quiet"]

        shutil.rmtree(run, ignore_errors=True)
        short = stage("train", train_cmd(run, args.steps), args.steps * args.batch_size)
        if args.timed_steps > 0:
            # Start-up (records, split, the cache's check) grows with N; the cost of a training image does
            # not have to. The same command with more steps, minus the short run: time of the extra steps.
            longer = base / "run-longer"
            shutil.rmtree(longer, ignore_errors=True)
            print(f"N={n}: train with {args.timed_steps} more steps ...", file=sys.stderr, flush=True)
            m = measure(train_cmd(longer, args.steps + args.timed_steps))
            if m["rc"] != 0:
                raise SystemExit(f"N={n} train (longer) failed (exit {m['rc']})\n{m['stderr_tail']}")
            shutil.rmtree(longer, ignore_errors=True)
            items = args.timed_steps * args.batch_size
            seconds = m["seconds"] - short["seconds"]
            m.pop("stderr_tail")
            rows.append({"n": n, "stage": "train steps", "items": items, **m, "seconds": seconds,
                         "s_per_image": seconds / items})
            print(f"N={n}: train steps {seconds:.1f}s for {items} images, peak RSS {m['peak_rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
    if {"evaluate", "predict"} & set(args.stages):
        # The ONNX export (once per checkpoint, cached beside it) is not part of either stage.
        subprocess.run([sys.executable, "-c", "import sys; from bonexray.inference.backends import exported_onnx; "
                        "exported_onnx(sys.argv[1])", str(ckpt)], check=True)
    if "evaluate" in args.stages:
        import shutil

        shutil.rmtree(base / "eval", ignore_errors=True)
        stage("evaluate", py + ["evaluate", str(ckpt), "--data", str(root), "--cache", str(cache), "--split", "all",
                                "--out", str(base / "eval"), "--bootstrap", str(args.bootstrap)], n)
    if "predict" in args.stages:
        out = base / "predict.jsonl"
        folders = [str(root / s) for s in ("train", "valid") if (root / s).is_dir()]
        stage("predict", py + ["predict", str(ckpt), *folders, "--study"], n, out)
        lines = sum(1 for line in open(out) if '"type": "image"' in line)
        if lines != n:
            raise SystemExit(f"N={n}: predict wrote {lines} image lines, want {n}")
    return rows


# --------------------------------------------------------------------------- targets, table, plot


def judge(rows: list[dict]) -> list[dict]:
    """Per stage: time per image within +-20% of the smallest N's; peak RSS flat (and < 2 GB) where required."""
    verdicts = []
    for name in ROWS:
        mine = sorted((r for r in rows if r["stage"] == name), key=lambda r: r["n"])
        if len(mine) < 2:
            continue
        first, last = mine[0], mine[-1]
        worst = max(abs(r["s_per_image"] / first["s_per_image"] - 1) for r in mine[1:])
        v = {"stage": name, "n_from": first["n"], "n_to": last["n"],
             "time_per_image_change": worst,
             # The train row is start-up plus a fixed number of steps: its time per image is judged on the
             # "train steps" row, which takes the start-up out.
             "time_target_met": None if name == "train" else worst <= TIME_TOLERANCE,
             "marginal_s_per_image": None, "startup_s": None}
        more = last["items"] - mine[-2]["items"]
        if more > 0:  # training runs a fixed number of steps at every N: no marginal cost to compute
            # Between the two largest sizes, t = start-up + N x marginal: the cost of one more image, free
            # of the start-up (imports, model load) that dominates small runs.
            v["marginal_s_per_image"] = (last["seconds"] - mine[-2]["seconds"]) / more
            v["startup_s"] = last["seconds"] - v["marginal_s_per_image"] * last["items"]
        if len(mine) >= 3 and mine[1]["items"] > mine[0]["items"] and more > 0:
            # Linear in N means the cost of one more image does not change with N: compare the marginal
            # cost over the lower pair of sizes with the upper pair's (start-up cancels in both).
            low = (mine[-2]["seconds"] - mine[0]["seconds"]) / (mine[-2]["items"] - mine[0]["items"])
            v["marginal_change"] = v["marginal_s_per_image"] / low - 1 if low > 0 else None
            v["marginal_target_met"] = None if v["marginal_change"] is None else abs(v["marginal_change"]) <= TIME_TOLERANCE
        if name in REPORTED_RSS_STAGES:
            grow = last["peak_rss_mb"] - first["peak_rss_mb"]
            required = name in FLAT_RSS_STAGES
            # Flat: grows by at most 10% of the smallest run's peak (or 50 MB, whichever is larger).
            v.update({"rss_growth_mb": grow,
                      "rss_flat": grow <= max(50.0, 0.10 * first["peak_rss_mb"]) if required else None,
                      "rss_under_2gb": last["peak_rss_mb"] < MAX_RSS_MB if required else None,
                      "anon_growth_mb": last["peak_tree_anon_mb"] - first["peak_tree_anon_mb"]})
            pre = {r["n"]: r.get("cache_mb") for r in rows if r["stage"] == "preprocess"}
            if pre.get(first["n"]) is not None and pre.get(last["n"]) is not None:
                data_growth = pre[last["n"]] - pre[first["n"]]
                # Holding every image (even as a letterboxed tile) would grow RSS by about the cache's
                # growth; below 10 MB of growth the sizes are too close to tell.
                v["holds_all_images"] = grow >= 0.5 * data_growth if data_growth >= 10 else None
        verdicts.append(v)
    return verdicts


def mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def print_table(rows: list[dict], verdicts: list[dict], file=sys.stdout) -> None:
    print("| N | stage | items | seconds | ms/image | peak RSS MB | tree peak MB | tree anon MB | cache MB |", file=file)
    print("|---|---|---|---|---|---|---|---|---|", file=file)
    for r in sorted(rows, key=lambda r: (ROWS.index(r["stage"]), r["n"])):
        cache = f"{r['cache_mb']:.0f}" if "cache_mb" in r else ""
        print(f"| {r['n']} | {r['stage']} | {r['items']} | {r['seconds']:.1f} | {1000 * r['s_per_image']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_tree_rss_mb']:.0f} | {r['peak_tree_anon_mb']:.0f} | {cache} |", file=file)
    print("", file=file)
    print("| stage | time/image change (target <= 20%) | marginal ms/image | marginal change, lower vs upper sizes | "
          "start-up s | RSS growth MB | RSS flat | < 2 GB at largest N | holds all images |", file=file)
    print("|---|---|---|---|---|---|---|---|---|", file=file)
    for v in verdicts:
        growth = f"{v['rss_growth_mb']:+.0f}" if "rss_growth_mb" in v else "(not required)"
        held = v.get("holds_all_images")
        print(f"| {v['stage']} (N {v['n_from']} -> {v['n_to']}) | {100 * v['time_per_image_change']:.0f}%: "
              f"{mark(v['time_target_met'])} | {_num(v['marginal_s_per_image'], 1000)} | {_change(v)} | {_num(v['startup_s'])} | {growth} | "
              f"{mark(v.get('rss_flat'))} | {mark(v.get('rss_under_2gb'))} | "
              f"{'n/a' if held is None else ('yes' if held else 'no')} |", file=file)


def _change(v: dict) -> str:
    if v.get("marginal_change") is None:
        return "n/a"
    return f"{100 * v['marginal_change']:+.0f}%: {mark(v['marginal_target_met'])}"


def _num(x: float | None, scale: float = 1.0) -> str:
    return "n/a" if x is None else f"{scale * x:.2f}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in ROWS:
        mine = sorted((r for r in rows if r["stage"] == name), key=lambda r: r["n"])
        if not mine:
            continue
        ns = [r["n"] for r in mine]
        a.plot(ns, [1000 * r["s_per_image"] for r in mine], "o-", label=name)
        b.plot(ns, [r["peak_rss_mb"] for r in mine], "o-", label=name)
    sizes = sorted({r["n"] for r in rows})
    a.set_yscale("log")  # start-up-laden train beside 1-ms preprocess: a linear axis hides the flat lines
    for ax, title, unit in ((a, "time per image (log)", "ms / image"), (b, "peak RSS (ru_maxrss); dashed: 2 GB", "MB")):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("N images")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    b.axhline(MAX_RSS_MB, color="grey", ls="--", lw=1)
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Core(s) per socket", "Thread(s) per core", "Socket(s)"):
                info[key.strip()] = value.strip()
            if key.strip() == "Flags":
                info["flags"] = [f for f in value.split() if f.startswith(("avx", "amx"))]
    except OSError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 40000])
    ap.add_argument("--source", default=str(DEFAULT_SOURCE), help="FracAtlas folder the images come from")
    ap.add_argument("--work", default=None, help="folder for trees, caches and runs (kept; default: a temporary one)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="training steps per N")
    ap.add_argument("--timed-steps", type=int, default=20,
                    help="extra steps of a second train run per N, timed without start-up (0: skip)")
    ap.add_argument("--workers", type=int, default=2, help="preprocess decoder processes")
    ap.add_argument("--bootstrap", type=int, default=200, help="evaluate's bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="scale.json")
    ap.add_argument("--plot", default="scale.png")
    args = ap.parse_args(argv)
    if "train" not in args.stages and {"evaluate", "predict"} & set(args.stages):
        ap.error("evaluate and predict need the train stage (its checkpoint)")
    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bonexray-scale-"))
    info = {"machine": machine(), "args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    rows: list[dict] = []
    for n in sorted(args.sizes):
        rows.extend(run_size(n, args, work))
    verdicts = judge(rows)
    info["machine"]["loadavg_end"] = os.getloadavg()
    print(f"machine: {info['machine'].get('Model name')}, {info['machine']['cpus']} CPUs, "
          f"load average {info['machine']['loadavg']} at start, {info['machine']['loadavg_end']} at end")
    print_table(rows, verdicts)
    Path(args.json).write_text(json.dumps({**info, "rows": rows, "verdicts": verdicts}, indent=2))
    plot(rows, Path(args.plot))
    print(f"wrote {args.json} and {args.plot}; trees and runs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
