"""`bonexray serve` as a person uses it: headless Chromium drives the page with real radiographs.

Needs Debian's `chromium` (.ci/run installs it) and Playwright from PyPI (the `dev` extra), which
drives that system browser: Playwright never downloads a browser here. axe-core (MPL-2.0) is
vendored in tests/vendor/ and injected into the page for the accessibility check.
"""
from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from builders import LiveServer, make_checkpoint
from conftest import SHARED_DATA, requires_shared_data
from PIL import Image

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
AXE = Path(__file__).parent / "vendor" / "axe.min.js"
KEY = "browser-key-123"

pytestmark = [
    requires_shared_data,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run does)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[dev]')")

VIEWER_READY = "() => !document.getElementById('viewer').hidden && document.getElementById('base').width > 0"
CARD_READY = "#card-list dt >> text=Trained on"


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
            viewport={"width": 1280, "height": 900}, accept_downloads=True)
        pg = context.new_page()
        pg.problems = []  # console errors and uncaught exceptions (a CSP violation shows up here)
        pg.on("console", lambda m: m.type == "error" and pg.problems.append(m.text))
        pg.on("pageerror", lambda e: pg.problems.append(str(e)))
        pg.set_default_timeout(90_000)
        try:
            yield pg
        finally:
            context.close()


def _radiographs(n: int):
    return sorted((SHARED_DATA / "FracAtlas" / "images" / "Fractured").glob("*.jpg"))[:n]


DICOM = SHARED_DATA / "dicom" / "RG3_UNCR.dcm"  # 1760 x 1760, MONOCHROME1


def _open(page, live, *files):
    page.goto(live.url)
    page.wait_for_selector(CARD_READY, state="attached")
    if files:
        page.set_input_files("#file-input", [str(f) for f in files])
        page.wait_for_function(VIEWER_READY)


def _canvas_pixels(page, canvas: str = "base") -> np.ndarray:
    """The canvas as drawn: (H, W, 4) uint8."""
    url = page.evaluate(f"document.getElementById('{canvas}').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))


def _viewport_shot(page) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.locator("#viewport").screenshot())).convert("L"), dtype=np.int16)


def _contrast(rgb1: str, rgb2: str) -> float:
    def lum(css: str) -> float:
        vals = [int(float(v)) for v in css[css.index("(") + 1 : css.index(")")].split(",")[:3]]
        c = [v / 255 for v in vals]
        c = [x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4 for x in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]
    a, b = sorted((lum(rgb1), lum(rgb2)), reverse=True)
    return (a + 0.05) / (b + 0.05)


# --------------------------------------------------------------------------- the viewer


def test_full_resolution_dicom_with_zoom_and_window_level(live, page):
    api = httpx.post(f"{live.url}/api/predict?heatmap=1", files=[("files", (DICOM.name, DICOM.read_bytes()))],
                     timeout=300).json()["images"][0]
    _open(page, live, DICOM)
    assert page.evaluate("[document.getElementById('base').width, document.getElementById('base').height]") == [1760, 1760]
    assert "1760 \u00d7 1760" in page.inner_text("#viewer-title")
    drawn = _canvas_pixels(page)[..., 0]
    original = np.asarray(Image.open(io.BytesIO(base64.b64decode(api["original_png"]))))
    assert np.array_equal(drawn, original)  # the file's own pixels, not the model's 64-px tile

    # Zoom (button, wheel) changes what is on screen; Fit brings the first view back.
    page.click("#show-overlay")  # the radiograph alone
    fitted = _viewport_shot(page)
    page.click("#zoom-in")
    page.click("#zoom-in")
    zoomed = _viewport_shot(page)
    assert np.abs(zoomed - fitted).mean() > 5
    page.click("#zoom-fit")
    assert np.abs(_viewport_shot(page) - fitted).mean() < 1
    box = page.locator("#viewport").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -400)
    assert np.abs(_viewport_shot(page) - fitted).mean() > 5
    page.click("#zoom-fit")

    # Window/level: a preset, then a drag in window/level mode, change the drawn pixels; Reset restores them.
    page.select_option("#wl-preset", "contrast")
    page.wait_for_function("() => document.getElementById('wl-readout').textContent === 'W 160 / L 128'")
    contrast = _canvas_pixels(page)[..., 0]
    assert np.abs(contrast.astype(int) - drawn).mean() > 3
    page.check("input[name=mode][value=wl]")
    page.mouse.move(box["x"] + 100, box["y"] + 100)
    page.mouse.down()
    page.mouse.move(box["x"] + 60, box["y"] + 180, steps=4)
    page.mouse.up()
    page.wait_for_function("() => document.getElementById('wl-readout').textContent !== 'W 160 / L 128'")
    dragged = _canvas_pixels(page)[..., 0]
    assert np.abs(dragged.astype(int) - contrast).mean() > 3
    page.click("#wl-reset")
    page.wait_for_function("() => document.getElementById('wl-readout').textContent === 'W 256 / L 128'")
    assert np.array_equal(_canvas_pixels(page)[..., 0], original)
    assert page.problems == []


