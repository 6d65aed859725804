import functools
import http.server
import io
import os
import subprocess
import sys
import threading
import zipfile

import pytest

from bonexray.cli import main
from bonexray.data.download import download_fracatlas
from bonexray.data.preprocess import ImageCache
from bonexray.errors import DatasetError

from builders import bonexray_cmd, make_manifest, nonblank_lines, radiograph_like, run_main, subprocess_env


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "bonexray.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("download", "preprocess", "train", "evaluate", "predict", "export", "serve"):
        assert cmd in out


def _fracatlas_zip() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("FracAtlas/dataset.csv",
                    "image_id,hand,leg,hip,shoulder,mixed,hardware,multiscan,fractured,fracture_count,frontal,lateral,oblique\n"
                    "IMG0000000.jpg,1,0,0,0,0,0,0,0,0,1,0,0\nIMG0000001.jpg,0,1,0,0,0,0,0,1,1,1,0,0\n")
        for name, folder, ab in (("IMG0000000.jpg", "Non_fractured", 0), ("IMG0000001.jpg", "Fractured", 1)):
            jb = io.BytesIO()
            Image.fromarray(radiograph_like(ab, abnormal=ab)).save(jb, format="JPEG")
            zf.writestr(f"FracAtlas/images/{folder}/{name}", jb.getvalue())
    return buf.getvalue()


@pytest.fixture
def http_root(tmp_path):
    served = tmp_path / "www"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_fracatlas_from_local_server(tmp_path, http_root, capsys):
    served, base = http_root
    (served / "fa.zip").write_bytes(_fracatlas_zip())
    assert main(["download", "fracatlas", "--dest", str(tmp_path / "dl"), "--url", f"{base}/fa.zip", "--quiet"]) == 0
    assert (tmp_path / "dl" / "FracAtlas" / "dataset.csv").is_file()
    assert not (tmp_path / "dl" / "FracAtlas.zip").exists()
    assert "FracAtlas ready" in capsys.readouterr().out
    # A second call finds it and does not download again.
    assert download_fracatlas(tmp_path / "dl", url=f"{base}/gone.zip", progress=False).name == "FracAtlas"


def test_download_bad_zip_and_offline(tmp_path, http_root, capsys):
    served, base = http_root
    (served / "bad.zip").write_bytes(b"this is not a zip")
    with pytest.raises(DatasetError, match="not a valid zip"):
        download_fracatlas(tmp_path / "a", url=f"{base}/bad.zip", progress=False)
    with pytest.raises(DatasetError, match="SHA-256 mismatch"):
        (served / "fa.zip").write_bytes(_fracatlas_zip())
        download_fracatlas(tmp_path / "b", url=f"{base}/fa.zip", sha256="0" * 64, progress=False)
    assert main(["download", "fracatlas", "--dest", str(tmp_path / "c"), "--url", f"{base}/missing.zip", "--quiet"]) == 2
    assert "could not download" in capsys.readouterr().err


def test_download_mura_explains(capsys):
    assert main(["download", "mura"]) == 0
    out = capsys.readouterr().out
    assert "stanfordmlgroup" in out and "MURA-v1.1" in out


