"""Arguments of ``bonexray train`` (kept apart from the trainer so ``--help`` needs no torch)."""
from __future__ import annotations

import argparse


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="MURA-v1.1 folder, FracAtlas folder or manifest CSV (default: ./data/MURA-v1.1 if present, "
                        "else FracAtlas, downloaded on first use)")
    g.add_argument("--cache", default=None, help="preprocessed cache folder (default: per-user cache keyed by data+size)")
    g.add_argument("--limit", type=int, default=None, help="use only N images (quick trials; taken evenly across the data)")
    g.add_argument("--valid-frac", type=float, default=None, help="fraction held out for validation (default 0.15)")
    g.add_argument("--test-frac", type=float, default=None, help="fraction held out for test where the data has no test split (default 0.15)")
    g.add_argument("--workers", type=int, default=None, help="data-loader processes (default: min(4, cores) on GPU, 0 on CPU)")

    m = p.add_argument_group("model")
    m.add_argument("--recipe", default=None, help="named recipe (fracatlas, mura) or YAML file; flags override it")
    m.add_argument("--backbone", default=None, help="resnet50 (default), densenet169, efficientnet_lite0/1/2, or any timm name")
    m.add_argument("--pretrained", default=None, choices=["imagenet", "none"], help="initial weights (default imagenet)")
    m.add_argument("--weights", default=None, metavar="FILE", help="local state_dict for the backbone (offline use)")
    m.add_argument("--image-size", type=int, default=None, help="input side in pixels (default 224)")
    m.add_argument("--dropout", type=float, default=None)

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=None, help="default 10")
    o.add_argument("--batch-size", type=int, default=None, help="default 32")
    o.add_argument("--lr", type=float, default=None, help="peak learning rate of AdamW (default 3e-4)")
    o.add_argument("--weight-decay", type=float, default=None, help="default 1e-4")
    o.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up before cosine decay (default 1)")
    o.add_argument("--body-part-weight", type=float, default=None, help="weight of the body-part loss (default 1.0)")
    o.add_argument("--localization-weight", type=float, default=None,
                   help="weight of the auxiliary fracture-localisation loss from the dataset's boxes "
                        "(FracAtlas COCO annotations); 0 turns it off (default 0)")
    o.add_argument("--patience", type=int, default=None, help="early-stopping patience in epochs (default 5)")
    o.add_argument("--monitor", choices=["valid_loss", "valid_auroc"], default=None,
                   help="validation metric that picks best.ckpt and drives early stopping (default valid_loss)")
    o.add_argument("--threshold-method", choices=["youden", "sensitivity"], default=None,
                   help="how the abnormality threshold is chosen on valid (default youden)")
    o.add_argument("--target-sensitivity", type=float, default=None, help="for --threshold-method sensitivity (default 0.9)")
    o.add_argument("--seed", type=int, default=None, help="seed of initialisation, shuffling and augmentation (default 0)")
    o.add_argument("--split-seed", type=int, default=None,
                   help="seed of the train/valid/test split (and of --limit's subset); kept apart from --seed "
                        "so a rerun with another --seed is tested on the same images (default 0)")

    r = p.add_argument_group("run")
    r.add_argument("--out", default=None, help="run directory (default runs/<date>-<backbone>)")
    r.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    r.add_argument("--accelerator", default=None, help="auto (default), cpu, gpu, ...")
    r.add_argument("--devices", default=None, help="devices per node (Lightning syntax; default auto)")
    r.add_argument("--num-nodes", type=int, default=None, help="nodes for multi-node DDP (default 1)")
    r.add_argument("--strategy", default=None, help="auto (default), ddp, ...")
    r.add_argument("--precision", default=None, help="default: 16-mixed on GPU, 32 on CPU")
    r.add_argument("--max-steps", type=int, default=None, help="stop after N optimiser steps (smoke tests)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