def test_heatmap_is_confined_to_the_image_with_opacity_and_legend(live, page):
    (jpg,) = _radiographs(1)
    _open(page, live, jpg)
    w, h = Image.open(jpg).size
    assert page.evaluate("[document.getElementById('overlay').width, document.getElementById('overlay').height]") == [w, h]
    assert page.is_visible("#legend-bar") and "learned fracture map" in page.inner_text("#legend")
    half = _canvas_pixels(page, "overlay")[..., 3].astype(int)
    assert half.min() > 0  # the map covers the whole image (the canvas is the image: no padding)
    page.fill("#opacity", "100")
    page.dispatch_event("#opacity", "input")
    full = _canvas_pixels(page, "overlay")[..., 3].astype(int)
    assert full.mean() > half.mean() * 1.5
    # Defect 5: with the heatmap off, the cards no longer say it is shown.
    notes = page.locator(".heatmap-note").all_inner_texts()
    assert notes and all("learned fracture map" in n for n in notes)
    page.uncheck("#show-heatmap")
    assert _canvas_pixels(page, "overlay")[..., 3].max() == 0
    assert all(n == "Heatmap hidden." for n in page.locator(".heatmap-note").all_inner_texts())


def test_boxes_land_where_the_api_says(live, page):
    # The box model is not merged yet: its field is injected into a real response (the page is not stubbed).
    (jpg,) = _radiographs(1)
    w, h = Image.open(jpg).size
    box = {"x0": round(w * 0.2), "y0": round(h * 0.3), "x1": round(w * 0.6), "y1": round(h * 0.7), "score": 0.91}

    def add_boxes(route):
        # Playwright does not replay the page's multipart body, so the same file is sent from here.
        body = httpx.post(route.request.url, files=[("files", (jpg.name, jpg.read_bytes()))], timeout=120).json()
        body["images"][0]["boxes"] = [box]
        route.fulfill(json=body)

    page.route("**/api/predict*", add_boxes)
    _open(page, live, jpg)
    page.uncheck("#show-heatmap")
    px = _canvas_pixels(page, "overlay")
    ymid, xmid = (box["y0"] + box["y1"]) // 2, (box["x0"] + box["x1"]) // 2
    for x, y in ((box["x0"], ymid), (box["x1"], ymid), (xmid, box["y0"]), (xmid, box["y1"])):
        r, g, b, a = px[y, x]
        assert a == 255 and r > 200 and g > 180 and b < 80, (x, y, px[y, x])  # the box's yellow edge
    assert px[ymid, xmid, 3] == 0 and px[5, 5, 3] == 0  # inside and far outside: nothing drawn
    assert "1 box, best score 0.91" in page.inner_text(".result")
    page.uncheck("#show-boxes")
    assert _canvas_pixels(page, "overlay")[..., 3].max() == 0


