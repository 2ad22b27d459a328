"""Hub repositories and cards: `model.push_to_hub` and the Trainer's `push_to_hub` make repositories that load through
their pipeline with a CMSA card (Hub calls intercepted: a repository is a local folder), and every task's card
carries metadata the Hub accepts and that tells the truth (base model, pipeline tag, the data's terms, data set
names, no trivial top-k)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, head_pose_args, make_coco_keypoints, tiny_config
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.hf_api import RepoUrl
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from test_run_classification import make_image_folder
from transformers import pipeline

from cmsa_hf import CMSAForHeadPoseEstimation, CMSAForImageClassification, CMSAForKeypointDetection
from cmsa_hf.hub import check_card_metadata, dataset_name_of_folder, hub_base_model


for script in ("image-classification/run_classification.py", "image-classification/run_trainer.py",
               "keypoint-detection/run_keypoints.py", "head-pose/run_head_pose.py"):  # fmt: skip
    sys.path.insert(0, str(REPO_ROOT / "examples" / Path(script).parent))
import run_classification  # noqa: E402
import run_head_pose  # noqa: E402
import run_keypoints  # noqa: E402
import run_trainer  # noqa: E402


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The Hub calls intercepted: repository `owner/name` is the folder `hub / owner / name`, holding what was sent."""
    root = tmp_path / "hub"

    def create_repo(self, repo_id, **kwargs):
        (root / repo_id).mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (root / repo_id / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / name, root / repo_id / name)
        return f"https://huggingface.co/{repo_id}/commit/0"

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            assert isinstance(operation, CommitOperationAdd)
            (root / repo_id / operation.path_in_repo).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(operation.path_or_fileobj, root / repo_id / operation.path_in_repo)
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return root


def card_metadata(folder: Path) -> dict:
    """The repository card's metadata, checked as the Hub reads it."""
    metadata = ModelCard.load(folder / "README.md").data.to_dict()
    check_card_metadata(metadata, folder / "README.md")
    return metadata


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy())


@pytest.mark.parametrize(
    "model_class, task, pipeline_tag, call",
    [
        (CMSAForImageClassification, "image-classification", "image-classification", {}),
        (CMSAForKeypointDetection, "keypoint-detection", "keypoint-detection", {"boxes": [[4, 2, 30, 36]]}),
        (CMSAForHeadPoseEstimation, "head-pose-estimation", None, {"boxes": [[4, 2, 30, 36]]}),
    ],
    ids=["classification", "keypoints", "head-pose"],
)  # fmt: skip
def test_model_push_to_hub_makes_a_repo_that_loads_through_its_pipeline(hub, image, model_class, task, pipeline_tag, call):
    torch.manual_seed(0)
    model = model_class(tiny_config()).eval()
    url = model.push_to_hub("me/tiny-cmsa")
    repo = hub / "me" / "tiny-cmsa"
    assert url == "https://huggingface.co/me/tiny-cmsa"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {p.name for p in repo.iterdir()}

    metadata = card_metadata(repo)
    assert metadata.get("pipeline_tag") == pipeline_tag and metadata["license"] == "apache-2.0"
    assert {"cmsa", "low-resolution", "vision"} <= set(metadata["tags"]) and metadata["library_name"] == "transformers"
    assert "base_model" not in metadata  # built from a config: no checkpoint to name
    text = (repo / "README.md").read_text()
    assert f"`{model_class.__name__}`" in text and 'model="me/tiny-cmsa"' in text
    assert "records no evaluation" in text

    # The task is named: offline, transformers cannot ask the Hub for the repository's pipeline_tag.
    outputs = pipeline(task, model=str(repo))(image, **call)
    if model_class is CMSAForImageClassification:
        assert {output["label"] for output in outputs} <= set(model.config.id2label.values())
    elif model_class is CMSAForKeypointDetection:
        assert len(outputs[0]["keypoints"]) == model.config.num_keypoints
    else:
        assert set(outputs[0]) >= {"yaw", "pitch", "roll"}


def test_push_to_hub_keeps_a_given_card_and_processor_and_names_a_hub_base_model(hub, tmp_path):
    torch.manual_seed(0)
    model = CMSAForImageClassification(tiny_config())
    model.config.name_or_path = "someone/cmsa-s-cifar"  # as from_pretrained of a Hub id sets it
    model.push_to_hub("me/tiny-cmsa", tags=["my-tag"])
    metadata = card_metadata(hub / "me" / "tiny-cmsa")
    assert metadata["base_model"] == "someone/cmsa-s-cifar" and "my-tag" in metadata["tags"]

    model.config.name_or_path = str(tmp_path)  # a local folder is never a base_model
    model.push_to_hub("me/tiny-local")
    assert "base_model" not in card_metadata(hub / "me" / "tiny-local")


@pytest.fixture(scope="module")
def classification_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("classification")
    make_image_folder(root / "cifar-mini" / "train", {"dark": 8, "bright": 8})
    make_image_folder(root / "cifar-mini" / "validation", {"dark": 3, "bright": 3}, seed=1)
    torch.manual_seed(0)
    CMSAForImageClassification(tiny_config(num_labels=2)).save_pretrained(root / "out-cls")
    return root


