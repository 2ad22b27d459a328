"""CMSA demo (a Hugging Face Space, Gradio): classification, human pose and head pose at low resolution.

Models come from folders or Hub ids in the environment variables CMSA_CLASSIFIER, CMSA_POSE and CMSA_HEAD_POSE.
Without them the demo runs on freshly initialised models and says so in a banner ("untrained demo weights"), so that
it starts anywhere, even offline.

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
DEMO_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BANNER = "**Untrained demo weights**: {names} freshly initialised (set {variables} to trained folders or Hub ids)."


def load_models() -> tuple[dict, list[str]]:
    """The three task models with their processors, and the names of those that fell back to random weights."""
    specs = {
        "classification": ("CMSA_CLASSIFIER", CMSAForImageClassification, {"image_size": (32, 32), "id2label": dict(enumerate(DEMO_LABELS))}, {}),
        "pose": ("CMSA_POSE", CMSAForKeypointDetection, {"image_size": (32, 24)}, {}),
        "head pose": ("CMSA_HEAD_POSE", CMSAForHeadPoseEstimation, {"image_size": (32, 32)}, {"box_padding": 1.0}),
    }  # fmt: skip
    models, untrained = {}, []
    for task, (variable, model_class, fields, processor_fields) in specs.items():
        source = os.environ.get(variable)
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


def build_demo(models=None, untrained=None) -> gr.Blocks:
    if models is None:
        models, untrained = load_models()
    with gr.Blocks(title="CMSA: low-resolution recognition") as demo:
        gr.Markdown("# CMSA: cascaded multi-scale attention for low-resolution images")
        if untrained:
            variables = {"classification": "CMSA_CLASSIFIER", "pose": "CMSA_POSE", "head pose": "CMSA_HEAD_POSE"}
            gr.Markdown(BANNER.format(names=", ".join(untrained), variables=", ".join(variables[t] for t in untrained)), elem_id="banner")
        with gr.Tab("Classification"):
            with gr.Row():
                image = gr.Image(type="filepath", label="Image", elem_id="classification-input")
                label = gr.Label(num_top_classes=5, label="Top-5", elem_id="classification-output")
            gr.Button("Classify", elem_id="classification-run").click(lambda p: classify(models, p), image, label)
        with gr.Tab("Human pose"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", label="Image", elem_id="pose-input")
                    box = gr.Textbox(label="Person box: x, y, width, height (empty: the whole image)", elem_id="pose-box")
                drawn = gr.Image(type="pil", label="Keypoints and skeleton", elem_id="pose-output")
            gr.Button("Estimate pose", elem_id="pose-run").click(lambda p, b: estimate_pose(models, p, b), [image, box], drawn)
        with gr.Tab("Head pose"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", label="Image", elem_id="head-pose-input")
                    box = gr.Textbox(label="Face box: x, y, width, height (empty: the whole image)", elem_id="head-pose-box")
                with gr.Column():
                    angles = gr.Textbox(label="Yaw, pitch, roll", elem_id="head-pose-angles")
                    drawn = gr.Image(type="pil", label="Head axes", elem_id="head-pose-output")
            gr.Button("Estimate head pose", elem_id="head-pose-run").click(
                lambda p, b: estimate_head_pose(models, p, b), [image, box], [angles, drawn]
            )
    return demo


if __name__ == "__main__":
    build_demo().launch()