# --------------------------------------------------------------------------- the flow (defects 1-10)


def test_a_later_drop_cancels_the_earlier_request(live, page):
    # Defect 1: 16 files, then one file at once: the 16-image answer must never replace the 1-image one.
    held = []

    def hold_first(route):
        if not held:
            held.append(route)  # answered only after the second request is done
        else:
            route.continue_()

    page.route("**/api/predict*", hold_first)
    page.goto(live.url)
    page.wait_for_selector(CARD_READY, state="attached")
    page.set_input_files("#file-input", [str(p) for p in _radiographs(16)])
    page.wait_for_selector("#cancel:not([hidden])")
    while not held:
        page.wait_for_timeout(20)
    page.set_input_files("#file-input", str(_radiographs(1)[0]))
    page.wait_for_selector("#status >> text=Done: 1 image")
    # The browser has dropped the first request; a real answer for 16 images arriving now must change nothing.
    sixteen = httpx.post(held[0].request.url, timeout=300,
                         files=[("files", (p.name, p.read_bytes())) for p in _radiographs(16)]).json()
    assert len(sixteen["images"]) == 16
    try:
        held[0].fulfill(json=sixteen)
    except Exception:  # noqa: BLE001 - Playwright may refuse to answer a cancelled request
        pass
    page.wait_for_timeout(1500)
    assert page.locator(".result").count() == 1
    assert page.inner_text("#status").startswith("Done: 1 image")


def test_cancel_button(live, page):
    page.route("**/api/predict*", lambda route: None)  # never answered
    page.goto(live.url)
    page.wait_for_selector(CARD_READY, state="attached")
    page.set_input_files("#file-input", str(_radiographs(1)[0]))
    page.click("#cancel")
    page.wait_for_selector("#status >> text=Cancelled.")
    assert page.is_hidden("#cancel") and page.is_hidden("#summary")


def test_mixed_batch_analyses_the_good_files_and_names_the_bad(live, page, tmp_path):
    # Defect 4: an unreadable file, or a 17th file, used to discard every good image.
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not an X-ray")
    files = _radiographs(16) + [bad]  # 17 files: one over the limit, one unreadable
    page.goto(live.url)
    page.wait_for_selector(CARD_READY, state="attached")
    assert "16 files per upload, 32 MiB each, 100 MiB in all" in page.inner_text("#limits")  # defect 6: MiB
    page.set_input_files("#file-input", [str(f) for f in files[:2]] + [str(bad)] + [str(f) for f in files[2:16]])
    page.wait_for_function(VIEWER_READY)
    assert page.locator(".result[data-state=cannot]").count() == 2
    errors = page.inner_text("#file-errors")
    assert "notes.jpg" in errors and _radiographs(16)[-1].name in errors and "at most 16 files" in errors
    assert "2 files were not analysed" in page.inner_text("#error")
    assert page.locator(".result:not([data-state=cannot])").count() == 15
    assert "Study of 15 images" in page.inner_text("#summary")


