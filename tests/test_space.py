"""The Spaces demo (examples/space/app.py): its handlers on bad input, and the app driven in headless Chromium
(Debian's chromium through Playwright, no browser download): an upload on each tab, the rendered results, a
screenshot."""

import shutil
import socket
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image


gr = pytest.importorskip("gradio", reason="the demo needs gradio (pip install -e '.[space]')")
sys.path.insert(0, str(REPO_ROOT / "examples" / "space"))
import app  # noqa: E402


@pytest.fixture(scope="module")
def models():
    return app.load_models()


@pytest.fixture(scope="module")
def person(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "person.png"
    pixels = np.random.default_rng(0).integers(0, 256, (96, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_fallback_models_are_flagged_untrained(models):
    loaded, untrained = models
    assert untrained == ["classification", "pose", "head pose"]
    assert set(loaded) == {"classification", "pose", "head pose"}


def test_handlers_give_results(models, person):
    loaded, _ = models
    top5 = app.classify(loaded, str(person))
    assert len(top5) == 5 and set(top5) <= set(app.DEMO_LABELS)
    assert app.estimate_pose(loaded, str(person), "8, 10, 40, 70").size == (64, 96)
    text, drawn = app.estimate_head_pose(loaded, str(person), "")
    assert text.startswith("yaw ") and "pitch" in text and drawn.size == (64, 96)


@pytest.mark.parametrize(
    "make_input, box, message",
    [
        (lambda d: (d / "notes.png").write_text("not an image") and d / "notes.png", "", "not an image the demo can read"),
        (lambda d: None, "", "Upload an image first"),
        (None, "0, 0, 0, 0", "The box is empty"),
        (None, "1, 2, 3", "needs four numbers"),
        (None, "a, b, c, d", "is not four numbers"),
        (None, "500, 500, 10, 10", "lies outside"),
    ],
)
def test_bad_input_is_a_readable_message(models, person, tmp_path, make_input, box, message):
    loaded, _ = models
    path = make_input(tmp_path) if make_input else person
    with pytest.raises(gr.Error, match=message):
        app.estimate_pose(loaded, None if path is None else str(path), box)


def test_huge_image_is_refused(models, tmp_path, monkeypatch):
    monkeypatch.setattr(app, "MAX_PIXELS", 100 * 100)  # a 4096x4096 limit, scaled down for the test
    Image.new("RGB", (200, 200)).save(tmp_path / "huge.png")
    with pytest.raises(gr.Error, match="the demo takes up to 10,000 pixels"):
        app.classify(models[0], str(tmp_path / "huge.png"))


# ---------------------------------------------------------------------------------------------- browser


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_app_in_headless_chromium(models, person, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

    demo = app.build_demo(*models)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.wait_for_selector("#banner", timeout=60_000)
            assert "Untrained demo weights" in page.inner_text("#banner")

            page.set_input_files("#classification-input input[type=file]", str(person))
            page.click("#classification-run")
            page.wait_for_function(
                "labels => labels.some(l => document.querySelector('#classification-output').innerText.includes(l))",
                arg=app.DEMO_LABELS, timeout=60_000,
            )  # fmt: skip

            page.get_by_role("tab", name="Human pose").click()
            page.set_input_files("#pose-input input[type=file]", str(person))
            page.fill("#pose-box textarea", "8, 10, 40, 70")
            page.click("#pose-run")
            page.wait_for_selector("#pose-output img", timeout=60_000)
            page.screenshot(path=str(tmp_path / "space-pose.png"), full_page=True)

            page.get_by_role("tab", name="Head pose").click()
            page.set_input_files("#head-pose-input input[type=file]", str(person))
            page.click("#head-pose-run")
            page.wait_for_function(
                "() => document.querySelector('#head-pose-angles textarea').value.startsWith('yaw')", timeout=60_000
            )
            page.wait_for_selector("#head-pose-output img", timeout=60_000)
            page.screenshot(path=str(tmp_path / "space-head-pose.png"), full_page=True)

            page.fill("#head-pose-box textarea", "0, 0, 0, 0")  # bad input: a message, no traceback
            page.click("#head-pose-run")
            page.wait_for_selector("text=The box is empty", timeout=60_000)
            assert "Traceback" not in page.content()
            page.screenshot(path=str(tmp_path / "space-error.png"), full_page=True)
            browser.close()
        for name in ("space-pose.png", "space-head-pose.png", "space-error.png"):
            assert Image.open(tmp_path / name).size[0] == 1280
        print(f"screenshots: {tmp_path}")
    finally:
        demo.close()
