"""The `cmsa-hf` command: `train TASK` and `finetune` hand the rest of the line to the task's parser (its `--help`,
its runs), a missing extra stops the command at once naming it; `publish` and `convert` are covered by their own
tests (test_publish.py, test_convert_cmsa_original_to_hf.py)."""

import json
import sys

import pytest
from conftest import head_pose_args

from cmsa_hf.cli import TRAINING_TASKS, main


TASK_FLAGS = {
    "image-classification": "--dataset_name",
    "keypoint-detection": "--train_annotation_file",
    "head-pose": "--train_format",
}


@pytest.mark.parametrize("task", TRAINING_TASKS)
def test_train_task_help_lists_the_task_and_common_flags(task, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", task, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith(f"usage: cmsa-hf train {task} ")
    assert TASK_FLAGS[task] in help_text and "--output_dir" in help_text and "--model_name_or_path" in help_text


def test_finetune_help_lists_the_trainer_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "image-classification", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: cmsa-hf finetune image-classification ")
    assert "--model_name_or_path" in help_text and "--eval_strategy" in help_text


def test_an_unknown_task_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "segmentation", "--output_dir", "x"])
    assert exit_info.value.code == 2 and "invalid choice: 'segmentation'" in capsys.readouterr().err


def test_train_head_pose_writes_the_hub_ready_folder(faces, tiny_head_pose_model, tmp_path):
    main(["train", "head-pose", *head_pose_args(faces, tiny_head_pose_model, tmp_path, "--max_train_steps", "2")])
    assert json.loads((tmp_path / "all_results.json").read_text())["train_steps"] == 2
    assert (tmp_path / "model.safetensors").is_file() and "model-index" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_a_missing_train_extra_stops_the_command_naming_it(command, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # `import accelerate` now fails as if not installed
    with pytest.raises(SystemExit) as exit_info:
        main([command, "image-classification", "--dataset_name", "digits", "--output_dir", str(tmp_path)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert f"cmsa-hf {command} needs the `train` extra" in error and "accelerate" in error
    assert "pip install 'cmsa_hf[train]'" in error
    assert not any(tmp_path.iterdir())
