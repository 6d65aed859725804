"""Screenshots of the `bonexray serve` page for the README (docs/serve.png, docs/serve-phone.png).

    python bench/serve_screenshots.py MODEL IMAGE [IMAGE ...] [--out docs]

Starts the app on 127.0.0.1 with MODEL, drops the IMAGEs into the page in headless Chromium
(Debian's /usr/bin/chromium via Playwright) and saves the first screen after the page has brought
the image into view: 1366 x 900 (desktop) and 390 x 844 (phone). ``--one-study`` ticks "treat the
non-DICOM files as one study" first (then several images show side by side with ``--side-by-side``).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--metrics", default=None)
    ap.add_argument("--one-study", action="store_true")
    ap.add_argument("--side-by-side", action="store_true")
    args = ap.parse_args()
    from builders import LiveServer
    from playwright.sync_api import sync_playwright

    from bonexray.web import create_app

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    out = Path(args.out)
    with LiveServer(create_app(args.model, metrics=args.metrics)) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        for width, height, name in ((1366, 900, "serve.png"), (390, 844, "serve-phone.png")):
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(srv.url)
            page.wait_for_selector("#card-list dt >> text=Trained on", state="attached")
            if args.one_study:
                page.check("#group-one")
            page.set_input_files("#file-input", args.images)
            page.wait_for_function("() => !document.getElementById('reading').hidden && "
                                   "!!document.getElementById('base') && document.getElementById('base').width > 0",
                                   timeout=600_000)
            if args.side_by_side and width > 800 and page.is_visible("#side-by-side"):
                page.check("#side-by-side")
                page.wait_for_selector("#viewport-2")
            page.wait_for_timeout(300)
            page.screenshot(path=str(out / name))
            print(out / name)
        browser.close()


if __name__ == "__main__":
    main()
