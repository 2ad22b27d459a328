"""CMSA demo (a Hugging Face Space, Gradio): classification, human pose and head pose at low resolution.

Models come from folders or Hub ids in the environment variables CMSA_CLASSIFIER, CMSA_POSE and CMSA_HEAD_POSE;
the classifier defaults to the main job's folder (`make demo`: outputs/digits-cmsa-s) when it exists. Without them
the demo runs on freshly initialised models and says so in a banner and in the outputs' labels ("untrained demo
weights"), so that it starts anywhere, even offline. Each tab has example images (examples/, drawn by
make_examples.py) and takes a box typed, picked with an example, or drawn by clicking two corners on the image.
The buttons are API endpoints: /classify, /estimate_pose, /estimate_head_pose.

    python examples/space/app.py            # http://127.0.0.1:7860
"""

import math
import os
import sys
from pathlib import Path

import gradio as gr
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

try:
    import cmsa_hf  # noqa: F401
except ImportError:  # a Space with the package folder uploaded next to app.py, or this repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cmsa_hf import (
    CMSAConfig,
    CMSAForHeadPoseEstimation,
    CMSAForImageClassification,
    CMSAForKeypointDetection,
    CMSAImageProcessor,
)
from cmsa_hf.codecs import euler_to_rotation_matrix


MAX_PIXELS = 4096 * 4096
# The untrained fallback classifier has the classes and input size of the main job's model (`make demo`: digits).
DEMO_LABELS = [str(digit) for digit in range(10)]
MAIN_JOB_FOLDER = Path(__file__).resolve().parents[2] / "outputs" / "digits-cmsa-s"
BANNER = "**Untrained demo weights**: {names} freshly initialised (set {variables} to trained folders or Hub ids)."
UNTRAINED = " (untrained demo weights: meaningless)"
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
# Example images with their boxes (x, y, width, height), as drawn by make_examples.py.
EXAMPLES = {
    "classification": [["digit-3.png"], ["digit-7.png"]],
    "pose": [["person.png", "56, 16, 48, 96"]],
    "head pose": [["face-frontal.png", "32, 16, 64, 64"], ["face-turned.png", "32, 16, 64, 64"]],
}


def load_models(sources: dict | None = None) -> tuple[dict, list[str]]:
    """The three task models with their processors, and the names of those that fell back to random weights.
    `sources` (task -> folder or Hub id) defaults to the environment variables, and the classifier to the main
    job's folder when it exists."""
    if sources is None:
        default_classifier = str(MAIN_JOB_FOLDER) if MAIN_JOB_FOLDER.is_dir() else None
        sources = {
            "classification": os.environ.get("CMSA_CLASSIFIER", default_classifier),
            "pose": os.environ.get("CMSA_POSE"),
            "head pose": os.environ.get("CMSA_HEAD_POSE"),
        }
    specs = {
        "classification": (CMSAForImageClassification, {"image_size": (16, 16), "id2label": dict(enumerate(DEMO_LABELS))}, {}),
        "pose": (CMSAForKeypointDetection, {"image_size": (32, 24)}, {}),
        "head pose": (CMSAForHeadPoseEstimation, {"image_size": (32, 32)}, {"box_padding": 1.0}),
    }  # fmt: skip
    models, untrained = {}, []
    for task, (model_class, fields, processor_fields) in specs.items():
        source = sources.get(task)
        if source:
            model = model_class.from_pretrained(source).eval()
            processor = CMSAImageProcessor.from_pretrained(source)
        else:
            torch.manual_seed(0)
            model = model_class(CMSAConfig.from_variant("cmsa-s", **fields)).eval()
            processor = CMSAImageProcessor.for_config(model.config, keypoint_names=model.config.keypoint_names, **processor_fields)
            untrained.append(task)
        models[task] = (model, processor)
    return models, untrained


# ---------------------------------------------------------------------------------------------- inputs