def test_only_bad_files_say_nothing_was_analysed(live, page, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not an X-ray")
    page.goto(live.url)
    page.wait_for_selector(CARD_READY, state="attached")
    page.set_input_files("#file-input", str(bad))
    page.wait_for_selector("#error:not([hidden])")
    assert "notes.jpg" in page.inner_text("#error") and "Nothing was analysed" in page.inner_text("#error")
    assert page.locator(".result").count() == 0
    assert httpx.get(f"{live.url}/healthz").status_code == 200


def _drop(page, selector: str, path: Path) -> bool:
    """Drop ``path`` on ``selector`` as a browser would; True when the page took the drop (defaultPrevented)."""
    data = base64.b64encode(path.read_bytes()).decode()
    return page.evaluate("""([sel, name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, { type: "image/jpeg" }));
        const target = document.querySelector(sel);
        target.dispatchEvent(new DragEvent("dragover", { dataTransfer: dt, bubbles: true, cancelable: true }));
        const ev = new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true });
        target.dispatchEvent(ev);
        return ev.defaultPrevented;
    }""", [selector, path.name, data])


def test_a_drop_anywhere_on_the_page_is_caught(live, page):
    # Defect 7: a drop just outside the drop zone would make the browser open the file.
    jpg = _radiographs(1)[0]
    page.goto(live.url)
    page.wait_for_selector(CARD_READY, state="attached")
    assert _drop(page, "#card", jpg)
    page.wait_for_function(VIEWER_READY)
    assert page.locator(".fname").first.inner_text() == jpg.name


def test_several_studies_when_the_user_says_so(live, page):
    # Defect 8: every set of files was one study.
    images = _radiographs(3)
    _open(page, live, *images)
    assert page.locator(".study-line").count() == 1 and "Study of 3 images" in page.inner_text("#studies")
    page.check("#separate-studies")
    page.set_input_files("#file-input", [str(p) for p in images])
    page.wait_for_function("() => document.querySelectorAll('.study-line').length === 3")
    assert [t.split("\n")[0] for t in page.locator(".study-line h3").all_inner_texts()] == [p.name for p in images]


def test_phone_verdict_scrolled_into_view_and_announced(live, page):
    # Defects 9 and 10: the verdict lands in view on a phone and is read out (role=status), not only "Done".
    page.set_viewport_size({"width": 390, "height": 844})
    jpg = _radiographs(1)[0]
    expected = httpx.post(f"{live.url}/api/predict", files=[("files", (jpg.name, jpg.read_bytes()))], timeout=120).json()
    _open(page, live, jpg)
    page.wait_for_function("() => window.scrollY > 0")
    top = page.evaluate("document.getElementById('summary').getBoundingClientRect().top")
    assert 0 <= top < 844 / 2
    status = page.inner_text("#status")
    word = page.locator("#studies .verdict").inner_text()
    assert word in ("Abnormal", "Normal", "Borderline") and word in status
    assert f"{100 * expected['images'][0]['prob_abnormal']:.1f}%" in status
    assert page.get_attribute("#status", "role") == "status"
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    vp = page.locator("#viewport").bounding_box()
    assert 300 < vp["width"] <= 390


def test_focus_ring_and_probability_bar_contrast(live, page):
    # Defect 10: the focus ring and the bar were about 2:1 against their background.
    _open(page, live, _radiographs(1)[0])
    page.focus("#zoom-fit")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")  # keyboard focus: :focus-visible applies
    ring = page.evaluate("getComputedStyle(document.activeElement).outlineColor")
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    panel = page.evaluate("getComputedStyle(document.getElementById('viewer')).backgroundColor")
    assert _contrast(ring, panel) >= 3
    fill = page.evaluate("getComputedStyle(document.querySelector('.bar .fill')).backgroundColor")
    edge = page.evaluate("getComputedStyle(document.querySelector('.bar')).borderTopColor")
    card = page.evaluate("getComputedStyle(document.querySelector('.result')).backgroundColor")
    assert _contrast(fill, card) >= 3 and _contrast(edge, card) >= 3


def test_wrong_key_feedback_and_threshold_source(tmp_path, page):
    # Defect 3: a wrong key gave no feedback; defect 2: a train+valid fit's threshold is 0.5 by design.
    from bonexray.web import create_app

    ckpt = make_checkpoint(tmp_path / "tv.ckpt", split={"fit_on": "train+valid", "seed": 0})
    with LiveServer(create_app(ckpt, api_key=KEY)) as server:
        page.goto(server.url)
        page.wait_for_selector("#key-box:not([hidden])")
        assert "X-API-Key" not in page.inner_text("main")
        page.fill("#key-input", "wrong-key")
        page.press("#key-input", "Enter")
        page.wait_for_selector("#key-error:not([hidden])")
        assert "not accepted" in page.inner_text("#key-error")
        page.fill("#key-input", KEY)
        page.press("#key-input", "Enter")
        page.wait_for_selector(CARD_READY, state="attached")
        assert page.is_hidden("#key-box")
        threshold = page.locator("#card-list dd").nth(3).inner_text()
        assert "0.5 by design" in threshold and "validation" not in threshold
        page.set_input_files("#file-input", str(_radiographs(1)[0]))
        page.wait_for_function(VIEWER_READY)


# --------------------------------------------------------------------------- take it away, keyboard, axe


def test_downloads_json_overlay_png_and_report(live, page):
    jpg = _radiographs(1)[0]
    _open(page, live, jpg)
    with page.expect_download() as d:
        page.click("#download-json")
    body = json.loads(Path(d.value.path()).read_text())
    assert body["result"]["images"][0]["path"] == jpg.name and "original_png" not in body["result"]["images"][0]
    assert body["model"]["threshold_source"]
    with page.expect_download() as d:
        page.click("#download-png")
    assert d.value.suggested_filename == jpg.stem + "-overlay.png"
    assert Image.open(d.value.path()).size == Image.open(jpg).size
    with page.expect_download() as d:
        page.click("#download-report")
    report = Path(d.value.path()).read_text()
    for words in (jpg.name, "Not a medical device", "p(abnormal)", "Threshold", "Boxes", "data:image/png;base64,", "@media print"):
        assert words in report, words
    assert "<script" not in report


def test_keyboard_only(live, page):
    _open(page, live, *_radiographs(2))
    # Tab from the top reaches the file chooser, then the viewer; keys zoom and pan the image.
    page.keyboard.press("Tab")
    seen = []
    for _ in range(40):
        seen.append(page.evaluate("document.activeElement.id || document.activeElement.textContent.trim()"))
        if seen[-1] == "viewport":
            break
        page.keyboard.press("Tab")
    assert "file-input" in seen and "zoom-in" in seen and seen[-1] == "viewport"
    before = _viewport_shot(page)
    page.keyboard.press("+")
    page.keyboard.press("+")
    assert np.abs(_viewport_shot(page) - before).mean() > 3
    page.keyboard.press("0")
    # The second image is one Tab-and-Enter away.
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == "Show image 2":
            break
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.getElementById('viewer-title').textContent.startsWith('Image 2')")


def test_no_serious_accessibility_violations(live, page):
    # An init script, not add_script_tag: the page's CSP (script-src 'self') rightly refuses inline
    # script tags, and the check must run on the page as served.
    page.add_init_script(path=str(AXE))
    _open(page, live, *_radiographs(2))
    result = page.evaluate("axe.run(document, { resultTypes: ['violations'] })")
    serious = [(v["id"], v["impact"], v["help"], [n["target"] for n in v["nodes"]][:3])
               for v in result["violations"] if v["impact"] in ("serious", "critical")]
    assert serious == []


def test_blank_image_and_photo_say_cannot_assess_with_the_reason(live, page, tmp_path):
    # Issue 21: a blank image or a photo got "Abnormal" and a body part; now no verdict, and why.
    from skimage import data

    blank, photo = tmp_path / "blank.png", tmp_path / "photo.png"
    Image.fromarray(np.full((300, 240), 128, np.uint8)).save(blank)
    Image.fromarray(data.astronaut()).save(photo)
    radiograph = _radiographs(1)[0]
    page.goto(live.url)
    page.wait_for_selector(CARD_READY, state="attached")
    page.set_input_files("#file-input", [str(blank), str(photo), str(radiograph)])
    page.wait_for_function(VIEWER_READY)
    assert page.locator(".result[data-state=cannot]").count() == 2
    cards = page.inner_text("#results")
    assert "blank or nearly constant image" in cards and "not a radiograph" in cards
    summary = page.inner_text("#studies")
    assert "2 images of 3 could not be assessed; the verdict uses the other 1" in summary
    assert "Cannot assess" not in page.locator(".study-line").first.inner_text()  # the radiograph is judged
    assert not page.problems
