"""Named models shipped inside the package, and the one place a MODEL argument becomes a file.

A MODEL argument (predict, evaluate, serve, export, pacs, ``bonexray.load_model``,
``train --weights``) is resolved by :func:`resolve_model`: a path that exists wins; otherwise a
registered name (``fracatlas``, or the full name that says data, backbone and resolution) gives the
bundled checkpoint in ``bonexray/weights/``, whose SHA-256 is pinned here in :data:`BUNDLED` and
checked before the file is used. Next to each bundled checkpoint, ``<name>.json`` (written by
``bench/build_bundled_model.py``) holds what ``bonexray models`` shows: training data, licence and
citation, test metrics with CIs, and predictions on three reference images (checked by the tests).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.hashing import file_sha256  # noqa: F401 (re-exported)
from ..errors import CheckpointError

#: Folder of the bundled files (package data).
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


@dataclass(frozen=True)
class BundledModel:
    """One registry row: the name says training data, backbone and input size; aliases are short names."""

    name: str
    aliases: tuple[str, ...]
    #: SHA-256 of the bundled checkpoint file, pinned when it is built; None: not built yet.
    sha256: str | None

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.ckpt"

    @property
    def info_path(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.json"

    def info(self) -> dict[str, Any]:
        """The build's description (card, metrics, licence); {} when the file is absent."""
        try:
            return json.loads(self.info_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{self.info_path}: unreadable bundled model description ({err})") from None


#: The registry. To rebuild: ``python bench/build_bundled_model.py CKPT --data FracAtlas --metrics
#: RESULTS/metrics.json``, then paste the SHA-256 it prints here.
BUNDLED: tuple[BundledModel, ...] = (
    BundledModel("fracatlas-efficientnet_lite0-320", ("fracatlas",),
                 sha256="c5255174b22649218a82a20564e698f124db6a859256268520261aa40f8dfb58"),
)

DEFAULT_MODEL = "fracatlas"
_MODEL_SUFFIXES = {".ckpt", ".onnx", ".pt", ".pth"}
_verified: dict[tuple[str, int, int], bool] = {}


def known_names() -> list[str]:
    return [n for m in BUNDLED for n in (m.name, *m.aliases)]


def find_bundled(name: str) -> BundledModel | None:
    for m in BUNDLED:
        if name == m.name or name in m.aliases:
            return m
    return None


@dataclass
class ModelFile:
    """A resolved MODEL argument: the file, and its SHA-256 once computed (a bundled model's from its check),
    so the backend record and the export cache key read the file's hash, not the file, again."""

    path: Path
    known_sha256: str | None = None
    #: The file's bytes when the caller has read them already (a verified ONNX file): hashed from memory.
    data: bytes | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        if self.known_sha256 is None:
            self.known_sha256 = hashlib.sha256(self.data).hexdigest() if self.data is not None else file_sha256(self.path)
        return self.known_sha256


def verify_bundled(model: BundledModel) -> Path:
    """The bundled file's path after checking it against the pinned SHA-256 (once per process and file state)."""
    return verify_bundled_file(model).path


def verify_bundled_file(model: BundledModel) -> ModelFile:
    """:func:`verify_bundled`, with the verified hash kept."""
    p = model.path
    if not p.is_file():
        raise CheckpointError(f"bundled model {model.name!r} is not built in this copy of bonexray ({p} is missing; "
                              "build it with bench/build_bundled_model.py, or give a checkpoint path)")
    if model.sha256 is None:
        raise CheckpointError(f"{p}: bundled model {model.name!r} has no SHA-256 pinned in bonexray.model.hub.BUNDLED; "
                              "refusing an unverified file")
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _verified:
        got = file_sha256(p)
        if got != model.sha256:
            raise CheckpointError(f"{p}: bundled model {model.name!r} does not match its pinned SHA-256 "
                                  f"(got {got[:16]}..., want {model.sha256[:16]}...); the file was changed or damaged")
        _verified[key] = True
    return ModelFile(p, model.sha256)


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A MODEL argument -> the file to load: an existing path wins; else a registered name (checked against
    its pinned hash); None -> the default bundled model. Anything else: one line naming the known names."""
    return resolve_model_file(model).path


def resolve_model_file(model: str | os.PathLike | ModelFile | None) -> ModelFile:
    """:func:`resolve_model`, keeping a bundled model's verified SHA-256 with the path."""
    if isinstance(model, ModelFile):
        return model
    if model is None:
        model = DEFAULT_MODEL
    p = Path(model)
    if p.exists():
        return ModelFile(p)
    found = find_bundled(str(model))
    if found is not None:
        return verify_bundled_file(found)
    if p.suffix.lower() in _MODEL_SUFFIXES or os.sep in str(model):  # meant as a file
        what = "checkpoint" if p.suffix.lower() == ".ckpt" else "model"
        raise CheckpointError(f"{p}: {what} file not found")
    raise CheckpointError(f"{model}: no such file, and not a bundled model name (known: {', '.join(known_names())})")


def describe_models() -> list[dict[str, Any]]:
    """One row per registered model for ``bonexray models``: what its description file says, and whether it is built."""
    rows = []
    for m in BUNDLED:
        info = m.info()
        card = info.get("card", {})
        row = {"name": m.name, "aliases": list(m.aliases), "built": m.path.is_file(),
               "backbone": card.get("backbone"), "image_size": card.get("image_size"),
               "classes": ["normal", "abnormal"] + [f"body part: {b}" for b in card.get("body_parts", [])],
               "training_data": info.get("training_data"), "test_metrics": info.get("test_metrics"),
               "size_bytes": m.path.stat().st_size if m.path.is_file() else None, "sha256": m.sha256,
               "licence": info.get("licence"), "intended_use": info.get("intended_use")}
        rows.append(row)
    return rows


def format_models(rows: list[dict[str, Any]]) -> str:
    """Human-readable ``bonexray models`` output."""
    out = []
    for r in rows:
        out.append(f"{r['name']}  (aliases: {', '.join(r['aliases']) or '-'})")
        if not r["built"]:
            out.append("  not built in this copy of bonexray (bench/build_bundled_model.py builds it)")
            continue
        out.append(f"  backbone {r['backbone']}, input {r['image_size']} px, classes: {', '.join(r['classes'])}")
        td = r.get("training_data") or {}
        if td:
            out.append(f"  trained on: {td.get('dataset')} ({td.get('protocol', '')}); licence {td.get('licence')}")
        tm = r.get("test_metrics") or {}
        for key, label in (("image_auroc", "AUROC (image)"), ("study_auroc", "AUROC (study)"),
                           ("sensitivity", "sensitivity"), ("specificity", "specificity"),
                           ("body_part_accuracy", "body-part accuracy")):
            v = tm.get(key)
            if isinstance(v, dict) and v.get("value") is not None:
                ci = v.get("ci95")
                out.append(f"  test {label}: {v['value']:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""))
        if tm.get("n_images"):
            out.append(f"  test set: {tm['n_images']} images ({tm.get('split_protocol', '')})")
        out.append(f"  size {r['size_bytes'] / 1e6:.1f} MB, SHA-256 {r['sha256']}")
        if r.get("intended_use"):
            out.append(f"  {r['intended_use']}")
    return "\n".join(out)