def open_image(path) -> Image.Image:
    """The uploaded file as an RGB image, or a readable error in the UI."""
    if path is None:
        raise gr.Error("Upload an image first.")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise gr.Error(f"The image is {image.width}x{image.height}: the demo takes up to {MAX_PIXELS:,} pixels.")
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
        raise gr.Error(f"This file is not an image the demo can read ({type(error).__name__}).") from None


def parse_box(text: str, image: Image.Image) -> list[float]:
    """'x, y, width, height' in pixels; empty: the whole image."""
    if not text or not text.strip():
        return [0.0, 0.0, float(image.width), float(image.height)]
    try:
        box = [float(value) for value in text.replace(",", " ").split()]
    except ValueError:
        raise gr.Error(f"The box {text!r} is not four numbers 'x, y, width, height'.") from None
    if len(box) != 4:
        raise gr.Error(f"The box needs four numbers 'x, y, width, height', got {len(box)}.")
    if box[2] <= 0 or box[3] <= 0:
        raise gr.Error("The box is empty: its width and height must be positive.")
    return box


def corner_clicked(first_corner, event: gr.SelectData):
    """Two clicks on the input image draw the box: the first sets a corner, the second the opposite one.
    Returns (the box text, the pending corner)."""
    x, y = (float(v) for v in event.index)
    if first_corner is None:
        return gr.update(), (x, y)
    (x0, y0), (x1, y1) = first_corner, (x, y)
    box = [min(x0, x1), min(y0, y1), abs(x1 - x0), abs(y1 - y0)]
    return ", ".join(f"{v:g}" for v in box), None


def crops(processor, image, box):
    try:
        return processor(image, boxes=[box], return_tensors="pt").pixel_values
    except ValueError as error:  # e.g. a box outside the image
        raise gr.Error(str(error)) from None


# ---------------------------------------------------------------------------------------------- tasks


def classify(models, path):
    model, processor = models["classification"]
    image = open_image(path)
    with torch.no_grad():
        logits = model(processor(image, return_tensors="pt").pixel_values).logits[0]
    probabilities = torch.nan_to_num(logits.float()).softmax(-1)
    top = probabilities.topk(min(5, probabilities.numel()))
    return {model.config.id2label[int(i)]: float(p) for p, i in zip(top.values, top.indices)}


