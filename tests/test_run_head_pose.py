"""The Accelerate head-pose script on a tiny AFLW2000-layout folder: MAE against the training-mean baseline, the
Hub-ready folder and card, resume; and the head-pose training transform."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, head_pose_args, launch_two_processes, make_aflw2000, tiny_config
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from cmsa_hf import CMSAForHeadPoseEstimation, CMSAImageProcessor
from cmsa_hf.data.head_pose import load_aflw2000
from cmsa_hf.data.transforms import HeadPoseTransform
from cmsa_hf.tasks import HeadPoseTask, parse_args
from cmsa_hf.tasks.head_pose import fit_splits, read_splits


SCRIPT = REPO_ROOT / "examples" / "head-pose" / "run_head_pose.py"
sys.path.insert(0, str(SCRIPT.parent))
import run_head_pose  # noqa: E402


def test_hub_ready_folder_and_card_hold_the_mae(faces, tiny_head_pose_model, tmp_path):
    results = run_head_pose.main(head_pose_args(faces, tiny_head_pose_model, tmp_path, "--max_train_steps", "2", "--flip_test"))
    measured = json.loads((tmp_path / "all_results.json").read_text())
    assert measured == json.loads(json.dumps(results))
    assert measured["eval_samples"] == 3 and measured["train_samples"] == 5
    assert measured["eval_mae"] == pytest.approx(np.mean([measured[f"eval_mae_{a}"] for a in ("yaw", "pitch", "roll")]), abs=1e-3)
    assert measured["eval_mae_training_mean_baseline"] > 0

    card = ModelCard.load(tmp_path / "README.md")
    metadata = card.data.to_dict()
    assert {"cmsa", "low-resolution", "head-pose-estimation"} <= set(metadata["tags"])
    assert "datasets" not in metadata and metadata["metrics"] == ["mae"]  # local files: no Hub data set to link
    assert metadata["model-index"][0]["results"][0]["dataset"]["name"] == "AFLW2000-3D"
    values = {m["type"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert values["mae"] == measured["eval_mae"] and values["mae_yaw"] == measured["eval_mae_yaw"]
    assert f"| yaw MAE | {measured['eval_mae_yaw']} |" in card.text and "with flip test" in card.text
    assert "eval_mirror_opposite_sign_yaw" not in measured and "mirrored faces" not in card.text  # 1 by construction
    assert isinstance(CMSAForHeadPoseEstimation.from_pretrained(tmp_path), CMSAForHeadPoseEstimation)


def test_resume_gives_the_same_weights(faces, tiny_head_pose_model, tmp_path):
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--seed", "5"]
    run_head_pose.main(head_pose_args(faces, tiny_head_pose_model, tmp_path / "full", *common))
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_2", partial / "checkpoints" / "step_2")
    run_head_pose.main(head_pose_args(faces, tiny_head_pose_model, partial, *common, "--resume_from_checkpoint", "latest"))
    expected, actual = load_file(tmp_path / "full" / "model.safetensors"), load_file(partial / "model.safetensors")
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


@pytest.mark.parametrize("head", ["binned", "ssr"])
def test_two_processes_train_and_count_every_face_once(faces, tmp_path, head):
    """Every weight gets a gradient (DDP refuses unused parameters), and evaluation counts each face once."""
    folder = tmp_path / "model"
    torch.manual_seed(0)
    CMSAForHeadPoseEstimation(tiny_config(head_pose_head=head)).save_pretrained(folder)
    launch_two_processes(SCRIPT, head_pose_args(faces, folder, tmp_path / "out", "--max_train_steps", "2"))
    measured = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert measured["eval_samples"] == 3
    assert {"eval_mirror_opposite_sign_yaw", "eval_mirror_opposite_sign_roll"} <= measured.keys()
    assert "mirrored faces whose predicted yaw / roll" in (tmp_path / "out" / "README.md").read_text()


def test_a_new_model_takes_the_chosen_head(faces, tmp_path):
    args = head_pose_args(faces, "unused", tmp_path, "--max_train_steps", "1", "--head", "ssr", "--variant", "cmsa-s")
    args[args.index("--model_name_or_path") : args.index("--model_name_or_path") + 2] = []
    args[args.index("--image_size") + 1 : args.index("--image_size") + 3] = ["32", "32"]
    run_head_pose.main(args)
    assert json.loads((tmp_path / "config.json").read_text())["head_pose_head"] == "ssr"


def test_validation_is_required(faces, tmp_path):
    with pytest.raises(SystemExit):
        parse_args(HeadPoseTask(), ["--train_data", str(faces), "--output_dir", str(tmp_path)])


# ------------------------------------------------------------------------------------ transform


def test_flipped_faces_negate_yaw_and_roll(faces):
    rows = load_aflw2000(faces)
    rows = rows.add_column("sample_index", list(range(len(rows))))
    processor = CMSAImageProcessor(size={"height": 16, "width": 16}, box_padding=1.0)
    plain = rows.with_transform(HeadPoseTransform(processor))[:8]
    torch.testing.assert_close(plain["labels"], torch.tensor(rows["angles"]))
    always = HeadPoseTransform(processor, train=True, flip_probability=1.0, scale_factor=0.0, shift_factor=0.0)
    flipped = rows.with_transform(always)[:8]
    torch.testing.assert_close(flipped["labels"], plain["labels"] * torch.tensor([-1.0, 1.0, -1.0]))
    torch.testing.assert_close(flipped["pixel_values"], plain["pixel_values"].flip(-1), atol=1e-5, rtol=0)


def test_training_faces_beyond_the_bins_are_dropped(tmp_path, capsys):
    """The model refuses labels beyond +-99 degrees, so the script drops such training faces (300W-LP has some)."""
    import scipy.io

    faces = make_aflw2000(tmp_path / "faces", count=6)
    mat = scipy.io.loadmat(faces / "image00002.mat")
    mat["Pose_Para"][0, 1] = np.radians(120.0)  # yaw
    scipy.io.savemat(faces / "image00002.mat", {"Pose_Para": mat["Pose_Para"], "pt2d": mat["pt2d"]})
    args = parse_args(
        HeadPoseTask(),
        ["--train_data", str(faces), "--train_format", "300w_lp", "--validation_data", str(faces),
         "--validation_format", "aflw2000", "--output_dir", str(tmp_path)],  # fmt: skip
    )
    splits = fit_splits(read_splits(args), args, max_angle=99.0)
    kept = np.asarray(splits["train"]["angles"])
    assert len(kept) == 5 and np.abs(kept).max() <= 99.0 and "image00002" not in splits["train"]["name"]
    assert splits["train"]["sample_index"] == list(range(5))
    assert "Dropping 1 training faces with an angle beyond +-99 degrees" in capsys.readouterr().out
