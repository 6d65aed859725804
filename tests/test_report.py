"""Plots, report.md and metrics.json."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bonexray.evaluation.figures import plot_confusion, plot_curves, plot_roc
from bonexray.evaluation.metrics import compute_metrics, study_table
from bonexray.evaluation.report import write_metrics_json, write_report

PARTS = ["elbow", "finger", "forearm", "hand", "humerus", "shoulder", "wrist"]


def _assert_png(path, min_side=250):
    assert path.is_file()
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert min(w, h) >= min_side and max(w, h) <= 4000


@pytest.fixture(scope="module")
def preds() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for s in range(300):
        part = PARTS[s % len(PARTS)]
        y = int(rng.random() < 0.4)
        for i in range(int(rng.integers(1, 4))):
            p = float(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1))
            pred = part if rng.random() < 0.85 else PARTS[int(rng.integers(len(PARTS)))]
            rows.append((f"{s}/{i}.png", f"st{s}", part, y, p, pred))
    return pd.DataFrame(rows, columns=["path", "study_id", "body_part", "abnormal",
                                       "prob_abnormal", "pred_body_part"])


@pytest.fixture(scope="module")
def metrics(preds):
    return compute_metrics(preds, 0.5, PARTS, n_bootstrap=200, seed=0)


def _lightning_csv(path, epochs=5, with_step_cols=True):
    """Mimic CSVLogger: train and valid values on separate, NaN-padded rows."""
    cols = ["epoch", "step", "train_loss", "train_acc_abnormal", "train_acc_body_part",
            "valid_loss", "valid_acc_abnormal", "valid_acc_body_part", "valid_auroc"]
    rows, step = [], 0
    for e in range(epochs):
        for _ in range(3 if with_step_cols else 1):
            step += 10
            rows.append({"epoch": e, "step": step, "train_loss": 1.0 / (e + 1),
                         "train_acc_abnormal": 0.6 + 0.05 * e,
                         "train_acc_body_part": 0.7 + 0.04 * e})
        rows.append({"epoch": e, "step": step, "valid_loss": 1.2 / (e + 1),
                     "valid_acc_abnormal": 0.55 + 0.05 * e, "valid_acc_body_part": 0.65 + 0.05 * e,
                     "valid_auroc": 0.6 + 0.06 * e})
    pd.DataFrame(rows, columns=cols).to_csv(path, index=False)
    return path


def test_all_plots_are_valid_pngs(tmp_path, preds, metrics):
    plot_confusion(metrics["confusion"]["abnormality"], ["normal", "abnormal"],
                   tmp_path / "confusion_abnormality.png", "Abnormality")
    plot_confusion(metrics["confusion"]["body_part"], PARTS,
                   tmp_path / "confusion_body_part.png", "Body part")
    st = study_table(preds)
    assert plot_roc(preds.abnormal, preds.prob_abnormal, st.abnormal, st.prob_abnormal,
                    tmp_path / "roc.png")
    assert plot_curves(_lightning_csv(tmp_path / "metrics.csv"), tmp_path / "curves.png")
    for name in ("confusion_abnormality", "confusion_body_part", "roc", "curves"):
        _assert_png(tmp_path / f"{name}.png")


def test_plot_confusion_handles_empty_rows_and_long_labels(tmp_path):
    labels = ["a_rather_long_label_name", "b", "never_seen_class"]
    plot_confusion([[3, 1, 0], [0, 2, 0], [0, 0, 0]], labels, tmp_path / "c.png", "t")
    _assert_png(tmp_path / "c.png", min_side=200)


def test_plot_roc_undefined_returns_false(tmp_path):
    assert not plot_roc([0, 0], [0.1, 0.2], [0], [0.15], tmp_path / "roc.png")
    assert not (tmp_path / "roc.png").exists()
    # One level defined is enough.
    assert plot_roc([0, 1, 0, 1], [0.1, 0.8, 0.3, 0.6], [1], [0.7], tmp_path / "roc.png")
    _assert_png(tmp_path / "roc.png")


def test_plot_curves_variants(tmp_path):
    # Only a loss column, with Lightning's _epoch/_step suffixes.
    pd.DataFrame({"epoch": [0, 0, 1, 1], "step": [1, 1, 2, 2],
                  "train_loss_step": [1.0, np.nan, 0.8, np.nan],
                  "train_loss_epoch": [np.nan, 0.9, np.nan, 0.7]}).to_csv(
        tmp_path / "m1.csv", index=False)
    assert plot_curves(tmp_path / "m1.csv", tmp_path / "c1.png")
    _assert_png(tmp_path / "c1.png", min_side=200)
    # Nothing known to plot, an empty file, and a missing file.
    pd.DataFrame({"epoch": [0], "step": [1], "lr": [0.1]}).to_csv(tmp_path / "m2.csv",
                                                                  index=False)
    assert not plot_curves(tmp_path / "m2.csv", tmp_path / "c2.png")
    (tmp_path / "m3.csv").write_text("")
    assert not plot_curves(tmp_path / "m3.csv", tmp_path / "c3.png")
    assert not plot_curves(tmp_path / "missing.csv", tmp_path / "c4.png")
    assert not any((tmp_path / f"c{i}.png").exists() for i in (2, 3, 4))


def test_plot_curves_aggregates_per_epoch(tmp_path, monkeypatch):
    """Check the plotted data, not just the file: capture the Line2D objects."""
    from bonexray.evaluation import figures

    captured = {}
    real_save = figures.save_figure

    def keep(fig, path):
        captured["fig"] = fig
        return real_save(fig, path)

    monkeypatch.setattr(figures, "save_figure", keep)
    assert plot_curves(_lightning_csv(tmp_path / "m.csv", epochs=4), tmp_path / "c.png")
    fig = captured["fig"]
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Loss", "Abnormality", "Body part"]
    loss = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert list(loss["train"].get_xdata()) == [0, 1, 2, 3]
    assert list(loss["train"].get_ydata()) == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    assert list(loss["valid"].get_ydata()) == pytest.approx([1.2, 0.6, 0.4, 0.3])
    labels = {ln.get_label() for ln in fig.axes[1].get_lines()}
    assert labels == {"train acc", "valid acc", "valid AUROC"}


def test_write_report_contains_numbers_and_links(tmp_path, preds, metrics):
    plot_confusion(metrics["confusion"]["abnormality"], ["normal", "abnormal"],
                   tmp_path / "confusion_abnormality.png", "Abnormality")
    st = study_table(preds)
    plot_roc(preds.abnormal, preds.prob_abnormal, st.abnormal, st.prob_abnormal,
             tmp_path / "roc.png")
    info = {"checkpoint": "runs/r1/best.ckpt", "data": "/data/MURA", "split": "valid"}
    path = write_report(tmp_path, metrics, PARTS, info)
    text = path.read_text()
    assert path == tmp_path / "report.md"
    ab = metrics["abnormality"]
    for needle in ("runs/r1/best.ckpt", "/data/MURA", "valid", str(metrics["n_images"]),
                   str(metrics["n_studies"]), "0.500",
                   f"{ab['image']['auroc']:.3f}", f"{ab['study']['auroc']:.3f}",
                   f"{ab['study']['kappa']:.3f}", f"{ab['ci95']['study_kappa'][0]:.3f}",
                   f"{ab['ci95']['image_auroc'][1]:.3f}",
                   f"{ab['per_body_part']['wrist']['study']['kappa']:.3f}",
                   f"{metrics['body_part']['macro_precision']:.3f}",
                   f"{metrics['body_part']['per_class']['humerus']['recall']:.3f}"):
        assert needle in text, needle
    assert "](confusion_abnormality.png)" in text and "](roc.png)" in text
    # Missing PNGs are not linked.
    assert "confusion_body_part.png" not in text and "curves.png" not in text
    # Every table row has the same number of cells as its header (renders on GitHub).
    for block in text.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            assert len({ln.count(" | ") for ln in lines}) == 1, block


def test_write_report_shows_na_for_none(tmp_path):
    df = pd.DataFrame({"path": list("abcd"), "study_id": [1, 1, 2, 2], "body_part": "hand",
                       "abnormal": 0, "prob_abnormal": [0.1, 0.2, 0.3, 0.1],
                       "pred_body_part": "hand"})
    m = compute_metrics(df, 0.5, ["hand", "wrist"], n_bootstrap=20)
    text = write_report(tmp_path, m, ["hand", "wrist"], {"checkpoint": None}).read_text()
    assert "| AUROC | n/a | n/a |" in text
    assert "nan" not in text.lower().replace("n/a", "")


def test_write_metrics_json_sorted_strict_atomic(tmp_path, metrics):
    path = tmp_path / "sub" / "metrics.json"
    write_metrics_json(path, {**metrics, "extra": {"b": np.float64("nan"), "a": np.int64(3)}})
    text = path.read_text()
    data = json.loads(text)
    assert data["extra"] == {"a": 3, "b": None}
    assert data["abnormality"]["study"]["auroc"] == pytest.approx(
        metrics["abnormality"]["study"]["auroc"])
    assert list(data) == sorted(data)
    assert list(data["abnormality"]["image"]) == sorted(data["abnormality"]["image"])
    assert "NaN" not in text
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp left
    # Writing twice is byte-identical (stable diffs between runs).
    write_metrics_json(path, {**metrics, "extra": {"a": 3, "b": math.nan}})
    assert path.read_text() == text


def test_evaluation_modules_import_without_cycles_or_private_names():
    """The evaluation modules form no import cycle (lazy imports included) and import no private name
    (``_fmt``, ``_clean``, ``_save``, ...) from one another."""
    import ast
    from pathlib import Path

    import bonexray.evaluation as package

    folder = Path(package.__file__).parent
    graph, private = {}, []
    for path in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
                private += [f"{path.stem} <- {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        graph[path.stem] = deps & {p.stem for p in folder.glob("*.py")}
    assert not private, private

    def reach(start, seen):
        for d in graph[start]:
            if d not in seen:
                seen.add(d)
                reach(d, seen)
        return seen

    cycles = [m for m in graph if m in reach(m, set())]
    assert not cycles, {m: graph[m] for m in cycles}


def test_figures_leave_the_matplotlib_backend_alone(tmp_path):
    """No backend is selected at import or when a figure is saved (a notebook keeps its own), and no figure
    is left registered with pyplot (third-party imports may load pyplot; our figures do not use it)."""
    import subprocess
    import sys

    code = f"""
