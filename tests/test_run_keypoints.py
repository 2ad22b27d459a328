"""The Accelerate pose script on a tiny COCO-layout set: Hub-ready folder and card with the COCO metrics,
exact resume, detected boxes, two processes, publishing (HfApi patched)."""

import json
import shutil
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import REPO_ROOT, launch_two_processes, make_coco_keypoints, tiny_config
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForKeypointDetection

from cmsa_hf import CMSAForKeypointDetection
from cmsa_hf.extras import MissingExtraError
from cmsa_hf.tasks import KeypointDetectionTask


SCRIPT = REPO_ROOT / "examples" / "keypoint-detection" / "run_keypoints.py"
sys.path.insert(0, str(SCRIPT.parent))
import run_keypoints  # noqa: E402


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return make_coco_keypoints(root, num_images=5), root / "images"


@pytest.fixture(scope="module")
def tiny_pose_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_pose")
    torch.manual_seed(0)
    CMSAForKeypointDetection(tiny_config()).save_pretrained(folder)
    return folder


def script_args(coco, model, output_dir, *extra):
    annotation_file, image_dir = coco
    return [
        "--train_annotation_file", str(annotation_file), "--train_image_dir", str(image_dir),
        "--model_name_or_path", str(model), "--image_size", "16", "16", "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--num_warmup_steps", "1",
        "--learning_rate", "1e-3", *extra,
    ]  # fmt: skip


