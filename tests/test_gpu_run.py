"""The GPU recipe (`benchmarks/gpu_run.py`) end to end on CPU at tiny scale: every task trains two steps on its
real data, is evaluated, writes its Hub-ready folder, and the summary says what ran where."""

import json

import pytest
from conftest import SHARED_DATA
from test_benchmarks import load_script

from cmsa_hf import CMSAForHeadPoseEstimation, CMSAForImageClassification, CMSAForKeypointDetection


pytestmark = pytest.mark.skipif(
    not (SHARED_DATA / "cifar10-train.zip").exists(), reason="needs ../shared/data (CIFAR-10, AFLW2000 half, coco-mini)"
)


def test_the_gpu_recipe_runs_every_task_on_cpu_at_tiny_scale(tmp_path):
    summary = load_script("gpu_run").main(["--output_dir", str(tmp_path), "--data", str(SHARED_DATA), "--tiny"])
    assert json.loads((tmp_path / "results.json").read_text()) == summary
    assert summary["device"].startswith("CPU") and summary["tiny"] is True
    rows = {row["task"]: row for row in summary["tasks"]}
    assert list(rows) == ["image-classification", "head-pose", "keypoint-detection"]
    for row in rows.values():
        assert row["train_steps"] == 2 and row["train_images_per_s"] > 0 and row["epochs_trained"] > 0
    assert rows["image-classification"]["eval_samples"] == 16 and 0 <= rows["image-classification"]["eval_accuracy"] <= 1
    assert rows["head-pose"]["eval_mae"] > 0
    assert "eval_AP" in rows["keypoint-detection"]
    for name, model_class in [
        ("image-classification", CMSAForImageClassification),
        ("head-pose", CMSAForHeadPoseEstimation),
        ("keypoint-detection", CMSAForKeypointDetection),
    ]:
        model = model_class.from_pretrained(tmp_path / name)
        assert model.config.variant == "cmsa-s"
    card = (tmp_path / "image-classification" / "README.md").read_text()
    assert "batched on the training device" in card  # CIFAR decoded once and augmented on the device


def test_missing_data_is_named(tmp_path):
    with pytest.raises(SystemExit):
        load_script("gpu_run").main(["--output_dir", str(tmp_path), "--data", str(tmp_path), "--tiny"])