def estimate_pose(models, path, box_text):
    model, processor = models["pose"]
    image = open_image(path)
    box = parse_box(box_text, image)
    with torch.no_grad():
        outputs = model(pixel_values=crops(processor, image, box), flip_test=True)
    (pose,) = processor.post_process_keypoint_detection(outputs, boxes=[[box]])[0]
    drawn = image.copy()
    draw = ImageDraw.Draw(drawn)
    radius = max(2, round(min(box[2], box[3]) / 60))
    draw.rectangle([box[0], box[1], box[0] + box[2], box[1] + box[3]], outline=(255, 200, 0), width=max(1, radius // 2))
    points = pose["keypoints"].tolist()
    visible = [all(math.isfinite(v) for v in point) for point in points]
    for start, end in model.config.skeleton:
        if visible[start] and visible[end]:
            draw.line([tuple(points[start]), tuple(points[end])], fill=(0, 200, 255), width=radius)
    for (x, y), ok in zip(points, visible):
        if ok:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(255, 60, 60))
    return drawn


def estimate_head_pose(models, path, box_text):
    model, processor = models["head pose"]
    image = open_image(path)
    box = parse_box(box_text, image)
    with torch.no_grad():
        angles = model(pixel_values=crops(processor, image, box), flip_test=True).angles
    (pose,) = processor.post_process_head_pose(torch.nan_to_num(angles))
    rotation = euler_to_rotation_matrix(pose["yaw"], pose["pitch"], pose["roll"])
    drawn = image.copy()
    draw = ImageDraw.Draw(drawn)
    centre = (box[0] + box[2] / 2, box[1] + box[3] / 2)
    length = 0.5 * min(box[2], box[3])
    # the head's x (red, to the image's right), y (green, to the chin) and facing direction (blue, -z)
    for axis, colour in ((rotation[:, 0], (255, 0, 0)), (rotation[:, 1], (0, 200, 0)), (-rotation[:, 2], (0, 0, 255))):
        draw.line([centre, (centre[0] + length * axis[0], centre[1] + length * axis[1])], fill=colour, width=3)
    text = f"yaw {pose['yaw']:+.1f} deg, pitch {pose['pitch']:+.1f} deg, roll {pose['roll']:+.1f} deg"
    return text, drawn


# ---------------------------------------------------------------------------------------------- the app


def _examples(task: str, inputs, elem_id: str):
    rows = [[str(EXAMPLES_DIR / row[0]), *row[1:]] for row in EXAMPLES[task]]
    gr.Examples(rows, inputs, label="Examples (synthetic, drawn by make_examples.py)", elem_id=elem_id)


def _box_input(kind: str, image, elem_id: str):
    """The box textbox of a tab; two clicks on `image` fill it in."""
    box = gr.Textbox(
        label=f"{kind} box: x, y, width, height (empty: the whole image; or click two corners on the image)",
        elem_id=elem_id,
    )
    first_corner = gr.State(None)
    image.select(corner_clicked, first_corner, [box, first_corner])
    image.change(lambda: None, None, first_corner)  # a new image starts a new box
    return box


def build_demo(models=None, untrained=None) -> gr.Blocks:
    if models is None:
        models, untrained = load_models()
    untrained = untrained or []

    def title(text: str, task: str) -> str:
        return text + (UNTRAINED if task in untrained else "")

    with gr.Blocks(title="CMSA: low-resolution recognition") as demo:
        gr.Markdown("# CMSA: cascaded multi-scale attention for low-resolution images")
        if untrained:
            variables = {"classification": "CMSA_CLASSIFIER", "pose": "CMSA_POSE", "head pose": "CMSA_HEAD_POSE"}
            gr.Markdown(BANNER.format(names=", ".join(untrained), variables=", ".join(variables[t] for t in untrained)), elem_id="banner")
        with gr.Tab("Classification"):
            with gr.Row():
                image = gr.Image(type="filepath", label="Image", elem_id="classification-input")
                label = gr.Label(num_top_classes=5, label=title("Top-5", "classification"), elem_id="classification-output")
            _examples("classification", [image], "classification-examples")
            gr.Button("Classify", elem_id="classification-run").click(
                lambda p: classify(models, p), image, label, api_name="classify"
            )
        with gr.Tab("Human pose"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", label="Image", elem_id="pose-input")
                    box = _box_input("Person", image, "pose-box")
                drawn = gr.Image(type="pil", label=title("Keypoints and skeleton", "pose"), elem_id="pose-output")
            _examples("pose", [image, box], "pose-examples")
            gr.Button("Estimate pose", elem_id="pose-run").click(
                lambda p, b: estimate_pose(models, p, b), [image, box], drawn, api_name="estimate_pose"
            )
        with gr.Tab("Head pose"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", label="Image", elem_id="head-pose-input")
                    box = _box_input("Face", image, "head-pose-box")
                with gr.Column():
                    angles = gr.Textbox(label=title("Yaw, pitch, roll", "head pose"), elem_id="head-pose-angles")
                    drawn = gr.Image(type="pil", label="Head axes", elem_id="head-pose-output")
            _examples("head pose", [image, box], "head-pose-examples")
            gr.Button("Estimate head pose", elem_id="head-pose-run").click(
                lambda p, b: estimate_head_pose(models, p, b), [image, box], [angles, drawn],
                api_name="estimate_head_pose",
            )  # fmt: skip
    return demo


if __name__ == "__main__":
    build_demo().launch()
