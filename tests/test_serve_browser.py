"""`bonexray serve` as a person uses it: headless Chromium drives the page with a real radiograph.

Needs Debian's `chromium` (.ci/run installs it) and Playwright from PyPI (the `dev` extra), which
drives that system browser: Playwright never downloads a browser here.
"""
from __future__ import annotations

import shutil

import httpx
import pytest
from builders import LiveServer, make_checkpoint
from conftest import SHARED_DATA, requires_shared_data

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    requires_shared_data,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run does)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[dev]')")

IMAGE_LOADED = "() => [...document.querySelectorAll('img.xray')].every(i => i.complete && i.naturalWidth > 0)"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from bonexray.web import create_app

    ckpt = make_checkpoint(tmp_path_factory.mktemp("browser") / "loc.ckpt", localization_head=True)
    with LiveServer(create_app(ckpt)) as server:
        yield server


@pytest.fixture
def page(tmp_path):
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1200, "height": 900})
        pg = context.new_page()
        pg.problems = []  # console errors and uncaught exceptions (a CSP violation shows up here)
        pg.on("console", lambda m: m.type == "error" and pg.problems.append(m.text))
        pg.on("pageerror", lambda e: pg.problems.append(str(e)))
        pg.set_default_timeout(60_000)
        try:
            yield pg
        finally:
            context.close()


def _radiographs(n: int):
    return sorted((SHARED_DATA / "FracAtlas" / "images" / "Fractured").glob("*.jpg"))[:n]


def test_drop_a_radiograph_and_see_verdict_body_part_and_heatmap(live, page):
    (jpg,) = _radiographs(1)
    expected = httpx.post(f"{live.url}/api/predict?heatmap=1", files=[("files", (jpg.name, jpg.read_bytes()))],
                          timeout=120).json()["images"][0]

    page.goto(live.url)
    page.wait_for_selector("#card-list dt", state="attached")  # the model card arrived
    assert "Not a medical device" in page.inner_text(".notice")
    assert "learned fracture map" in page.text_content("#card-list")
    page.set_input_files("#file-input", str(jpg))
    page.wait_for_selector(".result .verdict")
    page.wait_for_function(IMAGE_LOADED)

    card = page.locator(".result").first
    assert card.locator(".fname").inner_text() == jpg.name
    assert card.locator(".verdict").inner_text() == ("Abnormal" if expected["abnormal"] else "Normal")
    assert card.locator(".body-part").inner_text().startswith(expected["body_part"])
    assert f"{100 * expected['prob_abnormal']:.1f}%" in card.inner_text()
    img = card.locator("img.xray")
    assert img.get_attribute("src") == "data:image/png;base64," + expected["heatmap_png"]
    assert img.evaluate("i => i.naturalWidth") == 512
    assert page.is_hidden("#study")  # one image: no study line

    page.click("label.toggle")  # hide the heatmap: the plain radiograph
    assert img.get_attribute("src") == "data:image/png;base64," + expected["image_png"]
    page.click("label.toggle")
    assert img.get_attribute("src") == "data:image/png;base64," + expected["heatmap_png"]
    assert page.problems == []


def test_a_study_of_several_images_and_a_bad_file(live, page, tmp_path):
    images = _radiographs(3)
    page.goto(live.url)
    page.wait_for_selector("#card-list dt", state="attached")
    page.set_input_files("#file-input", [str(p) for p in images])
    page.wait_for_selector("#study:not([hidden])")
    page.wait_for_function(IMAGE_LOADED)
    assert page.locator(".result").count() == 3
    study = page.inner_text("#study")
    assert "Study of 3 images" in study and "mean p(abnormal)" in study

    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not an X-ray")
    page.set_input_files("#file-input", str(bad))
    page.wait_for_selector("#error:not([hidden])")
    assert "notes.jpg" in page.inner_text("#error") and page.locator(".result").count() == 0
    assert httpx.get(f"{live.url}/healthz").status_code == 200


def test_phone_width_has_no_sideways_scrolling(live, page):
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(live.url)
    page.wait_for_selector("#card-list dt", state="attached")
    page.set_input_files("#file-input", str(_radiographs(1)[0]))
    page.wait_for_function(IMAGE_LOADED)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = page.locator("img.xray").bounding_box()
    assert box["width"] <= 390 and box["width"] > 300  # the radiograph fills the phone's width
