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
    return app.load_models(sources={})  # every task on its untrained fallback, whatever outputs/ holds


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


def test_classifier_defaults_to_the_main_jobs_folder(tmp_path, monkeypatch):
    import torch
    from conftest import tiny_config

    from cmsa_hf import CMSAForImageClassification, CMSAImageProcessor

    model = CMSAForImageClassification(tiny_config(id2label={0: "zero", 1: "one"}, label2id={"zero": 0, "one": 1}))
    model.save_pretrained(tmp_path)
    CMSAImageProcessor.for_config(model.config).save_pretrained(tmp_path)
    monkeypatch.setattr(app, "MAIN_JOB_FOLDER", tmp_path)
    for variable in ("CMSA_CLASSIFIER", "CMSA_POSE", "CMSA_HEAD_POSE"):
        monkeypatch.delenv(variable, raising=False)
    loaded, untrained = app.load_models()
    assert untrained == ["pose", "head pose"]
    assert loaded["classification"][0].config.id2label == {0: "zero", 1: "one"}
    assert torch.equal(loaded["classification"][0].head.classifier.weight, model.head.classifier.weight)


def test_two_clicks_draw_the_box():
    first = app.corner_clicked(None, gr.SelectData(None, {"index": [40, 10], "value": None}))
    assert first[1] == (40.0, 10.0)
    box, pending = app.corner_clicked(first[1], gr.SelectData(None, {"index": [12, 50], "value": None}))
    assert box == "12, 10, 28, 40" and pending is None


def test_buttons_are_named_api_endpoints(models):
    dependencies = app.build_demo(*models).get_config_file()["dependencies"]
    assert {"classify", "estimate_pose", "estimate_head_pose"} <= {d["api_name"] for d in dependencies}


def test_examples_are_shipped_with_their_licence():
    for rows in app.EXAMPLES.values():
        for name, *box in rows:
            image = Image.open(app.EXAMPLES_DIR / name)
            if box:
                x, y, width, height = (float(v) for v in box[0].split(","))
                assert 0 <= x and 0 <= y and x + width <= image.width and y + height <= image.height, name
    assert "Apache-2.0" in (app.EXAMPLES_DIR / "LICENSE.md").read_text()


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

            assert "untrained demo weights" in page.inner_text("#classification-output")

            # Each tab: pick an example (image and box), run it, see the result, take a screenshot.
            page.click("#classification-examples .gallery-item >> nth=0")
            page.wait_for_selector("#classification-input img", timeout=60_000)
            page.click("#classification-run")
            top = page.wait_for_selector("#classification-output [data-testid=label-output-value]", timeout=60_000)
            assert top.inner_text() in app.DEMO_LABELS
            page.screenshot(path=str(tmp_path / "space-classification.png"), full_page=True)

            page.get_by_role("tab", name="Human pose").click()
            page.click("#pose-examples tr.tr-body >> nth=0")
            page.wait_for_function(
                "() => document.querySelector('#pose-box textarea').value === '56, 16, 48, 96'", timeout=60_000
            )
            page.click("#pose-run")
            page.wait_for_selector("#pose-output img", timeout=60_000)
            page.screenshot(path=str(tmp_path / "space-pose.png"), full_page=True)

            page.get_by_role("tab", name="Head pose").click()
            page.click("#head-pose-examples tr.tr-body >> nth=1")
            page.wait_for_function(
                "() => document.querySelector('#head-pose-box textarea').value === '32, 16, 64, 64'", timeout=60_000
            )
            page.click("#head-pose-run")
            page.wait_for_function(
                "() => document.querySelector('#head-pose-angles textarea').value.startsWith('yaw')", timeout=60_000
            )
            page.wait_for_selector("#head-pose-output img", timeout=60_000)
            page.screenshot(path=str(tmp_path / "space-head-pose.png"), full_page=True)

            # An upload of one's own still works, with a typed box.
            page.set_input_files("#head-pose-input input[type=file]", str(person))
            page.fill("#head-pose-box textarea", "0, 0, 0, 0")  # bad input: a message, no traceback
            page.click("#head-pose-run")
            page.wait_for_selector("text=The box is empty", timeout=60_000)
            assert "Traceback" not in page.content()
            page.screenshot(path=str(tmp_path / "space-error.png"), full_page=True)
            browser.close()
        for name in ("space-classification.png", "space-pose.png", "space-head-pose.png", "space-error.png"):
            assert Image.open(tmp_path / name).size[0] == 1280
        print(f"screenshots: {tmp_path}")
    finally:
        demo.close()