def test_hub_ready_folder_and_card_hold_the_coco_metrics(coco, tiny_pose_model, tmp_path):
    results = run_keypoints.main(
        script_args(
            coco, tiny_pose_model, tmp_path, "--max_train_steps", "3", "--eval_before_training", "--reparameterize_on_save",
            "--hub_dataset_id", "you/coco-keypoints",
        )  # fmt: skip
    )
    measured = json.loads((tmp_path / "all_results.json").read_text())
    assert measured == json.loads(json.dumps(results))
    assert measured["eval_samples"] == 5 and measured["train_steps"] == 3
    assert {"eval_AP", "eval_AP50", "eval_AP75", "eval_APm", "eval_APl", "eval_AR", "eval_pck", "initial_eval_AP"} <= set(measured)
    written = json.loads((tmp_path / "eval_keypoint_results.json").read_text())  # the file COCOeval scored
    assert len(written) == 5 and len(written[0]["keypoints"]) == 51

    card = ModelCard.load(tmp_path / "README.md")
    metadata = card.data.to_dict()
    assert metadata["pipeline_tag"] == "keypoint-detection" and metadata["library_name"] == "transformers"
    assert {"cmsa", "low-resolution"} <= set(metadata["tags"]) and metadata["datasets"] == ["you/coco-keypoints"]
    assert metadata["model-index"][0]["results"][0]["task"]["name"] == "Keypoint Detection (human pose)"
    assert 'from_pretrained("' + tmp_path.name + '", subfolder="reparameterized"' in card.text
    values = {m["type"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert values["oks-ap"] == measured["eval_AP"] and values["oks-ar"] == measured["eval_AR"]
    assert f"| OKS AP | {measured['eval_AP']} |" in card.text and "the training set itself" in card.text

    model = AutoModelForKeypointDetection.from_pretrained(tmp_path)
    assert isinstance(model, CMSAForKeypointDetection)
    assert json.loads((tmp_path / "reparameterized" / "config.json").read_text())["reparameterized"] is True
    processor_config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor_config["keypoint_names"] == model.config.keypoint_names and processor_config["decoder"] == "dark"


def test_resume_gives_the_same_weights(coco, tiny_pose_model, tmp_path):
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--seed", "3"]
    run_keypoints.main(script_args(coco, tiny_pose_model, tmp_path / "full", *common))
    # a run that stopped after its step-2 checkpoint: the same folder with only that checkpoint
    partial = tmp_path / "partial"
    (partial / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_2", partial / "checkpoints" / "step_2")
    run_keypoints.main(script_args(coco, tiny_pose_model, partial, *common, "--resume_from_checkpoint", "latest"))
    expected, actual = load_file(tmp_path / "full" / "model.safetensors"), load_file(partial / "model.safetensors")
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_detected_boxes_are_evaluated_with_oks_nms(coco, tiny_pose_model, tmp_path):
    annotation_file, _ = coco
    ground_truth = json.loads(annotation_file.read_text())["annotations"]
    detections = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": [v + offset for v in a["bbox"]], "score": 0.9 - offset}
        for a in ground_truth if a["id"] % 10 == 0 for offset in (0.0, 0.5)
    ]  # two detections per person  # fmt: skip
    (tmp_path / "detections.json").write_text(json.dumps(detections))
    results = run_keypoints.main(
        script_args(coco, tiny_pose_model, tmp_path, "--max_train_steps", "1", "--detections_file", str(tmp_path / "detections.json"))
    )
    assert results["eval_samples"] == 10 and "eval_pck" not in results and "eval_AP" in results
    assert 5 <= len(json.loads((tmp_path / "eval_keypoint_results.json").read_text())) <= 10


def test_two_processes_count_every_eval_sample_once(coco, tiny_pose_model, tmp_path):
    launch_two_processes(SCRIPT, script_args(coco, tiny_pose_model, tmp_path, "--max_train_steps", "1"))
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert results["eval_samples"] == 5  # odd: the padding sample of the second process is not counted
    assert len(json.loads((tmp_path / "eval_keypoint_results.json").read_text())) == 5


def test_push_to_hub_uploads_the_folder(coco, tiny_pose_model, tmp_path):
    with (
        mock.patch("huggingface_hub.HfApi.create_repo", return_value="https://huggingface.co/me/pose") as create_repo,
        mock.patch("huggingface_hub.HfApi.upload_folder") as upload_folder,
    ):
        run_keypoints.main(
            script_args(coco, tiny_pose_model, tmp_path, "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "me/pose")
        )
    assert create_repo.call_args.args[0] == "me/pose"
    assert upload_folder.call_args.kwargs["repo_id"] == "me/pose"
    assert Path(upload_folder.call_args.kwargs["folder_path"]) == tmp_path


def test_image_size_must_match_the_checkpoint(coco, tiny_pose_model, tmp_path):
    args = script_args(coco, tiny_pose_model, tmp_path, "--max_train_steps", "1")
    args[args.index("--image_size") + 1 : args.index("--image_size") + 3] = ["32", "24"]
    with pytest.raises(ValueError, match="differs from the checkpoint's image_size"):
        run_keypoints.main(args)


def test_without_pycocotools_the_run_stops_before_reading_data_naming_the_extra(coco, tiny_pose_model, tmp_path, monkeypatch):
    for name in [name for name in sys.modules if name.split(".")[0] == "pycocotools"] + ["pycocotools"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import pycocotools...` now fails as if not installed
    started = time.perf_counter()
    with mock.patch.object(KeypointDetectionTask, "load_data") as load_data:
        with pytest.raises(MissingExtraError, match=r"keypoint-detection task needs the `pose` extra.*pycocotools"):
            run_keypoints.main(script_args(coco, tiny_pose_model, tmp_path / "out", "--max_train_steps", "3"))
    elapsed = time.perf_counter() - started
    print(f"failed after {elapsed:.2f} s")
    load_data.assert_not_called()
    assert elapsed < 10 and not (tmp_path / "out").exists()


def test_a_failing_evaluation_after_training_keeps_the_trained_weights(coco, tiny_pose_model, tmp_path):
    compute_metrics = KeypointDetectionTask.compute_metrics

    def fail_at_the_final_evaluation(self, args, outputs, name):
        if name == "eval":
            raise ModuleNotFoundError("No module named 'pycocotools'")
        return compute_metrics(self, args, outputs, name)

    with mock.patch.object(KeypointDetectionTask, "compute_metrics", fail_at_the_final_evaluation):
        with pytest.raises(RuntimeError, match=f"evaluation after training failed.*saved in {tmp_path}") as error:
            run_keypoints.main(script_args(coco, tiny_pose_model, tmp_path, "--max_train_steps", "3"))
    assert isinstance(error.value.__cause__, ModuleNotFoundError)
    trained, initial = load_file(tmp_path / "model.safetensors"), load_file(tiny_pose_model / "model.safetensors")
    assert trained.keys() == initial.keys() and any(not torch.equal(trained[k], initial[k]) for k in trained)
    reloaded = AutoModelForKeypointDetection.from_pretrained(tmp_path)
    assert all(torch.equal(value, trained[key]) for key, value in reloaded.state_dict().items() if key in trained)
    assert (tmp_path / "preprocessor_config.json").is_file() and not (tmp_path / "all_results.json").exists()
