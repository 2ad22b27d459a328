"""A non-COCO keypoint set end to end: a 14-point LSP-style body set in COCO format. From scratch, the pose script
takes its keypoint metadata from the file's category plus a JSON of sigmas and upper body; a (tiny) model of that set
is trained by the script, evaluated with the set's OKS sigmas (pycocotools) and PCK, then reloaded from the Hub-ready
folder and run through the pipeline and the processor's post-processing."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, tiny_config
from PIL import Image, ImageDraw
from transformers import pipeline

from cmsa_hf import CMSAForKeypointDetection, CMSAImageProcessor
from cmsa_hf.configuration_cmsa import DEFAULT_KEYPOINT_SIGMA
from cmsa_hf.data.coco import keypoint_metadata
from cmsa_hf.metrics import coco_keypoint_ap, coco_keypoint_results
from cmsa_hf.tasks import KeypointDetectionTask, parse_args, run


SCRIPT = REPO_ROOT / "examples" / "keypoint-detection" / "run_keypoints.py"
sys.path.insert(0, str(SCRIPT.parent))
import run_keypoints  # noqa: E402


# The Leeds Sports Pose order (14 body joints; LSP itself ships no OKS sigmas: these are COCO's for the same joints).
LSP_NAMES = [
    "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle", "right_wrist", "right_elbow",
    "right_shoulder", "left_shoulder", "left_elbow", "left_wrist", "neck", "head_top",
]  # fmt: skip
LSP_SKELETON = [(0, 1), (1, 2), (3, 4), (4, 5), (6, 7), (7, 8), (9, 10), (10, 11), (2, 3), (8, 9), (12, 13), (8, 12), (9, 12)]
LSP_SIGMAS = [0.089, 0.087, 0.107, 0.107, 0.087, 0.089, 0.062, 0.072, 0.079, 0.079, 0.072, 0.062, 0.079, 0.079]
LSP_UPPER_BODY = list(range(6, 14))
LSP_FLIP_PAIRS = [[0, 5], [1, 4], [2, 3], [6, 11], [7, 10], [8, 9]]  # what the left / right names give (left first)
# A standing figure in a unit box (x, y in [0, 1]), in LSP order.
TEMPLATE = np.array([
    [0.35, 0.95], [0.37, 0.75], [0.40, 0.55], [0.60, 0.55], [0.63, 0.75], [0.65, 0.95], [0.15, 0.45], [0.22, 0.32],
    [0.33, 0.20], [0.67, 0.20], [0.78, 0.32], [0.85, 0.45], [0.50, 0.16], [0.50, 0.02],
])  # fmt: skip


LSP_CATEGORY_ID = 3  # not COCO's person id: the results must carry the file's category


def make_lsp_set(root: Path, num_images: int = 6, seed: int = 0) -> Path:
    """COCO-format annotations of stick figures drawn with PIL (limbs as lines, one colour per joint), one figure per
    image, jittered; the category lists the 14 LSP names and a 1-based skeleton. Returns the annotation file."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = 72, 80
        box = [float(rng.uniform(4, 24)), float(rng.uniform(4, 12)), 40.0, 60.0]
        points = (TEMPLATE + rng.normal(0, 0.03, TEMPLATE.shape)) * box[2:] + box[:2]
        image = Image.new("RGB", (width, height), (25, 25, 25))
        draw = ImageDraw.Draw(image)
        for a, b in LSP_SKELETON:
            draw.line([tuple(points[a]), tuple(points[b])], fill=(150, 150, 150), width=2)
        for index, (x, y) in enumerate(points):
            colour = tuple(int(c) for c in 60 + 195 * np.array([index % 2, (index // 2) % 2, index / 13]))
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=colour)
        name = f"{image_id:06d}.png"
        image.save(root / "images" / name)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        visibility = np.full((14, 1), 2.0)
        visibility[rng.integers(0, 14)] = 0  # one unlabelled joint per figure
        keypoints = np.concatenate([points * (visibility > 0), visibility], 1).ravel().round(2).tolist()
        annotations.append({
            "id": image_id, "image_id": image_id, "category_id": LSP_CATEGORY_ID, "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
            "keypoints": keypoints, "num_keypoints": int((visibility > 0).sum()),
        })  # fmt: skip
    category = {"id": LSP_CATEGORY_ID, "name": "person", "keypoints": LSP_NAMES, "skeleton": [[a + 1, b + 1] for a, b in LSP_SKELETON]}
    annotation_file = root / "lsp_keypoints.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [category]}))
    return annotation_file


@pytest.fixture(scope="module")
def lsp(tmp_path_factory):
    root = tmp_path_factory.mktemp("lsp")
    annotation_file = make_lsp_set(root)
    metadata_file = root / "lsp_metadata.json"
    metadata_file.write_text(json.dumps({"keypoint_sigmas": LSP_SIGMAS, "upper_body_keypoints": LSP_UPPER_BODY}))
    return annotation_file, root / "images", metadata_file


def test_set_sigmas_drive_the_oks_ap(lsp, tmp_path):
    """Ground truth shifted by 2 pixels: the set's sigmas give one AP, wider ones a higher AP, COCO's defaults an error."""
    annotation_file, _, _ = lsp
    people = json.loads(annotation_file.read_text())["annotations"]
    keypoints = np.stack([np.asarray(p["keypoints"]).reshape(14, 3)[:, :2] for p in people]) + 2.0
    results = coco_keypoint_results(
        [p["image_id"] for p in people], keypoints, np.ones((len(people), 14)), np.ones(len(people)),
        category_id=LSP_CATEGORY_ID,
    )  # fmt: skip
    strict = coco_keypoint_ap(annotation_file, results, tmp_path / "r.json", sigmas=LSP_SIGMAS)["AP"]
    loose = coco_keypoint_ap(annotation_file, results, tmp_path / "r.json", sigmas=[4 * s for s in LSP_SIGMAS])["AP"]
    assert strict < loose == 1.0
    with pytest.raises(ValueError, match="14 keypoints, not COCO's 17: pass the set's sigmas"):
        coco_keypoint_ap(annotation_file, results, tmp_path / "r.json")


def load_model(argv):
    """The (model, processor) that `run_keypoints.py` with these flags would train."""
    task = KeypointDetectionTask()
    return task.create_model(parse_args(task, argv))


def check_lsp_config(config: dict):
    assert config["keypoint_names"] == LSP_NAMES and config["keypoint_sigmas"] == LSP_SIGMAS
    assert sorted(map(sorted, config["flip_pairs"])) == sorted(map(sorted, LSP_FLIP_PAIRS))
    assert config["skeleton"] == [list(edge) for edge in LSP_SKELETON] and config["upper_body_keypoints"] == LSP_UPPER_BODY


def test_from_scratch_the_script_takes_the_set_of_the_training_file(lsp, tmp_path):
    annotation_file, image_dir, metadata_file = lsp
    common = ["--train_annotation_file", str(annotation_file), "--train_image_dir", str(image_dir), "--output_dir", str(tmp_path)]
    model, processor = load_model([*common, "--keypoint_metadata_file", str(metadata_file), "--image_size", "16", "16"])
    check_lsp_config(model.config.to_dict())
    assert model.config.variant == "cmsa-s" and processor.keypoint_names == LSP_NAMES
    with pytest.warns(UserWarning, match="No keypoint_sigmas given for the 14 keypoints"):
        model, _ = load_model([*common, "--image_size", "16", "16"])
    assert model.config.upper_body_keypoints == [] and model.config.keypoint_names == LSP_NAMES


def test_train_evaluate_and_reload_a_14_point_set(lsp, tmp_path):
    annotation_file, image_dir, metadata_file = lsp
    torch.manual_seed(0)
    start = tmp_path / "start"
    CMSAForKeypointDetection(tiny_config(**keypoint_metadata(annotation_file, metadata_file))).save_pretrained(start)
    output_dir = tmp_path / "lsp-cmsa"
    results = run_keypoints.main([
        "--train_annotation_file", str(annotation_file), "--train_image_dir", str(image_dir),
        "--model_name_or_path", str(start), "--image_size", "16", "16", "--output_dir", str(output_dir),
        "--max_train_steps", "3", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
        "--num_warmup_steps", "1", "--half_body_probability", "1.0", "--dataset_name", "lsp-style-sticks",
    ])  # fmt: skip
    assert results["train_steps"] == 3 and results["eval_samples"] == 6
    assert 0.0 <= results["eval_AP"] <= 1.0 and 0.0 <= results["eval_pck"] <= 1.0
    check_lsp_config(json.loads((output_dir / "config.json").read_text()))

    # The AP the script reports is COCOeval with the set's sigmas on the results file it wrote
    written = json.loads((output_dir / "eval_keypoint_results.json").read_text())
    assert len(written) == 6 and all(len(entry["keypoints"]) == 3 * 14 for entry in written)
    assert {entry["category_id"] for entry in written} == {LSP_CATEGORY_ID}
    again = coco_keypoint_ap(annotation_file, written, tmp_path / "again.json", sigmas=LSP_SIGMAS)
    assert round(again["AP"], 4) == results["eval_AP"] and round(again["AR"], 4) == results["eval_AR"]

    # Reloaded: 14 keypoints with the set's names, through the pipeline and the processor's post-processing
    model = CMSAForKeypointDetection.from_pretrained(output_dir).eval()
    processor = CMSAImageProcessor.from_pretrained(output_dir)
    assert model.config.num_keypoints == 14 and processor.keypoint_names == LSP_NAMES
    image = Image.open(image_dir / "000001.png")
    box = json.loads(annotation_file.read_text())["annotations"][0]["bbox"]
    (person,) = pipeline("keypoint-detection", model=str(output_dir))(image, boxes=[box])
    assert [keypoint["label"] for keypoint in person["keypoints"]] == LSP_NAMES
    outputs = model(**processor(image, boxes=[box], return_tensors="pt"))
    assert outputs.heatmaps.shape[1] == 14
    (decoded,) = processor.post_process_keypoint_detection(outputs, [[box]])[0]
    assert decoded["keypoints"].shape == (14, 2) and decoded["labels"] == LSP_NAMES
    np.testing.assert_allclose([[k["x"], k["y"]] for k in person["keypoints"]], decoded["keypoints"].detach(), atol=1e-4)


def test_the_metadata_file_also_refines_a_saved_model(lsp, tmp_path):
    annotation_file, image_dir, metadata_file = lsp
    with pytest.warns(UserWarning, match="No keypoint_sigmas given"):
        CMSAForKeypointDetection(tiny_config(**keypoint_metadata(annotation_file))).save_pretrained(tmp_path / "start")
    common = ["--train_annotation_file", str(annotation_file), "--train_image_dir", str(image_dir), "--image_size", "16", "16"]
    args = [*common, "--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(tmp_path / "start")]
    model, _ = load_model(args)
    assert model.config.keypoint_sigmas == [DEFAULT_KEYPOINT_SIGMA] * 14  # the saved model's own
    model, _ = load_model([*args, "--keypoint_metadata_file", str(metadata_file)])
    check_lsp_config(model.config.to_dict())


class LSPPoseTask(KeypointDetectionTask):
    """The README's "Adding a task" example: the keypoint task with its own recipe defaults and card name."""

    recipe = {**KeypointDetectionTask.recipe, "half_body_probability": 0.0, "rotation_factor": 30.0}

    def card_fields(self, args):
        return {**super().card_fields(args), "dataset_name": "lsp"}


def test_a_task_subclass_changes_recipe_defaults_and_card(lsp, tmp_path):
    annotation_file, image_dir, metadata_file = lsp
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="No keypoint_sigmas given"):
        CMSAForKeypointDetection(tiny_config(**keypoint_metadata(annotation_file))).save_pretrained(tmp_path / "start")
    output_dir = tmp_path / "lsp-task"
    results = run(LSPPoseTask(), [
        "--train_annotation_file", str(annotation_file), "--train_image_dir", str(image_dir),
        "--model_name_or_path", str(tmp_path / "start"), "--keypoint_metadata_file", str(metadata_file),
        "--image_size", "16", "16", "--output_dir", str(output_dir), "--max_train_steps", "1",
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4", "--num_warmup_steps", "0",
    ])  # fmt: skip
    assert results["train_steps"] == 1 and results["eval_samples"] == 6
    check_lsp_config(json.loads((output_dir / "config.json").read_text()))
    card = (output_dir / "README.md").read_text()
    assert "      name: lsp\n" in card and "COCO-format person keypoints (14 points)" in card
    assert "0.5 / 0.0 / 0.35 / 30.0 deg" in card  # flip / half body (the subclass's) / scale / rotation (its)