import sys, matplotlib
matplotlib.use("svg")
from bonexray.evaluation import calibration, evaluate, figures, localization, report
figures.plot_confusion([[1, 2], [0, 3]], ["normal", "abnormal"], r"{tmp_path / 'c.png'}", "t")
localization.plot_froc({{"fp_per_image": [0, 0.5, 1.5], "sensitivity": [0, 0.4, 0.6], "n_images": 4, "n_boxes": 5}},
                       r"{tmp_path / 'f.png'}")
cal = calibration.calibration_metrics([0, 1, 1, 0], [0.2, 0.7, 0.9, 0.4])
calibration.plot_reliability(cal, r"{tmp_path / 'r.png'}")
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("c.png", "f.png", "r.png"):
        _assert_png(tmp_path / name, min_side=200)


def test_report_shows_both_box_protocols(tmp_path, metrics):
    from bonexray.evaluation.localization import localization_metrics

    gts = [np.array([[0, 0, 10, 10]]), np.zeros((0, 4))]
    preds = [np.array([[0, 0, 10, 10, 0.5]]), np.array([[0, 0, 10, 10, 0.9]])]  # an FP on the normal image first
    loc = localization_metrics(preds, gts, ["a", "b"], n_bootstrap=20)
    text = write_report(tmp_path, {**metrics, "localization": loc}, PARTS, {}).read_text()
    assert "| AP50 (COCO) | 0.500 [" in text and "| 1.000 [1.000, 1.000] |" in text  # all images | fractured only
    assert "Fractured images only" in text and "FracAtlas's official protocol" in text
