"""The one typed training configuration: defaults here, recipes (YAML) on top, command-line flags on top.

``options.py`` (the CLI), the shipped recipes, ``config.yaml`` in every run directory and
``run_training`` all read these fields; nothing else holds a default. Kept free of torch so
``bonexray --help`` stays instant.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import BonexrayError

CHOICES = {
    "pretrained": ("imagenet", "none"),
    "monitor": ("valid_loss", "valid_auroc"),
    "select": ("best", "last"),
    "schedule": ("cosine", "onecycle"),
    "augment": ("standard", "robust", "flip-rotate"),
    "class_weights": ("per_body_part", "global"),
    "threshold_method": ("youden", "sensitivity"),
    "fit_on": ("train", "train+valid"),
    "box_quality": ("centerness", "iou"),
}


@dataclass
class TrainConfig:
    # data
    data: str | None = None
    cache: str | None = None
    limit: int | None = None
    valid_frac: float = 0.15
    test_frac: float = 0.15
    #: "train+valid": the final fit, once choices are made on valid; test stays untouched.
    fit_on: str = "train"
    workers: int | None = None
    allow_unreadable: bool = False
    # model
    recipe: str | None = None
    backbone: str = "resnet50"
    pretrained: str = "imagenet"
    weights: str | None = None
    image_size: int = 224
    dropout: float = 0.0
    # optimisation
    epochs: int = 10
    #: The effective batch: images per optimiser step (what the learning rate and schedule are planned for).
    batch_size: int = 32
    #: Images per forward pass; batch_size / micro_batch micro-batches are accumulated into one optimiser
    #: step. None: chosen by :func:`default_micro_batch` (recorded in config.yaml as micro_batch_used).
    micro_batch: int | None = None
    lr: float = 3e-4
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    augment: str = "standard"
    class_weights: str = "per_body_part"
    body_part_weight: float = 1.0
    localization_weight: float = 0.0
    box_weight: float = 0.0
    box_threshold: float = 0.3
    #: Grid stride of the box head (model/detection.py BOX_STRIDES): 8, or 4 for small fractures.
    box_stride: int = 8
    #: What the box head's third map learns (model/detection.py BOX_QUALITIES): centerness or iou.
    box_quality: str = "centerness"
    ema_decay: float = 0.0
    select: str = "best"
    monitor: str = "valid_auroc"
    patience: int = 5
    threshold_method: str = "youden"
    target_sensitivity: float = 0.9
    seed: int = 0
    split_seed: int = 0
    # run
    out: str | None = None
    resume: bool = False
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None
    max_steps: int | None = None
    quiet: bool = False
    #: Train into an --out folder that holds other files (bonexray/output_folder.py).
    overwrite: bool = False
    #: The flags given explicitly (they win over any recipe); not part of the saved config.
    given: dict = field(default_factory=dict, repr=False, compare=False)

    @staticmethod
    def field_names() -> list[str]:
        return [f.name for f in fields(TrainConfig) if f.name != "given"]

    @staticmethod
    def shipped_recipes() -> list[str]:
        return sorted(p.name[:-5] for p in resources.files("bonexray.recipes").iterdir() if p.name.endswith(".yaml"))

    @staticmethod
    def load_recipe(name: str) -> dict:
        """A recipe is a YAML file: a shipped name (``fracatlas``, ``mura``, ``baseline``) or a path."""
        path = Path(name)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            text = path.read_text()
        else:
            try:
                text = resources.files("bonexray.recipes").joinpath(f"{name}.yaml").read_text()
            except FileNotFoundError as e:
                raise BonexrayError(f"unknown recipe {name!r}; shipped recipes: "
                                    f"{', '.join(TrainConfig.shipped_recipes())}, or pass a .yaml file") from e
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise BonexrayError(f"recipe {name}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise BonexrayError(f"recipe {name}: expected a mapping of option: value")
        unknown = set(data) - set(TrainConfig.field_names()) - {"description"}
        if unknown:
            raise BonexrayError(f"recipe {name}: unknown keys {', '.join(sorted(unknown))}")
        data.pop("description", None)
        return data

    @classmethod
    def from_args(cls, args: argparse.Namespace | dict, recipe: str | None = None) -> "TrainConfig":
        """Defaults <- recipe (``--recipe``, else ``recipe``) <- explicitly given flags (not None / not False)."""
        raw = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        names = set(cls.field_names())
        given = {k: v for k, v in raw.items() if k in names and v is not None and v is not False}
        values: dict[str, Any] = {}
        chosen = given.get("recipe") or recipe
        if chosen:
            values.update(cls.load_recipe(chosen))
            values["recipe"] = chosen
        values.update(given)
        cfg = cls(**values, given=given)
        cfg.validate()
        return cfg

    def with_dataset_recipe(self, source: str) -> "TrainConfig":
        """Without ``--recipe``, the shipped recipe of the dataset's source (FracAtlas, MURA) applies."""
        if self.recipe or source not in self.shipped_recipes():
            return self
        return type(self).from_args(self.given, recipe=source)

    def validate(self) -> None:
        for k in ("epochs", "batch_size", "image_size"):
            if int(getattr(self, k)) < 1:
                raise BonexrayError(f"--{k.replace('_', '-')} must be >= 1 (got {getattr(self, k)})")
        if not 32 <= self.image_size <= 2048:
            raise BonexrayError(f"--image-size must be between 32 and 2048 (got {self.image_size}); "
                                "a model card outside that range is refused at load")
        if self.limit is not None and int(self.limit) < 1:
            raise BonexrayError(f"--limit {self.limit}: give a number of images >= 1 (leave it out for all)")
        if not 0 < self.valid_frac < 1 or not 0 <= self.test_frac < 1 or self.valid_frac + self.test_frac >= 1:
            raise BonexrayError("--valid-frac and --test-frac must be fractions summing to less than 1")
        if not self.box_weight >= 0 or not self.localization_weight >= 0:  # `not >=` also catches NaN
            raise BonexrayError("--box-weight and --localization-weight must be >= 0")
        if self.box_stride not in (4, 8):
            raise BonexrayError(f"--box-stride must be 4 or 8 (got {self.box_stride})")
        if not 0 < self.box_threshold < 1:
            raise BonexrayError(f"--box-threshold must be in (0, 1) (got {self.box_threshold})")
        if not 0 <= self.ema_decay < 1:
            raise BonexrayError(f"--ema-decay must be in [0, 1) (got {self.ema_decay})")
        if self.fit_on == "train+valid" and self.select != "last":
            raise BonexrayError("--fit-on train+valid trains on the valid split, so nothing can be selected on it: "
                                "use --select last")
        if self.micro_batch is not None:
            m, b = int(self.micro_batch), int(self.batch_size)
            if not 1 <= m <= b or b % m:
                raise BonexrayError(f"--micro-batch {self.micro_batch}: give a divisor of --batch-size {b} (the "
                                    "micro-batches of one optimiser step must add up to the batch)")
        for k, allowed in CHOICES.items():
            if getattr(self, k) not in allowed:
                raise BonexrayError(f"{k} must be one of {', '.join(allowed)} (got {getattr(self, k)!r})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("given")
        return d


DEFAULTS = TrainConfig()

#: Largest forward pass where fp32 training is the default (CPUs without native bf16): two micro-batches
#: of 16 for the recipes' batch of 32 keep the recipe within 6 GB (bench/RESULTS.md, Training memory).
FP32_CPU_MICRO_BATCH = 16


def default_micro_batch(batch_size: int, precision: str, on_gpu: bool) -> int:
    """Images per forward pass when --micro-batch is not given: on a CPU training in fp32 (no native bf16:
    ``bonexray.hardware.default_training_precision``), the largest divisor of ``batch_size`` up to
    ``FP32_CPU_MICRO_BATCH``, so activations of half the batch at a time; elsewhere the whole batch."""
    batch_size = int(batch_size)
    if on_gpu or not str(precision).startswith("32"):
        return batch_size
    return max(d for d in range(1, min(batch_size, FP32_CPU_MICRO_BATCH) + 1) if batch_size % d == 0)