def test_preprocess_cli_summary_and_reuse(tmp_path, capsys):
    manifest = make_manifest(tmp_path / "d", n=6)
    assert main(["preprocess", str(manifest), "--out", str(tmp_path / "c"), "--size", "32", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "built cache" in out and "ok=6" in out and "hand=3" in out
    assert main(["preprocess", str(manifest), "--out", str(tmp_path / "c"), "--size", "32", "--quiet"]) == 0
    assert "reused cache" in capsys.readouterr().out


def test_preprocess_cli_bad_data_is_one_line(tmp_path, capsys):
    assert main(["preprocess", str(tmp_path / "nothing"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bonexray preprocess: error:") and "Traceback" not in err


def test_download_fracatlas_without_network_is_one_line(tmp_path):
    """The README's first step, with its default URL, on a machine without network: exit 2, one line."""
    import socket

    with socket.socket() as s:  # a local port nobody listens on: every connection is refused
        s.bind(("127.0.0.1", 0))
        dead_proxy = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "https_proxy": dead_proxy, "HTTPS_PROXY": dead_proxy, "http_proxy": dead_proxy,
           "HTTP_PROXY": dead_proxy, "no_proxy": "", "NO_PROXY": ""}
    proc = subprocess.run([sys.executable, "-m", "bonexray.cli", "download", "fracatlas", "--dest", str(tmp_path / "dl"),
                           "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bonexray download: error: could not download https://figshare.com/")
    assert "offline" in lines[0]
    assert list((tmp_path / "dl").iterdir()) == []  # no partial download left


def test_download_verifies_the_pinned_sha256(tmp_path, http_root, capsys, monkeypatch):
    import hashlib

    import bonexray.data.download as dl

    served, base = http_root
    release = _fracatlas_zip()
    (served / "fa.zip").write_bytes(release)
    monkeypatch.setattr(dl, "FRACATLAS_URL", f"{base}/fa.zip")  # stands in for figshare
    monkeypatch.setattr(dl, "FRACATLAS_SHA256", hashlib.sha256(b"another release").hexdigest())
    assert main(["download", "fracatlas", "--dest", str(tmp_path / "a"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "FracAtlas.zip: SHA-256 mismatch" in err and hashlib.sha256(release).hexdigest() in err
    assert list((tmp_path / "a").iterdir()) == []  # the mismatching zip is deleted, nothing unpacked
    monkeypatch.setattr(dl, "FRACATLAS_SHA256", hashlib.sha256(release).hexdigest())
    assert main(["download", "fracatlas", "--dest", str(tmp_path / "b"), "--quiet"]) == 0
    assert f"SHA-256 {hashlib.sha256(release).hexdigest()} (verified)" in capsys.readouterr().out
    assert (tmp_path / "b" / "FracAtlas" / "dataset.csv").is_file()
    # --sha256 overrides the pinned value (e.g. for a mirror); a malformed value is refused.
    assert main(["download", "fracatlas", "--dest", str(tmp_path / "c"), "--sha256", "0" * 64, "--quiet"]) == 2
    assert main(["download", "fracatlas", "--dest", str(tmp_path / "d"), "--sha256", "abc", "--quiet"]) == 2
    assert "not a SHA-256" in capsys.readouterr().err


# ---------------------------------------------------------------------------- manifest labels and dropped rows


def test_manifest_label_spellings_are_one_documented_set(tmp_path):
    from bonexray.data.manifest import parse_label

    for text in ("1", "1.0", "TRUE", "yes", "Abnormal", "positive", " 1 "):
        assert parse_label(text) == (1, ""), text
    for text in ("0", "0.0", "false", "No", "normal", "negative"):
        assert parse_label(text) == (0, ""), text
    for text in ("2", "-1", "0.5", "nan", "", "unknown", "1.5", "y"):
        label, why = parse_label(text)
        assert label is None and why, text


def test_evaluate_names_and_counts_every_dropped_row(tmp_path, capsys):
    import json

    from builders import make_checkpoint

    manifest = make_manifest(tmp_path / "d", n=12, parts=("hand", "leg"))
    rows = manifest.read_text().splitlines()
    # image index -> label written for it
    odd = {0: "2", 1: "-1", 2: "0.5", 3: "nan", 4: "", 5: "1.0", 6: "yes", 7: "True"}
    fixed = [rows[0]]
    for i, line in enumerate(rows[1:]):
        cells = line.split(",")
        if i in odd:
            cells[2] = odd[i]
        fixed.append(",".join(cells))
    fixed.append("gone.png,hand,1,s99")
    manifest.write_text("\n".join(fixed) + "\n")
    ckpt = make_checkpoint(tmp_path / "m.ckpt", body_parts=("hand", "leg"), image_size=64)
    rc = main(["evaluate", str(ckpt), "--data", str(manifest), "--split", "all", "--out", str(tmp_path / "r"),
               "--bootstrap", "0", "--backend", "torch", "--cache", str(tmp_path / "c")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    named = [ln for ln in err.splitlines() if "dropped" in ln]
    for i in (0, 1, 2, 3, 4):
        assert any(f"img{i:03d}.png" in ln for ln in named), (i, err)
    assert any("gone.png" in ln and "missing" in ln for ln in named), err
    assert any("img004.png" in ln and "blank" in ln for ln in named)
    assert any("img000.png" in ln and "'2'" in ln for ln in named)
    assert not any(f"img{i:03d}.png" in ln for i in (5, 6, 7) for ln in named)  # 1.0, yes, True are labels
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["dropped_rows"]["n"] == 6 and len(metrics["dropped_rows"]["rows"]) == 6
    assert metrics["n_images"] == 12 - 5
    assert "dropped_rows" in (tmp_path / "r" / "report.md").read_text()
    assert "dropped 6 row(s)" in out


@pytest.mark.parametrize("sep, name", [(";", "semicolon"), ("\t", "tab")])
def test_a_manifest_with_another_delimiter_gets_a_hint(tmp_path, sep, name):
    from bonexray.data.manifest import read_manifest

    manifest = make_manifest(tmp_path / "d", n=4)
    manifest.write_text(manifest.read_text().replace(",", sep))
    with pytest.raises(DatasetError, match=rf"missing: .*{name}-separated.*commas"):
        read_manifest(manifest)


@pytest.mark.parametrize("name", ["hand\nleg", "<script>alert(1)</script>", "hand\x00", "leg\x1b[31m", "a\tb",
                                  'hip"', "x" * 65])
def test_model_card_refuses_body_part_names_that_are_not_plain(name):
    from bonexray.errors import CheckpointError
    from bonexray.model.checkpoint import ModelCard

    with pytest.raises(CheckpointError, match="not a plain name"):
        ModelCard(backbone="efficientnet_lite0", image_size=64, mean=[0.5], std=[0.25], body_parts=["hand", name])
    ModelCard(backbone="efficientnet_lite0", image_size=64, mean=[0.5], std=[0.25],
              body_parts=["hand", "lower leg", "hip-joint", "Hand_2", "手"])


def test_download_never_deletes_a_folder_or_zip_it_did_not_make(tmp_path, http_root, capsys, monkeypatch):
    import hashlib

    import bonexray.data.download as dl

    served, base = http_root
    (served / "fa.zip").write_bytes(_fracatlas_zip())
    # A user's own folder named FracAtlas that is not a FracAtlas tree: refused before any download.
    mine = tmp_path / "a" / "FracAtlas"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    assert main(["download", "fracatlas", "--dest", str(tmp_path / "a"), "--url", f"{base}/fa.zip", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(mine) in err[0] and "not a FracAtlas tree" in err[0]
    assert (mine / "notes.txt").read_text() == "mine" and not (tmp_path / "a" / "FracAtlas.zip").exists()
    # A FracAtlas.zip that was already there and does not match the pinned SHA-256 is kept, not deleted.
    own = tmp_path / "b" / "FracAtlas.zip"
    own.parent.mkdir()
    own.write_bytes(b"the user's own archive")
    monkeypatch.setattr(dl, "FRACATLAS_SHA256", hashlib.sha256(b"another release").hexdigest())
    assert main(["download", "fracatlas", "--dest", str(tmp_path / "b"), "--url", f"{base}/fa.zip", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SHA-256 mismatch" in err[0] and "kept" in err[0]
    assert own.read_bytes() == b"the user's own archive"


@pytest.mark.parametrize("limit", [-5, 0])
def test_preprocess_limit_below_one_is_refused(limit, tmp_path, capsys):
    manifest = make_manifest(tmp_path / "data", n=6)
    rc, out, err = run_main(capsys, "preprocess", manifest, "--out", tmp_path / "cache", "--limit", limit, "--quiet")
    assert rc == 2 and nonblank_lines(err) == [f"bonexray preprocess: error: --limit {limit}: give a number of images "
                                               ">= 1 (leave it out for all)"]
    assert not (tmp_path / "cache").exists()


def test_preprocess_into_a_closed_pipe_is_quiet(tmp_path):
    manifest = make_manifest(tmp_path / "data", n=4)
    proc = subprocess.Popen(bonexray_cmd("preprocess", manifest, "--out", tmp_path / "cache", "--workers", 1, "--quiet"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env())
    proc.stdout.close()  # `| head -0`: the reader is gone before the first line
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert proc.returncode == 0 and ImageCache.open(tmp_path / "cache").summary()["images"] == 4
