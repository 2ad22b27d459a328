"""What `pip install cmsa_hf` gives: the wheel built from this tree, installed non-editable into a fresh virtual
environment, trains each task to its Hub-ready folder from outside the source tree with its `cmsa-hf` command
(`cmsa-hf train TASK`, `cmsa-hf finetune image-classification`).

The fresh environment holds only the wheel; its dependencies come from this test run's environment through a
`.pth` line (a path entry, so the editable install's finder there is not loaded), which keeps the test offline and
fast while every `cmsa_hf` import resolves to the installed wheel."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, make_aflw2000, make_coco_keypoints, tiny_config

from cmsa_hf import CMSAForHeadPoseEstimation, CMSAForImageClassification, CMSAForKeypointDetection


NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".cache", "outputs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs"
)


# Nothing on the path but the fresh environment's own site-packages (and, through it, the dependencies).
CLEAN_ENV = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {
    "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"
}  # fmt: skip


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=CLEAN_ENV, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, command))}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    source = tmp_path_factory.mktemp("source") / "cmsa_hf"
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCE)
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(source)])
    (path,) = dist.glob("cmsa_hf-*.whl")
    return path


@pytest.fixture(scope="module")
def installed_python(wheel, tmp_path_factory):
    """A fresh venv with the wheel installed (not editable); returns its interpreter."""
    venv = tmp_path_factory.mktemp("venv") / "fresh"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)])
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_wheel_holds_the_package_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for template in ("image_classification.md", "keypoint_detection.md", "head_pose.md"):
        assert f"cmsa_hf/model_cards/{template}" in names
    for metric in ("cmsa_accuracy", "cmsa_coco_keypoints", "cmsa_pck", "cmsa_head_pose_mae"):
        assert f"cmsa_hf/evaluation/{metric}/{metric}.py" in names
    assert not any(name.startswith(("tests/", "examples/", "model_cards/")) for name in names)


def test_installed_package_is_the_wheel(installed_python, tmp_path):
    location = run([str(installed_python), "-c", "import cmsa_hf; print(cmsa_hf.__file__)"], cwd=tmp_path).stdout
    assert Path(location.strip()).resolve().is_relative_to(installed_python.parent.parent.resolve())
    console_script = installed_python.parent / "cmsa-hf"
    usage = run([str(console_script), "--help"], cwd=tmp_path).stdout.splitlines()[0]
    assert "{train,finetune,publish,convert}" in usage
    # The shipped evaluate modules load from the installed package, offline.
    metric = (
        "from cmsa_hf import evaluation; mae = evaluation.load('cmsa_head_pose_mae', keep_in_memory=True); "
        "print(evaluation.metric_path('cmsa_head_pose_mae')); print(mae.compute(predictions=[[3, 2, 1]], references=[[0, 0, 0]]))"
    )
    path, result = run([str(installed_python), "-c", metric], cwd=tmp_path).stdout.strip().splitlines()[-2:]
    assert Path(path).is_relative_to(installed_python.parent.parent.resolve()) and "'mean': 2.0" in result


def tiny_model(model_class, folder: Path) -> Path:
    torch.manual_seed(0)
    labels = {"num_labels": 10} if model_class is CMSAForImageClassification else {}  # the digits' classes
    model_class(tiny_config(**labels)).save_pretrained(folder)
    return folder


def task_runs(root: Path):
    """(`cmsa-hf train` task, arguments) of a two-step run of each task on tiny data."""
    annotation_file = make_coco_keypoints(root / "coco", num_images=4)
    faces = make_aflw2000(root / "AFLW2000", count=6)
    common = ["--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--num_warmup_steps", "1",
              "--max_train_steps", "2", "--learning_rate", "1e-3"]  # fmt: skip
    yield "image-classification", [
        "--dataset_name", "digits", "--model_name_or_path", str(tiny_model(CMSAForImageClassification, root / "cls")),
        "--image_size", "16", "16", "--output_dir", str(root / "out-classification"), *common,
    ]  # fmt: skip
    yield "keypoint-detection", [
        "--train_annotation_file", str(annotation_file), "--train_image_dir", str(root / "coco" / "images"),
        "--model_name_or_path", str(tiny_model(CMSAForKeypointDetection, root / "pose")), "--image_size", "16", "16",
        "--output_dir", str(root / "out-keypoints"), *common,
    ]  # fmt: skip
    yield "head-pose", [
        "--train_data", str(faces), "--train_format", "aflw2000", "--validation_split_size", "3",
        "--model_name_or_path", str(tiny_model(CMSAForHeadPoseEstimation, root / "head")), "--image_size", "16", "16",
        "--output_dir", str(root / "out-head-pose"), *common,
    ]  # fmt: skip


def assert_hub_ready(output_dir: Path, what: str):
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "all_results.json"):
        assert (output_dir / name).is_file(), f"{what}: {name}"
    assert json.loads((output_dir / "all_results.json").read_text()), what
    assert "model-index" in (output_dir / "README.md").read_text(), what


def test_each_task_trains_to_a_hub_ready_folder_from_the_wheel(installed_python, tmp_path):
    cmsa_hf = str(installed_python.parent / "cmsa-hf")
    for task, arguments in task_runs(tmp_path):
        help_text = run([cmsa_hf, "train", task, "--help"], cwd=tmp_path).stdout
        assert help_text.startswith(f"usage: cmsa-hf train {task} ") and "--output_dir" in help_text, task
        run([cmsa_hf, "train", task, *arguments], cwd=tmp_path)
        assert_hub_ready(Path(arguments[arguments.index("--output_dir") + 1]), task)


def test_trainer_fine_tuning_from_the_wheel(installed_python, tmp_path):
    cmsa_hf = str(installed_python.parent / "cmsa-hf")
    assert "--eval_strategy" in run([cmsa_hf, "finetune", "image-classification", "--help"], cwd=tmp_path).stdout
    run([
        cmsa_hf, "finetune", "image-classification", "--model_name_or_path",
        str(tiny_model(CMSAForImageClassification, tmp_path / "cls")), "--dataset_name", "digits",
        "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "64", "--save_strategy", "no", "--report_to", "none", "--use_cpu",
    ], cwd=tmp_path)  # fmt: skip
    assert_hub_ready(tmp_path / "out", "finetune")
