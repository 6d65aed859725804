import functools
import http.server
import io
import subprocess
import sys
import threading
import zipfile

import pytest

from bonexray.cli import main
from bonexray.data.download import download_fracatlas
from bonexray.errors import DatasetError

from builders import make_manifest, radiograph_like


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
    with pytest.raises(DatasetError, match="checksum"):
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
