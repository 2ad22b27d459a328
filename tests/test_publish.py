"""`cmsa-hf publish`: folder checks, the dry run, the reparameterized copy and the upload (HfApi patched)."""

import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import tiny_config
from test_run_classification import make_image_folder

from cmsa_hf import CMSAForImageClassification
from cmsa_hf.cli import main
from cmsa_hf.publish import publish, validate_folder


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    """A Hub-ready folder written by the classification script (2 steps on a tiny image folder)."""
    import run_classification

    root = tmp_path_factory.mktemp("publish")
    make_image_folder(root / "train", {"dark": 6, "bright": 6})
    torch.manual_seed(0)
    CMSAForImageClassification(tiny_config(num_labels=2)).save_pretrained(root / "tiny")
    run_classification.main([
        "--train_dir", str(root / "train"), "--model_name_or_path", str(root / "tiny"), "--output_dir",
        str(root / "out"), "--max_train_steps", "2", "--per_device_train_batch_size", "4", "--checkpointing_steps", "1",
    ])  # fmt: skip
    return root / "out"


def test_dry_run_lists_the_files_and_the_card(trained_folder, capsys):
    with mock.patch("huggingface_hub.HfApi.upload_folder") as upload_folder:
        main(["publish", str(trained_folder), "--repo-id", "me/tiny", "--dry-run"])
    upload_folder.assert_not_called()
    printed = capsys.readouterr().out
    assert "Would upload to me/tiny:" in printed and "  model.safetensors" in printed and "checkpoints/" not in printed
    metadata = json.loads(printed.split("Card metadata:\n", 1)[1])
    measured = json.loads((trained_folder / "all_results.json").read_text())
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == measured["eval_accuracy"]
    assert metadata["pipeline_tag"] == "image-classification"
    # The card was written naming the output folder; the dry run shows its snippets naming the repository.
    usage = printed.split("Card usage snippets, naming me/tiny:\n", 1)[1].split("Card metadata:", 1)[0]
    assert 'pipeline("image-classification", model="me/tiny")' in usage
    assert 'from_pretrained("me/tiny", trust_remote_code=True)' in usage
    assert metadata["model-index"][0]["name"] == "tiny"
    assert '"out"' in (trained_folder / "README.md").read_text()  # a dry run leaves the folder's card alone


def test_card_metadata_names_every_measured_metric_and_the_task(trained_folder):
    metadata = validate_folder(trained_folder)
    measured = json.loads((trained_folder / "all_results.json").read_text())
    (result,) = metadata["model-index"][0]["results"]
    assert result["task"] == {"type": "image-classification", "name": "Image Classification"}
    values = {metric["name"]: metric["value"] for metric in result["metrics"]}
    # 2 classes: top-5 accuracy (always 1) is measured but left out of the card
    assert values == {"top-1 accuracy": measured["eval_accuracy"], "cross-entropy loss": measured["eval_loss"]}
    assert "datasets" not in metadata  # a local image folder is no Hub data set


def test_upload_with_a_reparameterized_copy(trained_folder, tmp_path):
    folder = Path(shutil.copytree(trained_folder, tmp_path / "folder"))
    with (
        mock.patch("huggingface_hub.HfApi.create_repo", return_value="https://huggingface.co/me/tiny") as create_repo,
        mock.patch("huggingface_hub.HfApi.create_branch") as create_branch,
        mock.patch("huggingface_hub.HfApi.upload_folder") as upload_folder,
    ):
        summary = publish(folder, "me/tiny", private=True, revision="v1", add_reparameterized=True)
    assert create_repo.call_args.kwargs["private"] is True and create_branch.call_args.kwargs["branch"] == "v1"
    assert upload_folder.call_args.kwargs["revision"] == "v1"
    card = (folder / "README.md").read_text()
    assert '"me/tiny"' in card and '"out"' not in card and "\n# tiny\n" in card
    assert 'from_pretrained("me/tiny", subfolder="reparameterized"' not in card  # written before the copy was added
    assert "reparameterized/model.safetensors" in summary["files"]
    assert json.loads((folder / "reparameterized" / "config.json").read_text())["reparameterized"] is True


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "preprocessor_config.json").unlink(), "preprocessor_config.json is missing"),
        (lambda f: (f / "model.safetensors").write_bytes(b"garbage"), "corrupt or truncated"),
        (
            lambda f: (f / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.123456})),
            "is not a measured value",
        ),
    ],
)
def test_bad_folders_are_refused_before_any_upload(trained_folder, tmp_path, damage, message):
    folder = Path(shutil.copytree(trained_folder, tmp_path / "folder"))
    damage(folder)
    with mock.patch("huggingface_hub.HfApi.upload_folder") as upload_folder, pytest.raises((ValueError, OSError), match=message):
        publish(folder, "me/tiny")
    upload_folder.assert_not_called()


def test_validate_returns_the_card_metadata(trained_folder):
    assert {"cmsa", "low-resolution"} <= set(validate_folder(trained_folder)["tags"])


def _snapshot(folder: Path) -> dict:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_dry_run_writes_nothing_into_the_folder(trained_folder, tmp_path, capsys):
    folder = Path(shutil.copytree(trained_folder, tmp_path / "folder"))
    before = _snapshot(folder)
    with mock.patch("huggingface_hub.HfApi.upload_folder") as upload_folder:
        main(["publish", str(folder), "--repo-id", "me/tiny", "--dry-run", "--add-reparameterized"])
    upload_folder.assert_not_called()
    assert _snapshot(folder) == before and not (folder / "reparameterized").exists()
    printed = capsys.readouterr().out
    assert "  reparameterized/model.safetensors" in printed and "  reparameterized/config.json" in printed


def _with_card_metadata(folder: Path, change):
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    metadata = card.data.to_dict()
    change(metadata)
    card.data = type(card.data)(**metadata)
    card.save(folder / "README.md")


def _card_metrics(metadata) -> list[dict]:
    return metadata["model-index"][0]["results"][0]["metrics"]


def _swap_in_top5(folder: Path):
    """all_results.json gets a top-5 entry holding the card's top-1 value, and a different top-1."""
    results = json.loads((folder / "all_results.json").read_text())
    results["eval_top5_accuracy"], results["eval_accuracy"] = results["eval_accuracy"], results["eval_accuracy"] / 2 + 0.01
    (folder / "all_results.json").write_text(json.dumps(results))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_swap_in_top5, r"The card's top-1 accuracy = [\d.]+ is not a measured value: .*all_results.json has eval_accuracy = "),
        (
            lambda f: _with_card_metadata(f, lambda m: m.pop("model-index")),
            r"README.md has no model-index: the card of a trained folder must report its measured results \(eval_accuracy",
        ),
        (
            lambda f: _with_card_metadata(f, lambda m: _card_metrics(m)[0].update(type="f1", name="F1")),
            r"The card's metric 'F1' \(type 'f1'\) matches no result of .*all_results.json",
        ),
    ],
    ids=["value-of-another-metric", "no-model-index", "unknown-metric"],
)
def test_the_card_is_matched_metric_by_metric_to_the_results(trained_folder, tmp_path, damage, message):
    folder = Path(shutil.copytree(trained_folder, tmp_path / "folder"))
    damage(folder)
    with mock.patch("huggingface_hub.HfApi.upload_folder") as upload_folder, pytest.raises(ValueError, match=message):
        publish(folder, "me/tiny")
    upload_folder.assert_not_called()
