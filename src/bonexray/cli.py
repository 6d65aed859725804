"""The ``bonexray`` command: a thin argparse layer over the stage packages.

Heavy imports (torch, Lightning) happen inside each command so ``bonexray --help`` stays instant.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings

from ._version import __version__
from .errors import BonexrayError, BonexrayWarning
from .core.card import TTA_MODES
from .inference.backends import BACKENDS


def _print_summary(title: str, summary: dict) -> None:
    print(title)
    for key, value in summary.items():
        if isinstance(value, dict):
            print(f"  {key}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
        else:
            print(f"  {key}: {value}")


def cmd_download(args: argparse.Namespace) -> int:
    from .data.download import MURA_HELP, download_fracatlas

    if args.dataset == "mura":
        print(MURA_HELP)
        return 0
    root = download_fracatlas(args.dest, url=args.url, sha256=args.sha256, progress=not args.quiet)  # None: defaults
    print(f"FracAtlas ready at {root}")
    print(f"next: bonexray preprocess {root} --out ./cache/fracatlas")
    return 0




def cmd_preprocess(args: argparse.Namespace) -> int:
    from .data.datasets import load_dataset
    from .data.preprocess import CACHE_FILES, build_cache
    from .data.preprocess import is_cache_folder as _is_cache_folder
    from .output_folder import claim_folder, mark_folder, refuse_overwriting_inputs

    if args.limit is not None and args.limit < 1:
        raise BonexrayError(f"--limit {args.limit}: give a number of images >= 1 (leave it out for all)")
    out = claim_folder(args.out, "preprocess", CACHE_FILES, overwrite=args.overwrite, inputs=[args.data],
                       legacy=_is_cache_folder, create=False)
    records = load_dataset(args.data, source=args.source)
    refuse_overwriting_inputs(out, CACHE_FILES, [r.path for r in records])
    if args.limit:
        records.records = records.records[: args.limit]
    cache, reused = build_cache(records, args.out, size=args.size, workers=args.workers,
                                progress=not args.quiet, force=args.force, overwrite=args.overwrite, flag="--out")
    mark_folder(out, "preprocess", CACHE_FILES)
    _print_summary(f"{'reused' if reused else 'built'} cache {cache.root} ({records.source}, {args.size}px)",
                   cache.summary())
    if records.problems:
        print(f"  {len(records.problems)} problem(s) reading the dataset (all in {cache.root / 'problems.txt'}):")
        for p in records.problems[:10]:
            print(f"    - {p}")
        if len(records.problems) > 10:
            print(f"    ... and {len(records.problems) - 10} more")
    bad = cache.index[cache.index["status"] != "ok"]
    for _, row in bad.head(10).iterrows():
        print(f"  {row['status']}: {row['path']}: {row['reason']}")
    if len(bad) > 10:
        print(f"  ... {len(bad) - 10} more non-ok images listed in {cache.root / 'index.csv'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training.train import TrainConfig, run_training

    cfg = TrainConfig.from_args(args)
    result = run_training(cfg)
    print(json.dumps(result, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.evaluate import run_evaluation

    summary = run_evaluation(args.checkpoint, args.data, split=args.split, out=args.out,
                             batch_size=args.batch_size, device=args.device, n_bootstrap=args.bootstrap,
                             body_part_map=args.map_body_part, cache=args.cache, tta=args.tta, splits=args.splits,
                             backend=args.backend, devices=args.devices, num_nodes=args.num_nodes,
                             strategy=args.strategy, overwrite=args.overwrite)
    if summary is not None:  # None: not global rank 0 of a run across processes
        print(summary)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.cam is None:
        return _run_predict(args)
    from pathlib import Path

    from .output_folder import claim_folder

    # Heatmaps go into a folder of their own: never into the images' folder or over other files. Checked
    # first; the marker is left once predict has made the folder (it refuses some runs before that).
    claim_folder(args.cam, "predict --cam", (), overwrite=args.overwrite, inputs=args.paths, flag="--cam",
                 write_marker=False)
    try:
        return _run_predict(args)
    finally:
        if Path(args.cam).is_dir():
            try:
                claim_folder(args.cam, "predict --cam", (), overwrite=True, flag="--cam")
            except (BonexrayError, OSError):
                pass  # a read-only or full folder: predict itself has said so


def _run_predict(args: argparse.Namespace) -> int:
    from .predict import run_predict

    return run_predict(args.model, args.paths, study=args.study, cam_dir=args.cam, fmt=args.format,
                       device=args.device, batch_size=args.batch_size, tta=args.tta,
                       cam_method=args.cam_method, backend=args.backend, devices=args.devices,
                       num_nodes=args.num_nodes, strategy=args.strategy, scope_check=not args.no_scope_check)


def cmd_export(args: argparse.Namespace) -> int:
    from .inference.export import export_onnx

    path = export_onnx(args.checkpoint, args.out, opset=args.opset, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .web.server import serve
    from .web.uploads import UploadLimits

    for flag in ("max_file_mb", "max_request_mb"):
        value = getattr(args, flag)
        if not math.isfinite(value) or value <= 0:
            raise BonexrayError(f"--{flag.replace('_', '-')} {value}: give a size in MB above 0")
    limits = UploadLimits(max_files=args.max_files, max_file_bytes=int(args.max_file_mb * 1024 * 1024),
                          max_request_bytes=int(args.max_request_mb * 1024 * 1024), max_pixels=args.max_pixels)
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, device=args.device, limits=limits,
          metrics=args.metrics, scope_check=not args.no_scope_check)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .core.decision import decision_lines
    from .model.hub import BUNDLED, describe_models, format_models

    rows = describe_models()
    cards = {m.name: m.info().get("card", {}) for m in BUNDLED}
    for r in rows:  # the two operating points and the calibration the findings use
        card = cards.get(r["name"], {})
        r["operating_points"], r["calibration"], r["tta"] = (card.get("operating_points"), card.get("calibration"),
                                                             card.get("tta") or "none")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_models(rows))
    for r in rows:
        if r["built"]:
            print(f"{r['name']}:")
            print("\n".join(f"  {line}" for line in decision_lines(r)))
    return 0


def cmd_calibrate_scope(args: argparse.Namespace) -> int:
    from .inference.calibrate import calibrate_model

    path = calibrate_model(args.model, args.data, out=args.out, quantile=args.quantile, cache=args.cache,
                           batch_size=args.batch_size, device=args.device, head=not args.no_head,
                           non_radiographs=args.non_radiographs, other_regions=args.other_regions,
                           sensitivity=args.sensitivity, specificity=args.specificity, overwrite=args.overwrite,
                           tta=args.tta)
    print(f"wrote {path}")
    return 0


def cmd_pacs(args: argparse.Namespace) -> int:
    import os

    if args.pacs_command == "analyze":
        from .pacs.dicomweb import run_analyze

        return run_analyze(args.model, args.url, studies=args.study, date=args.date, modality=args.modality,
                           user=args.user, password=args.password or os.environ.get("BONEXRAY_PACS_PASSWORD"),
                           device=args.device, backend=args.backend, dry_run=args.dry_run)
    from .pacs.listen import run_listen

    return run_listen(args.model, port=args.port, dest=args.dest, host=args.host, ae_title=args.ae_title,
                      quiet_seconds=args.quiet_seconds, device=args.device, backend=args.backend)


TTA_HELP = ("test-time augmentation: 'flip' averages each image's probabilities with its mirror's (2x the compute), "
            "'d4' over its 8 quarter turns and mirrors (8x); default: the model card's (none when it states none)")
BACKEND_HELP = ("engine: 'auto' (default) on CPU runs the model's ONNX export (made once, cached beside a checkpoint "
                "as NAME.<sha256>.onnx) on the fastest engine that the model's backend record (MODEL.backends.json, "
                "written by bench/backends.py for that exact file) accepts and this machine has (another engine only "
                "when measured >= 1.25x faster), else onnxruntime "
                "float32; on a GPU, PyTorch. 'torch', 'onnx' (onnxruntime), 'openvino' (float32) and 'openvino-bf16' "
                "(CPUs with AVX-512 BF16 or AMX) choose explicitly. --cam always uses the PyTorch network")


def _add_process_arguments(p: argparse.ArgumentParser) -> None:
    """--devices / --num-nodes / --strategy, as for training (Lightning DDP; torchrun and srun too)."""
    p.add_argument("--devices", default="1",
                   help="processes (CPU) or GPUs per node sharing the images (Lightning syntax; default 1). With more "
                        "than one, rank 0 writes every result, in input order, as one process would")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes, for runs across machines (torchrun, srun; default 1)")
    p.add_argument("--strategy", default="ddp", help="Lightning strategy for several processes (default ddp)")


OVERWRITE_HELP = ("write into an output folder that holds other files (a folder this command wrote before, marked by "
                  ".bonexray-out.json, needs no flag); the command's own inputs are never written over")

NO_SCOPE_HELP = ("give a verdict for every image, also those the scope gate would refuse (blank, colour photos, "
                 "non-radiographs, images unlike the training data); in_scope is then null. For research")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bonexray", description="Bone X-ray toolkit: abnormality + body part, MURA-style.")
    p.add_argument("--version", action="version", version=f"bonexray {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser("download", help="fetch an open dataset (FracAtlas) or explain how to get MURA")
    d.add_argument("dataset", choices=["fracatlas", "mura"])
    d.add_argument("--dest", help="target folder (default: ~/.cache/bonexray/datasets)")
    d.add_argument("--url", default=None, help="mirror URL of the FracAtlas zip (default: the figshare release)")
    d.add_argument("--sha256", default=None, help="expected SHA-256 of the zip (default: the pinned value, if any)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_download)

    pp = sub.add_parser("preprocess", help="decode, letterbox and cache a dataset's images")
    pp.add_argument("data", help="MURA-v1.1 folder, FracAtlas folder, or manifest CSV")
    pp.add_argument("--out", required=True, help="cache folder")
    pp.add_argument("--size", type=int, default=320, help="square side in pixels (default 320)")
    pp.add_argument("--workers", type=int, default=None, help="decoder processes (default: all cores)")
    pp.add_argument("--source", choices=["mura", "fracatlas", "manifest"], default=None, help="skip auto-detection")
    pp.add_argument("--limit", type=int, default=None, help="only the first N images, N >= 1 (quick trials)")
    pp.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    pp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    pp.add_argument("--quiet", action="store_true")
    pp.set_defaults(func=cmd_preprocess)

    t = sub.add_parser("train", help="train one network for abnormality + body part")
    from .training.options import add_train_arguments  # light module: argparse only

    add_train_arguments(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="image- and study-level metrics, plots and report")
    e.add_argument("checkpoint", nargs="+",
                   help="checkpoint (.ckpt), ONNX file or bundled model name; several checkpoints of runs with the same split are "
                        "evaluated as an ensemble (probabilities averaged, threshold re-chosen on valid; "
                        "final fits on train+valid keep 0.5)")
    e.add_argument("--data", required=True)
    e.add_argument("--split", choices=["valid", "test", "all"], default="test",
                   help="valid/test: the split the model was trained with (from its model card, --splits or the "
                        "run's splits.csv; refused when it cannot be found); all: every image, for data the model "
                        "never saw (default test); valid is refused for a model trained on it (--fit-on train+valid)")
    e.add_argument("--splits", default=None, metavar="FILE",
                   help="a run's splits.csv to take the split from (checked against the model card)")
    e.add_argument("--out", required=True, help="results folder: new, empty, or one an earlier evaluate wrote")
    e.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    e.add_argument("--cache", default=None, help="preprocessed cache folder (default: per-user cache)")
    e.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16: batch 64 needs about 0.6 GB more memory for onnxruntime's "
                        "arena; bench/RESULTS.md, Scale)")
    e.add_argument("--device", default="auto")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs")
    e.add_argument("--tta", choices=TTA_MODES, default=None,
                   help=TTA_HELP + "; a TTA other than the card's re-chooses the threshold on the run's valid split "
                        "under it, except for train+valid fits")
    e.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    e.add_argument("--map-body-part", action="append", default=[], metavar="DATA=MODEL",
                   help="map a dataset body part onto a model class (repeatable)")
    _add_process_arguments(e)
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="predict on images, folders, studies or DICOM files")
    pr.add_argument("model", help="checkpoint (.ckpt), exported model (.onnx) or bundled model name (fracatlas)")
    pr.add_argument("paths", nargs="+")
    pr.add_argument("--study", action="store_true", help="also one aggregated line per study (folder)")
    pr.add_argument("--cam", default=None, metavar="OUT_DIR",
                    help="write heatmap PNGs here: a new or empty folder, or one an earlier --cam wrote")
    pr.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    pr.add_argument("--cam-method", default="gradcam++",
                    choices=["gradcam++", "gradcam", "layercam", "hirescam", "localization"],
                    help="heatmap: a Grad-CAM variant of the abnormality output (default gradcam++), or "
                         "'localization', the fracture map of models trained with --localization-weight")
    pr.add_argument("--format", choices=["json", "csv"], default="json")
    pr.add_argument("--batch-size", type=int, default=16)
    pr.add_argument("--device", default="auto")
    pr.add_argument("--tta", choices=TTA_MODES, default=None,
                    help=TTA_HELP + "; decisions still use the card's threshold and operating points, which were "
                         "fitted under the card's TTA")
    pr.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    _add_process_arguments(pr)
    pr.add_argument("--no-scope-check", action="store_true", help=NO_SCOPE_HELP)
    pr.set_defaults(func=cmd_predict)

    x = sub.add_parser("export", help="export a checkpoint to ONNX with its model card")
    x.add_argument("checkpoint", help="checkpoint (.ckpt) or bundled model name")
    x.add_argument("--out", required=True,
                   help="the .onnx file to write (or a folder: CHECKPOINT_NAME.onnx in it); an existing file only if "
                        "it is a bonexray export")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a bonexray export "
                                                            "(never the checkpoint itself)")
    x.add_argument("--opset", type=int, default=17)
    x.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="web page + HTTP API: drop X-rays, see verdict, body part and heatmap",
                       description="Serve a web page (GET /) and a JSON API (POST /api/predict, GET /api/model, "
                                   "GET /healthz, docs at /docs) for one model. Uploads are read in memory only.")
    s.add_argument("model", nargs="?", default=None,
                   help="checkpoint (.ckpt; with heatmaps), exported model (.onnx; no heatmaps) or bundled model name "
                        "(default: the bundled fracatlas model)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; any other needs --api-key)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="require header X-API-Key: KEY on every /api/ call (default: $BONEXRAY_API_KEY)")
    s.add_argument("--device", default="auto")
    s.add_argument("--max-files", type=int, default=16, help="images per request (default 16)")
    s.add_argument("--max-file-mb", type=float, default=32, help="size of one file in MiB (default 32)")
    s.add_argument("--max-request-mb", type=float, default=100, help="size of one request in MiB (default 100)")
    s.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="pixels of one image, checked before decoding (default 40,000,000)")
    s.add_argument("--metrics", default=None, metavar="FILE",
                   help="metrics.json of `bonexray evaluate` on this model: the page's model card shows its test "
                        "AUROC (95%% CI), sensitivity and specificity")
    s.add_argument("--no-scope-check", action="store_true", help=NO_SCOPE_HELP)
    s.set_defaults(func=cmd_serve)

    mo = sub.add_parser("models", help="list the bundled models (name, backbone, input size, classes, data, test metrics)")
    mo.add_argument("--json", action="store_true", help="one JSON list instead of text")
    mo.set_defaults(func=cmd_models)

    cs = sub.add_parser("calibrate-scope", help="fit the scope gate, the probability calibration and the two operating "
                                                "points of a checkpoint on its training data (never the test split)",
                        description="Embeds the model's train split (PCA; the in-scope head against built-in and given "
                                    "outlier images) and its valid split (the gate's thresholds, the calibration "
                                    "sigmoid(logit / T + bias), the suspicious (high-sensitivity) and definite "
                                    "(high-specificity) operating points, the borderline band) and writes a copy of "
                                    "the checkpoint whose card holds them.")
    cs.add_argument("model", help="checkpoint (.ckpt) or bundled model name")
    cs.add_argument("--data", required=True, help="the dataset the model was trained on")
    cs.add_argument("--out", required=True,
                    help="the calibrated checkpoint to write: a new file, or one an earlier calibrate-scope wrote")
    cs.add_argument("--overwrite", action="store_true",
                    help="replace an existing --out that is not a calibrated checkpoint (never the model, the data "
                         "or the outlier files)")
    cs.add_argument("--quantile", type=float, default=0.995,
                    help="share of held-out valid images the feature check accepts (default 0.995)")
    cs.add_argument("--non-radiographs", nargs="*", default=[], metavar="PATH",
                    help="more images the gate must refuse as 'not a radiograph' (files or folders)")
    cs.add_argument("--other-regions", nargs="*", default=[], metavar="PATH",
                    help="radiographs of regions outside the model's classes (files or folders), e.g. chest films")
    cs.add_argument("--no-head", action="store_true", help="fit the feature distance only, no in-scope head")
    cs.add_argument("--sensitivity", type=float, default=0.95,
                    help="the suspicious operating point: highest threshold with this valid-split sensitivity")
    cs.add_argument("--specificity", type=float, default=0.95,
                    help="the definite operating point: lowest threshold with this valid-split specificity")
    cs.add_argument("--tta", choices=TTA_MODES, default=None,
                    help=TTA_HELP + "; the calibration and operating points are fitted under it and the card asks "
                         "every front end for it (a new one re-chooses the threshold on valid)")
    cs.add_argument("--cache", default=None, help="preprocessed cache folder (default: per-user cache)")
    cs.add_argument("--batch-size", type=int, default=64)
    cs.add_argument("--device", default="auto")
    cs.set_defaults(func=cmd_calibrate_scope)

    pa = sub.add_parser("pacs", help="analyse studies on a PACS (DICOMweb or DICOM C-STORE); results back as DICOM SR "
                                     "and secondary captures",
                        description="Results go back into the same study as a Comprehensive SR (TID 1500) and one "
                                    "secondary capture per image, in new series, NOT FOR DIAGNOSTIC USE.")
    pas = pa.add_subparsers(dest="pacs_command", metavar="PACS_COMMAND", required=True)
    an = pas.add_parser("analyze", help="query (QIDO-RS), retrieve (WADO-RS), predict, store (STOW-RS)",
                        description="Analyse studies on a DICOMweb server and store the results in each study. "
                                    "A study that already holds this model's results for the same images is left "
                                    "alone (nothing stored twice).")
    an.add_argument("--url", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    an.add_argument("--model", required=True, help="checkpoint (.ckpt), exported model (.onnx) or bundled model name")
    an.add_argument("--study", action="append", default=[], metavar="UID", help="Study Instance UID (repeatable)")
    an.add_argument("--date", default=None, metavar="YYYYMMDD[-YYYYMMDD]", help="every study of this date or range")
    an.add_argument("--modality", default=None, help="every study with this modality, e.g. CR or DX")
    an.add_argument("--user", default=None, help="HTTP basic-auth user")
    an.add_argument("--password", default=None, help="its password (default: $BONEXRAY_PACS_PASSWORD)")
    an.add_argument("--dry-run", action="store_true", help="analyse and build the results, store nothing")
    an.add_argument("--device", default="auto")
    an.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    an.set_defaults(func=cmd_pacs)
    li = pas.add_parser("listen", help="DICOM storage SCP: analyse each study pushed to it, C-STORE the results on",
                        description="Receive instances by C-STORE, analyse a study once no instance of it has "
                                    "arrived for --quiet-seconds, send its results by C-STORE to --dest. Ctrl-C or SIGTERM stops.")
    li.add_argument("--model", required=True, help="checkpoint (.ckpt), exported model (.onnx) or bundled model name")
    li.add_argument("--port", type=int, required=True, help="port to listen on")
    li.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    li.add_argument("--ae-title", default="BONEXRAY", help="this listener's AE title (default BONEXRAY)")
    li.add_argument("--dest", required=True, metavar="AET@HOST:PORT", help="where results are sent, e.g. ORTHANC@127.0.0.1:4242")
    li.add_argument("--quiet-seconds", type=float, default=5.0,
                    help="a study is complete when nothing of it arrived for this long (default 5)")
    li.add_argument("--device", default="auto")
    li.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    li.set_defaults(func=cmd_pacs)
    return p


def _one_line_warnings(command: str):
    """bonexray's own warnings print as one line, like its errors; other libraries' keep their format."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, BonexrayWarning):
            print(f"bonexray {command}: warning: {message}", file=file or sys.stderr, flush=True)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warnings(args.command)
    try:
        return int(args.func(args) or 0)
    except BonexrayError as e:
        print(f"bonexray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"bonexray {args.command}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `bonexray preprocess ... | head -1`: the reader left; the work is done, stop quietly like other tools
        # (stdout goes to /dev/null so the interpreter's final flush does not fail again).
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 0
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
