"""The Accelerate classification script, end to end on tiny data: exact resume after SIGKILL, two processes,
the Hub-ready folder and its card, publishing (HfApi patched), bad data."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, launch_two_processes, tiny_config
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from cmsa_hf import CMSAForImageClassification
from cmsa_hf.tasks import ImageClassificationTask, parse_args


SCRIPT = REPO_ROOT / "examples" / "image-classification" / "run_classification.py"
sys.path.insert(0, str(SCRIPT.parent))
import run_classification  # noqa: E402


def make_image_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """An imagefolder layout: root/<class>/<n>.png, classes told apart by brightness."""
    rng = np.random.default_rng(seed)
    for index, (name, count) in enumerate(sorted(per_class.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(count):
            level = 60 + 120 * index + rng.integers(-20, 20)
            pixels = np.clip(level + rng.integers(-30, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{n}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_image_folder(root / "train", {"dark": 8, "bright": 8})
    make_image_folder(root / "validation", {"dark": 4, "bright": 3}, seed=1)  # 7: odd on purpose
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    CMSAForImageClassification(tiny_config(num_labels=2)).save_pretrained(folder)
    return folder


def script_args(data, tiny_model, output_dir, *extra):
    return [
        "--train_dir", str(data / "train"), "--validation_dir", str(data / "validation"),
        "--model_name_or_path", str(tiny_model), "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "2", "--learning_rate", "1e-3",
        "--num_warmup_steps", "2", "--seed", "0", *extra,
    ]  # fmt: skip


def run_script(args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, **kwargs)


RESUMABLE = ["--max_train_steps", "12", "--checkpointing_steps", "1", "--checkpoints_total_limit", "3"]


@pytest.fixture(scope="module")
def uninterrupted(data, tiny_model, tmp_path_factory):
    """The output folder of an uninterrupted 12-step run, checkpointed every step (steps 10-12 kept)."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    reference = run_script(script_args(data, tiny_model, output_dir, *RESUMABLE), timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    return output_dir


