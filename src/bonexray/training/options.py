"""Arguments of ``bonexray train`` (kept apart from the trainer so ``--help`` needs no torch).

Every default shown here is read from :class:`bonexray.training.config.TrainConfig`; flags left out
stay ``None`` so that a recipe's value, then the config default, applies.
"""
from __future__ import annotations

import argparse

from .config import CHOICES, DEFAULTS as D, FP32_CPU_MICRO_BATCH


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="MURA-v1.1 folder, FracAtlas folder or manifest CSV (default: ./data/MURA-v1.1 if present, "
                        "else FracAtlas, downloaded on first use)")
    g.add_argument("--cache", default=None, help="preprocessed cache folder (default: per-user cache keyed by data+size)")
    g.add_argument("--limit", type=int, default=None,
                   help="use only about N images: whole patient/exam groups drawn at random with --split-seed (quick trials)")
    g.add_argument("--valid-frac", type=float, default=None, help=f"fraction of images held out for validation (default {D.valid_frac})")
    g.add_argument("--test-frac", type=float, default=None,
                   help=f"fraction held out for test where the data has no test split (default {D.test_frac})")
    g.add_argument("--fit-on", choices=CHOICES["fit_on"], default=None,
                   help="train: fit on the train split, validate on valid (threshold chosen there); train+valid: the "
                        "final fit once choices are made, on train and valid together, with no validation, the final "
                        "epoch kept and the threshold 0.5 of the class-balanced loss; test is never seen either way "
                        f"(default {D.fit_on})")
    g.add_argument("--workers", type=int, default=None, help="data-loader processes (default: min(4, cores) on GPU, 0 on CPU)")
    g.add_argument("--allow-unreadable", action="store_true",
                   help="train even when more than 5%% of the images cannot be read (they are always reported)")

    m = p.add_argument_group("model")
    m.add_argument("--recipe", default=None,
                   help="named recipe (fracatlas, mura, baseline) or YAML file; flags override it. Without it, the "
                        "recipe named after the dataset's source applies (fracatlas, mura), if there is one")
    m.add_argument("--backbone", default=None,
                   help=f"resnet50, densenet169, efficientnet_lite0/1/2, or any timm name (default {D.backbone})")
    m.add_argument("--pretrained", default=None, choices=CHOICES["pretrained"], help=f"initial weights (default {D.pretrained})")
    m.add_argument("--weights", default=None, metavar="FILE|NAME",
                   help="local state_dict for the backbone (offline use), or a bundled model's name (e.g. fracatlas: "
                        "start from radiograph weights instead of ImageNet; `bonexray models` lists them)")
    m.add_argument("--image-size", type=int, default=None, help=f"input side in pixels (default {D.image_size})")
    m.add_argument("--dropout", type=float, default=None, help=f"before the heads (default {D.dropout})")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=None, help=f"default {D.epochs}")
    o.add_argument("--batch-size", type=int, default=None,
                   help=f"images per optimiser step, the effective batch (default {D.batch_size})")
    o.add_argument("--micro-batch", type=int, default=None, metavar="N",
                   help="images per forward pass, a divisor of --batch-size: the gradients of batch-size/N "
                        "micro-batches are accumulated into one step (same steps and schedule, less memory; "
                        "BatchNorm sees N images at a time). Default: on a CPU training in fp32 (no native bf16) "
                        f"up to {FP32_CPU_MICRO_BATCH}, else the whole batch; recorded in config.yaml and kept by --resume")
    o.add_argument("--lr", type=float, default=None, help=f"peak learning rate of AdamW (default {D.lr})")
    o.add_argument("--weight-decay", type=float, default=None, help=f"default {D.weight_decay}")
    o.add_argument("--schedule", choices=CHOICES["schedule"], default=None,
                   help=f"cosine: linear warm-up then cosine decay to 1%% of --lr; onecycle: PyTorch's OneCycleLR "
                        f"(default {D.schedule})")
    o.add_argument("--warmup-epochs", type=float, default=None, help=f"warm-up of the cosine schedule (default {D.warmup_epochs})")
    o.add_argument("--augment", choices=CHOICES["augment"], default=None,
                   help="standard: flip, rotation, scale, shift, gamma/contrast/brightness; robust: standard plus "
                        "quarter turns (half the images) and JPEG re-compression at quality 30-95 (30%%), so "
                        "verdicts hold under them; flip-rotate: horizontal flip and rotation up to 15 degrees only "
                        f"(default {D.augment})")
    o.add_argument("--class-weights", choices=CHOICES["class_weights"], default=None,
                   help="abnormality loss weights: per_body_part (the MURA paper's) or global (one positive weight, "
                        f"like BCE's pos_weight) (default {D.class_weights})")
    o.add_argument("--body-part-weight", type=float, default=None, help=f"weight of the body-part loss (default {D.body_part_weight})")
    o.add_argument("--localization-weight", type=float, default=None,
                   help="weight of the auxiliary fracture-localisation loss from the dataset's boxes "
                        f"(FracAtlas COCO annotations); 0 turns it off (default {D.localization_weight:g})")
    o.add_argument("--box-weight", type=float, default=None,
                   help="weight of the fracture-box loss (an FCOS-style head on stride-8 or stride-4 features (--box-stride), trained from the "
                        "dataset's boxes; predictions then carry `boxes`); 0 = no box head "
                        f"(default {D.box_weight:g})")
    o.add_argument("--box-stride", type=int, default=None, choices=(4, 8),
                   help="grid stride of the box head: 8 (the stride-8, 16 and final features fused at stride 8) or 4 "
                        "(the stride-4 level too, for fractures of a few stride-8 cells; same head cost, finer grid) "
                        f"(default {D.box_stride})")
    o.add_argument("--box-quality", choices=CHOICES["box_quality"], default=None,
                   help="what the box head's quality map learns, which multiplies into each box's score: FCOS's "
                        "centre-ness, or iou (the IoU of the cell's box with its fracture box: IoU-aware scoring) "
                        f"(default {D.box_quality})")
    o.add_argument("--box-threshold", type=float, default=None,
                   help="score at which a box is reported when no valid split is left to choose it on "
                        f"(--fit-on train chooses it on valid) (default {D.box_threshold:g})")
    o.add_argument("--ema-decay", type=float, default=None,
                   help="keep an exponential moving average of the weights (validated and saved instead of the raw "
                        f"weights), e.g. 0.995; 0 = off (default {D.ema_decay:g})")
    o.add_argument("--select", choices=CHOICES["select"], default=None,
                   help="best: best.ckpt is the epoch with the best --monitor value, with early stopping after "
                        "--patience epochs; last: best.ckpt is the final epoch, no early stopping "
                        f"(a fixed schedule; robust to a small, noisy valid split) (default {D.select})")
    o.add_argument("--monitor", choices=CHOICES["monitor"], default=None,
                   help=f"validation metric for --select best (default {D.monitor})")
    o.add_argument("--patience", type=int, default=None, help=f"early-stopping patience in epochs for --select best (default {D.patience})")
    o.add_argument("--threshold-method", choices=CHOICES["threshold_method"], default=None,
                   help=f"how the abnormality threshold is chosen on valid (default {D.threshold_method})")
    o.add_argument("--target-sensitivity", type=float, default=None,
                   help=f"for --threshold-method sensitivity (default {D.target_sensitivity})")
    o.add_argument("--seed", type=int, default=None, help=f"seed of initialisation, shuffling and augmentation (default {D.seed})")
    o.add_argument("--split-seed", type=int, default=None,
                   help="seed of the train/valid/test split (and of --limit's subset); kept apart from --seed "
                        f"so a rerun with another --seed is tested on the same images (default {D.split_seed})")

    r = p.add_argument_group("run")
    r.add_argument("--out", default=None, help="run directory (default runs/<date>-<backbone>): new, empty, or a run of "
                        "bonexray train")
    r.add_argument("--overwrite", action="store_true",
                   help="train into an --out folder that holds other files (never over --data)")
    r.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints/last.ckpt (integrity-checked) with the run's own config.yaml; a "
                        "flag that contradicts it (e.g. --image-size, --backbone, --epochs) is refused, and "
                        "--workers, --cache, --quiet may change")
    r.add_argument("--accelerator", default=None, help=f"auto, cpu, gpu, ... (default {D.accelerator})")
    r.add_argument("--devices", default=None, help=f"devices per node (Lightning syntax; default {D.devices})")
    r.add_argument("--num-nodes", type=int, default=None, help=f"nodes for multi-node DDP (default {D.num_nodes})")
    r.add_argument("--strategy", default=None, help=f"auto, ddp, ... (default {D.strategy})")
    r.add_argument("--precision", default=None, help="default: 16-mixed on GPU; bf16-mixed on a CPU with native bf16 (AVX-512 BF16 or AMX); 32 on other CPUs")
    r.add_argument("--max-steps", type=int, default=None, help="stop after N optimiser steps (smoke tests)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
