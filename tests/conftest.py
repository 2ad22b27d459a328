"""Shared fixtures. Nothing in the suite may reach the network: the Hub is switched off for every test."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")  # evaluate ignores HF_HUB_OFFLINE
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cmsa_hf import CMSAConfig, CMSAForHeadPoseEstimation  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CMSA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def tiny_config(**overrides) -> CMSAConfig:
    """A CMSA with every architectural feature (3 groups, cascade, pooling, reparam branches) but few weights."""
    fields = {
        "image_size": (16, 16),
        "hidden_sizes": [16, 24, 32],
        "depths": [1, 1, 1],
        "num_heads": [[1, 1, 1], [1, 1], [1, 1]],
        "key_dim": 8,
        "drop_path_rate": 0.0,
        **overrides,
    }
    if "id2label" not in fields:
        fields.setdefault("num_labels", 3)
    return CMSAConfig.from_variant("cmsa-s", **fields)


def randomise_batch_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm random running statistics and affine parameters (as a trained model would have)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.5, 0.5, generator=generator)
    return model


@pytest.fixture
def tiny():
    return tiny_config()


def make_coco_keypoints(root: Path, num_images: int = 4, seed: int = 0) -> Path:
    """A COCO person-keypoints set in the official layout (root/images/*.png + root/annotations.json).

    Every image holds one person box with 17 labelled keypoints, drawn as bright 3x3 dots on a dark image, plus
    the annotations the HRNet protocol drops: a crowd region, a person without keypoints, a 0.5-pixel box.
    Returns the annotation file.
    """
    from PIL import Image  # noqa: PLC0415

    from cmsa_hf.configuration_cmsa import COCO_KEYPOINT_NAMES, COCO_SKELETON  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = 80, 64
        box = [float(rng.uniform(5, 20)), float(rng.uniform(4, 10)), 30.0, 44.0]
        points = np.stack(
            [rng.uniform(box[0] + 2, box[0] + box[2] - 2, 17), rng.uniform(box[1] + 2, box[1] + box[3] - 2, 17)], -1
        )
        pixels = np.full((height, width, 3), 20, dtype=np.uint8)
        for x, y in points.astype(int):
            pixels[y - 1 : y + 2, x - 1 : x + 2] = 235
        name = f"{image_id:012d}.png"
        Image.fromarray(pixels).save(root / "images" / name)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        keypoints = np.concatenate([points, np.full((17, 1), 2.0)], 1).ravel().round(2).tolist()
        common = {"image_id": image_id, "category_id": 1}
        annotations += [
            {**common, "id": 10 * image_id, "bbox": box, "area": box[2] * box[3], "iscrowd": 0, "keypoints": keypoints, "num_keypoints": 17},
            {**common, "id": 10 * image_id + 1, "bbox": [50, 5, 20, 30], "area": 600.0, "iscrowd": 1, "keypoints": keypoints, "num_keypoints": 17},
            {**common, "id": 10 * image_id + 2, "bbox": [55, 30, 20, 30], "area": 600.0, "iscrowd": 0, "keypoints": [0] * 51, "num_keypoints": 0},
            {**common, "id": 10 * image_id + 3, "bbox": [60, 2, 0.5, 0.5], "area": 0.25, "iscrowd": 0, "keypoints": keypoints, "num_keypoints": 17},
        ]  # fmt: skip
    categories = [{"id": 1, "name": "person", "supercategory": "person", "keypoints": list(COCO_KEYPOINT_NAMES),
                   "skeleton": [[a + 1, b + 1] for a, b in COCO_SKELETON]}]  # fmt: skip
    annotation_file = root / "annotations.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return annotation_file


def make_aflw2000(root: Path, count: int = 6, seed: int = 0) -> Path:
    """A folder in the AFLW2000-3D layout (imageNNNNN.jpg + imageNNNNN.mat with `Pose_Para` and `pt2d`): faces drawn
    as a bright ellipse whose nose dot moves with the yaw, so that the angles are learnable. Returns the folder."""
    import scipy.io  # noqa: PLC0415
    from PIL import Image, ImageDraw  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        yaw, pitch, roll = rng.uniform(-60, 60), rng.uniform(-30, 30), rng.uniform(-20, 20)
        image = Image.new("RGB", (64, 64), (30, 30, 30))
        draw = ImageDraw.Draw(image)
        draw.ellipse([16, 12, 48, 52], fill=(200, 170, 150))
        nose_x, nose_y = 32 - 12 * np.sin(np.radians(yaw)), 34 - 8 * np.sin(np.radians(pitch))
        draw.ellipse([nose_x - 3, nose_y - 3, nose_x + 3, nose_y + 3], fill=(60, 20, 20))
        name = f"image{index:05d}"
        image.save(root / f"{name}.jpg")
        landmarks = np.stack([rng.uniform(18, 46, 21), rng.uniform(16, 50, 21)])  # (2, 21) as in AFLW2000-3D
        pose = np.array([[np.radians(pitch), np.radians(yaw), np.radians(roll), 1.0, 0.0, 0.0, 0.0]])
        scipy.io.savemat(root / f"{name}.mat", {"Pose_Para": pose, "pt2d": landmarks})
    return root


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Eight synthetic AFLW2000 faces (`make_aflw2000`)."""
    return make_aflw2000(tmp_path_factory.mktemp("aflw") / "AFLW2000", count=8)


@pytest.fixture(scope="module")
def tiny_head_pose_model(tmp_path_factory):
    """A saved tiny head-pose model (`tiny_config`)."""
    folder = tmp_path_factory.mktemp("tiny_head_pose")
    torch.manual_seed(0)
    CMSAForHeadPoseEstimation(tiny_config()).save_pretrained(folder)
    return folder


def head_pose_args(faces, model, output_dir, *extra) -> list[str]:
    """run_head_pose.py flags for a few steps of the tiny model on `faces` (3 held out)."""
    return [
        "--train_data", str(faces), "--train_format", "aflw2000", "--validation_split_size", "3",
        "--model_name_or_path", str(model), "--image_size", "16", "16", "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--num_warmup_steps", "1",
        "--learning_rate", "1e-3", *extra,
    ]  # fmt: skip


def launch_two_processes(script: Path, args: list[str]):
    """Run a training script under `accelerate launch --num_processes 2 --cpu` (gloo) and check it succeeded."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *args,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