def test_kill_and_resume_gives_the_same_weights(data, tiny_model, uninterrupted, tmp_path):
    common = RESUMABLE
    killed_dir = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *script_args(data, tiny_model, killed_dir, *common)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 300
    while not (killed_dir / "checkpoints" / "step_3").is_dir():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed_dir / "model.safetensors").exists(), "the run had already finished"

    resumed = run_script(script_args(data, tiny_model, killed_dir, *common, "--resume_from_checkpoint", "latest"), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout
    assert_same_weights(killed_dir, uninterrupted)
    assert len(list((killed_dir / "checkpoints").iterdir())) <= 3


def assert_same_weights(output_dir, reference_dir):
    expected = load_file(reference_dir / "model.safetensors")
    actual = load_file(output_dir / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_resume_skips_damaged_checkpoints_and_stays_exact(data, tiny_model, uninterrupted, tmp_path):
    """An unreadable training_state.json in the newest checkpoint and a truncated model.safetensors in the one
    before: 'latest' warns naming both files, resumes from step 10 and still ends on the uninterrupted weights."""
    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "step_12" / "training_state.json").write_text('{"completed_st')
    truncated = tmp_path / "checkpoints" / "step_11" / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    resumed = run_script(script_args(data, tiny_model, tmp_path, *RESUMABLE, "--resume_from_checkpoint", "latest"), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for step, file in ((12, "training_state.json"), (11, "model.safetensors")):
        damaged = tmp_path / "checkpoints" / f"step_{step}" / file
        assert f"Skipping the damaged checkpoint step_{step}: {damaged}" in resumed.stderr
    assert f"Resumed from {tmp_path / 'checkpoints' / 'step_10'} at step 10" in resumed.stdout
    assert_same_weights(tmp_path, uninterrupted)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_10", "step_11", "step_12"]

    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):  # the same command without the resume
        run_classification.main(script_args(data, tiny_model, tmp_path, *RESUMABLE))


def test_a_new_run_into_another_runs_checkpoints_refuses_or_overwrites(data, tiny_model, uninterrupted, tmp_path):
    """The issue's case: a new 2-step run into a folder with a 12-step run's checkpoints. It stops before training
    with a message naming the folder; with --overwrite_output_dir 'latest' is the new run's step_2."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(uninterrupted / "checkpoints", folder)
    new_run = script_args(data, tiny_model, tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "1", "--seed", "1")
    refusal = rf"{folder} already holds the checkpoints of another run \(step_10, step_11, step_12\)"
    with pytest.raises(FileExistsError, match=refusal):
        run_classification.main(new_run)
    assert sorted(p.name for p in folder.iterdir()) == ["step_10", "step_11", "step_12"]

    run_classification.main([*new_run, "--overwrite_output_dir"])
    assert sorted(p.name for p in folder.iterdir()) == ["step_1", "step_2"]
    state = json.loads((folder / "step_2" / "training_state.json").read_text())
    assert state["completed_steps"] == 2
    final, checkpointed = load_file(tmp_path / "model.safetensors"), load_file(folder / "step_2" / "model.safetensors")
    assert all(torch.equal(final[name], checkpointed[name]) for name in final)


def test_two_processes_count_every_eval_sample_once(data, tiny_model, tmp_path):
    launch_two_processes(SCRIPT, script_args(data, tiny_model, tmp_path, "--max_train_steps", "2"))
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert results["eval_samples"] == 7
    assert (tmp_path / "model.safetensors").exists()


def test_hub_ready_folder_and_card(data, tiny_model, tmp_path):
    results = run_classification.main(
        script_args(data, tiny_model, tmp_path, "--max_train_steps", "2", "--reparameterize_on_save")
    )
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "all_results.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "reparameterized" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "reparameterized" / "config.json").read_text())["reparameterized"] is True
    measured = json.loads((tmp_path / "all_results.json").read_text())
    assert measured == json.loads(json.dumps(results))

    card = ModelCard.load(tmp_path / "README.md")
    metadata = card.data.to_dict()
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-classification"
    assert "datasets" not in metadata and metadata["metrics"] == ["accuracy"]  # a local folder links no Hub data set
    assert {"cmsa", "low-resolution"} <= set(metadata["tags"])
    entry = metadata["model-index"][0]["results"][0]
    assert entry["metrics"][0]["value"] == measured["eval_accuracy"]
    assert f"| top-1 accuracy | {measured['eval_accuracy']} |" in card.text
    assert "learning rate" in card.text and "trust_remote_code=True" in card.text


def test_push_to_hub_uploads_the_folder(data, tiny_model, tmp_path):
    uploaded = {}

    def fake_upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        uploaded.update(kwargs, files=sorted(p.name for p in folder.iterdir()))

    with (
        mock.patch("huggingface_hub.HfApi.create_repo", return_value="https://huggingface.co/me/tiny") as create_repo,
        mock.patch("huggingface_hub.HfApi.upload_folder", fake_upload_folder),
    ):
        run_classification.main(
            script_args(
                data, tiny_model, tmp_path, "--max_train_steps", "1", "--checkpointing_steps", "1",
                "--push_to_hub", "--hub_model_id", "me/tiny", "--hub_private_repo",
            )
        )  # fmt: skip
    create_repo.assert_called_once()
    assert create_repo.call_args.args[0] == "me/tiny" and create_repo.call_args.kwargs["private"] is True
    assert uploaded["repo_id"] == "me/tiny" and Path(uploaded["folder_path"]) == tmp_path
    assert {"model.safetensors", "config.json", "README.md", "all_results.json"} <= set(uploaded["files"])
    assert "checkpoints/**" in uploaded["ignore_patterns"]


def test_augment_on_device_with_the_per_image_augmentations_off_trains_as_the_per_image_path(data, tiny_model, tmp_path):
    """Decoded once, normalized on the device: the same pixels, the same mixup / cutmix and drop-path draws (the
    device augmentation draws nothing when off), so the same losses and weights as the per-image path."""
    off = ["--max_train_steps", "4", "--crop_padding", "0", "--hflip_probability", "0", "--random_erasing_probability", "0"]
    per_image = run_classification.main(script_args(data, tiny_model, tmp_path / "per_image", *off))
    on_device = run_classification.main(script_args(data, tiny_model, tmp_path / "on_device", *off, "--augment_on_device"))
    assert on_device["train_loss"] == pytest.approx(per_image["train_loss"], rel=1e-5)
    assert on_device["eval_accuracy"] == per_image["eval_accuracy"] and on_device["eval_samples"] == 7
    assert "batched on the training device" in (tmp_path / "on_device" / "README.md").read_text()
    assert "batched on the training device" not in (tmp_path / "per_image" / "README.md").read_text()
    assert on_device["eval_loss"] == pytest.approx(per_image["eval_loss"], abs=1e-4)
    expected = load_file(tmp_path / "per_image" / "model.safetensors")
    actual = load_file(tmp_path / "on_device" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6)


def test_augment_on_device_trains_with_the_recipe_and_resumes_exactly(data, tiny_model, tmp_path):
    """With crop, flip and erasing on the device: a run stopped after 1 of 4 steps and resumed ends on the weights
    of the uninterrupted run (the draws come from the generators that Accelerate checkpoints)."""
    on = ["--augment_on_device", "--max_train_steps", "4", "--checkpointing_steps", "1"]
    full = run_classification.main(script_args(data, tiny_model, tmp_path / "full", *on))
    assert full["train_steps"] == 4
    stopped = run_classification.main(script_args(data, tiny_model, tmp_path / "stopped", *on, "--time_budget_s", "0"))
    assert stopped["train_steps"] == 1
    resumed = run_classification.main(
        script_args(data, tiny_model, tmp_path / "stopped", *on, "--resume_from_checkpoint", "latest")
    )
    assert resumed["train_steps"] == 4
    assert_same_weights(tmp_path / "stopped", tmp_path / "full")


def load_and_prepare(argv):
    """The validated splits and label names that the classification task trains on."""
    task = ImageClassificationTask()
    splits = task.load_data(parse_args(task, argv))
    return splits, task.label_names


def test_digits_loads_offline():
    splits, _ = load_and_prepare(["--dataset_name", "digits", "--output_dir", "x"])
    assert len(splits["train"]) + len(splits["validation"]) == 1797
    assert splits["train"].features["label"].names[:3] == ["0", "1", "2"]


def test_zip_archives_load(data, tmp_path):
    import shutil

    archive = shutil.make_archive(str(tmp_path / "train"), "zip", data / "train")
    splits, names = load_and_prepare(["--train_dir", archive, "--output_dir", str(tmp_path / "out")])
    assert names == ["bright", "dark"]
    assert len(splits["train"]) + len(splits["validation"]) == 16  # validation carved from train


# --------------------------------------------------------------------------------------------- bad data


def _prepare(data_root, *extra):
    return load_and_prepare(
        ["--train_dir", str(data_root / "train"), "--validation_dir", str(data_root / "validation"), "--output_dir", "x", *extra]
    )


def test_corrupt_image_names_its_row(data, tmp_path):
    import shutil

    shutil.copytree(data, tmp_path / "d")
    (tmp_path / "d" / "validation" / "dark" / "1.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"Split 'validation', row \d+: the image cannot be decoded \(1 unreadable"):
        _prepare(tmp_path / "d")
    splits, _ = _prepare(tmp_path / "d", "--skip_corrupt_images")
    assert len(splits["validation"]) == 6


def test_missing_column_lists_the_available_ones(data):
    with pytest.raises(ValueError, match=r"no column 'category'; available columns: image, label"):
        _prepare(data, "--label_column_name", "category")


def test_label_outside_num_labels_names_the_row():
    import datasets

    from cmsa_hf.data.validation import check_labels

    dataset = datasets.Dataset.from_dict({"label": [0, 1, 5, 1]})
    with pytest.raises(ValueError, match=r"Split 'train', row 2: label 5 is outside \[0, 2\)"):
        check_labels(dataset, "label", 2, "train")


def test_empty_split_is_named(data):
    with pytest.raises(ValueError, match="Split 'validation' is empty"):
        _prepare(data, "--max_eval_samples", "0")


def test_trainer_fine_tuning_script(data, tiny_model, tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    import run_trainer

    metrics = run_trainer.main([
        "--model_name_or_path", str(tiny_model), "--train_dir", str(data / "train"),
        "--validation_dir", str(data / "validation"), "--output_dir", str(tmp_path), "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu",
    ])  # fmt: skip
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["train_runtime"] > 0
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "preprocessor_config.json").is_file()
    reloaded = CMSAForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config.id2label == {0: "bright", 1: "dark"}
    # The same Hub-ready folder as the Accelerate script's: it passes the publish check.
    from cmsa_hf.publish import publish

    summary = publish(tmp_path, "me/finetuned", dry_run=True)
    assert summary["card"]["model-index"][0]["results"][0]["metrics"][0]["value"] == metrics["eval_accuracy"]
    assert any('model="me/finetuned"' in line for line in summary["usage"])
    assert "cmsa-hf finetune image-classification (transformers Trainer)" in (tmp_path / "README.md").read_text()


def test_trainer_script_takes_the_embedded_digits(tiny_model, tmp_path):
    import run_trainer

    metrics = run_trainer.main([
        "--model_name_or_path", str(tiny_model), "--dataset_name", "digits", "--output_dir", str(tmp_path),
        "--max_steps", "2", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "64",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu",
    ])  # fmt: skip
    assert metrics["eval_samples"] == 360 and metrics["train_samples"] == 1437
    assert CMSAForImageClassification.from_pretrained(tmp_path).config.num_labels == 10
