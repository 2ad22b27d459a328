"""The task runner's own flags on tiny head-pose runs: --time_budget_s (stops at the first step past the budget,
still evaluates and saves, resumes exactly) and --torch_compile (training through the compiled module)."""

import json
from unittest import mock

import pytest
import torch
from conftest import head_pose_args
from safetensors.torch import load_file

from cmsa_hf.tasks import HeadPoseTask, Task, parse_args, run


def run_args(faces, model, output_dir, *extra):
    return head_pose_args(faces, model, output_dir, "--max_train_steps", "4", "--seed", "2", "--flip_test", *extra)


def test_a_zero_time_budget_stops_after_the_first_step_and_resumes_exactly(faces, tiny_head_pose_model, tmp_path):
    full = run(HeadPoseTask(), run_args(faces, tiny_head_pose_model, tmp_path / "full"))
    assert full["train_steps"] == 4 and "train_stopped_by_time_budget" not in full  # outputs unchanged without it

    stopped_dir = tmp_path / "stopped"
    stopped = run(HeadPoseTask(), run_args(faces, tiny_head_pose_model, stopped_dir, "--time_budget_s", "0", "--checkpointing_steps", "100"))
    assert stopped["train_steps"] == 1 and stopped["train_stopped_by_time_budget"] is True
    assert json.loads((stopped_dir / "all_results.json").read_text()) == stopped  # evaluated and saved all the same
    assert (stopped_dir / "model.safetensors").is_file() and stopped["eval_samples"] == 3
    assert [p.name for p in (stopped_dir / "checkpoints").iterdir()] == ["step_1"]  # the exact position, to resume

    # The resumed run counts its own time only: a fresh budget lets it finish, on the uninterrupted weights.
    resumed = run(
        HeadPoseTask(),
        run_args(faces, tiny_head_pose_model, stopped_dir, "--time_budget_s", "3600", "--resume_from_checkpoint", "latest"),
    )
    assert resumed["train_steps"] == 4 and resumed["train_stopped_by_time_budget"] is False
    expected, actual = load_file(tmp_path / "full" / "model.safetensors"), load_file(stopped_dir / "model.safetensors")
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


def test_torch_compile_trains_through_the_compiled_module(faces, tiny_head_pose_model, tmp_path):
    """Compiled with dynamo's eager backend (inductor's code generation takes minutes on a CPU); the training steps
    run through the compiled module, the evaluation through the plain one, and the weights match an eager run."""
    compile_ = torch.compile
    compiled = []

    def eager_backend_compile(model):
        compiled.append(compile_(model, backend="eager"))
        return compiled[-1]

    eager = run(HeadPoseTask(), run_args(faces, tiny_head_pose_model, tmp_path / "eager", "--max_train_steps", "2"))
    with mock.patch("torch.compile", side_effect=eager_backend_compile) as patched:
        results = run(HeadPoseTask(), run_args(faces, tiny_head_pose_model, tmp_path / "compiled", "--max_train_steps", "2", "--torch_compile"))
    patched.assert_called_once()
    assert results["train_steps"] == 2 and results["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    expected, actual = load_file(tmp_path / "eager" / "model.safetensors"), load_file(tmp_path / "compiled" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6)


def test_a_recipe_key_that_no_flag_takes_is_an_error(tmp_path):
    class Misspelt(HeadPoseTask):
        recipe = {**HeadPoseTask.recipe, "learnig_rate": 1e-3}

    with pytest.raises(ValueError, match=r"Misspelt.recipe sets \['learnig_rate'\], which no flag takes"):
        parse_args(Misspelt(), ["--train_data", "x", "--validation_split_size", "1", "--output_dir", str(tmp_path)])


def test_the_task_recipe_gives_the_defaults_and_flags_override_them(tmp_path):
    common = ["--train_data", "x", "--validation_split_size", "1", "--output_dir", str(tmp_path)]
    args = parse_args(HeadPoseTask(), common)
    assert tuple(args.image_size) == (32, 32) and args.per_device_train_batch_size == 96
    assert args.weight_decay == Task.recipe["weight_decay"] and args.scale_factor == HeadPoseTask.recipe["scale_factor"]
    assert parse_args(HeadPoseTask(), [*common, "--learning_rate", "0.1"]).learning_rate == 0.1
    assert not hasattr(args, "eval_before_training")  # only tasks that offer it take the flag