def test_trainer_push_to_hub_uploads_a_cmsa_card_and_the_processor(hub, classification_data, tmp_path, image):
    data = classification_data / "cifar-mini"
    metrics = run_trainer.main([
        "--model_name_or_path", str(classification_data / "out-cls"), "--base_model_id", "someone/cmsa-s-cifar",
        "--train_dir", str(data / "train"), "--validation_dir", str(data / "validation"), "--output_dir",
        str(tmp_path / "finetuned"), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--save_strategy", "no", "--report_to", "none", "--use_cpu",
        "--push_to_hub", "--hub_model_id", "me/finetuned",
    ])  # fmt: skip
    repo = hub / "me" / "finetuned"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {p.name for p in repo.iterdir()}
    metadata = card_metadata(repo)
    assert metadata["pipeline_tag"] == "image-classification" and metadata["base_model"] == "someone/cmsa-s-cifar"
    result = metadata["model-index"][0]["results"][0]
    assert result["dataset"]["name"] == "cifar-mini" and result["dataset"]["split"] == "validation"
    assert {m["type"]: m["value"] for m in result["metrics"]}["accuracy"] == metrics["eval_accuracy"]
    assert 'model="me/finetuned"' in (repo / "README.md").read_text()
    outputs = pipeline("image-classification", model=str(repo))(image)
    assert {output["label"] for output in outputs} == {"bright", "dark"}


def test_classification_card_names_the_data_set_and_leaves_out_a_trivial_top_k(classification_data, tmp_path):
    data = classification_data / "cifar-mini"
    run_classification.main([
        "--train_dir", str(data / "train"), "--model_name_or_path", str(classification_data / "out-cls"),
        "--output_dir", str(tmp_path), "--max_train_steps", "1", "--per_device_train_batch_size", "4",
    ])  # fmt: skip
    metadata = card_metadata(tmp_path)
    assert "base_model" not in metadata  # `out-cls` is a local folder, not a Hub id
    result = metadata["model-index"][0]["results"][0]
    assert result["dataset"]["name"] == "cifar-mini" and result["dataset"]["split"] == "held-out"
    assert "top-5-accuracy" not in {m["type"] for m in result["metrics"]}  # 2 classes: top-5 is always 1
    assert "top-5" not in (tmp_path / "README.md").read_text()
    assert "eval_top5_accuracy" in json.loads((tmp_path / "all_results.json").read_text())  # measured, not carded


def test_keypoint_card_names_the_evaluated_file_and_split(tmp_path):
    annotation_file = make_coco_keypoints(tmp_path / "coco-mini", num_images=3)
    validation_file = annotation_file.with_name("person_keypoints_val.json")
    shutil.copy(annotation_file, validation_file)
    torch.manual_seed(0)
    CMSAForKeypointDetection(tiny_config()).save_pretrained(tmp_path / "tiny")
    run_keypoints.main([
        "--train_annotation_file", str(annotation_file), "--train_image_dir", str(tmp_path / "coco-mini" / "images"),
        "--validation_annotation_file", str(validation_file), "--dataset_name", "coco-mini",
        "--model_name_or_path", str(tmp_path / "tiny"), "--image_size", "16", "16", "--output_dir", str(tmp_path / "out"),
        "--per_device_train_batch_size", "2", "--max_train_steps", "1", "--base_model_id", "someone/cmsa-s-coco",
    ])  # fmt: skip
    metadata = card_metadata(tmp_path / "out")
    assert metadata["pipeline_tag"] == "keypoint-detection" and metadata["license"] == "apache-2.0"
    assert metadata["base_model"] == "someone/cmsa-s-coco"
    dataset = metadata["model-index"][0]["results"][0]["dataset"]
    assert dataset["name"] == "person_keypoints_val" and dataset["split"] == "validation"


def test_head_pose_card_has_no_pipeline_tag_and_states_the_data_terms(faces, tiny_head_pose_model, tmp_path):
    validation = tmp_path / "AFLW2000-val"
    shutil.copytree(faces, validation)
    run_head_pose.main(head_pose_args(
        faces, tiny_head_pose_model, tmp_path / "out", "--max_train_steps", "1", "--validation_data", str(validation),
    ))  # fmt: skip
    metadata = card_metadata(tmp_path / "out")
    assert "pipeline_tag" not in metadata and "base_model" not in metadata
    assert metadata["license"] == "other" and metadata["license_name"] == "research-only-training-data"
    dataset = metadata["model-index"][0]["results"][0]["dataset"]
    assert dataset["name"] == "AFLW2000-3D" and dataset["split"] == "test"
    text = (tmp_path / "out" / "README.md").read_text()
    assert "## Licence" in text and "non-commercial research use only (AFLW's academic licence" in text
    assert "The weights inherit those terms" in text


def test_base_model_is_a_hub_id_or_absent(tmp_path):
    assert hub_base_model(str(tmp_path)) is None and hub_base_model(None) is None
    assert hub_base_model("someone/cmsa-s") == "someone/cmsa-s"
    assert hub_base_model(str(tmp_path), "someone/cmsa-s") == "someone/cmsa-s"
    with pytest.raises(ValueError, match="--base_model_id 'a/b/c' is not a Hub repository id"):
        hub_base_model(str(tmp_path), "a/b/c")


def test_data_set_names_of_folders(tmp_path):
    assert dataset_name_of_folder(tmp_path / "cifar-mini" / "train") == "cifar-mini"
    assert dataset_name_of_folder(tmp_path / "cifar10-train.zip") == "cifar10-train"
    assert dataset_name_of_folder(tmp_path / "my_images") == "my_images"


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"base_model": "."}, r"base_model '.' is not a Hub repository id"),
        ({"datasets": ["a/b/c"]}, r"datasets 'a/b/c' is not a Hub repository id"),
        ({"pipeline_tag": "head-pose-estimation"}, r"pipeline_tag 'head-pose-estimation' is not a Hub pipeline tag"),
        ({"license": "other"}, "license 'other' needs a license_name"),
        ({"model-index": [{"name": "x", "results": [{"task": {}}]}]}, "the model-index does not parse"),
    ],
)  # fmt: skip
def test_card_metadata_the_hub_would_misread_is_refused(metadata, message):
    with pytest.raises(ValueError, match=message):
        check_card_metadata(metadata, "README.md")
