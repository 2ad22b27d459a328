import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from conftest import REPO_ROOT

from cmsa_hf.training import CheckpointManager, make_optimizer_and_scheduler, parse_checkpointing_steps, prepare_output_dir


def make_manager(output_dir, total_limit=2):
    """A CheckpointManager over a tiny prepared Linear whose weights say which step saved them."""
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    return CheckpointManager(accelerator, output_dir, total_limit=total_limit), model


def save_steps(manager, model, *steps):
    for step in steps:
        with torch.no_grad():
            model.weight.fill_(step)
        manager.save(f"step_{step}", {"completed_steps": step, "epoch": 0, "batches_in_epoch": step})


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    manager, model = make_manager(tmp_path)
    save_steps(manager, model, 1, 2, 3)
    (tmp_path / "checkpoints" / "step_4.tmp").mkdir()  # a save interrupted by a crash
    assert [p.name for p in manager.complete()] == ["step_2", "step_3"]
    manifest = json.loads((tmp_path / "checkpoints" / "step_3" / CheckpointManager.MANIFEST).read_text())
    assert manifest["sequence"] == 3
    weights = tmp_path / "checkpoints" / "step_3" / "model.safetensors"
    assert manifest["files"]["model.safetensors"]["size"] == weights.stat().st_size
    assert {"training_state.json", "random_states_0.pkl"} <= set(manifest["files"])
    latest = manager.resolve("latest")
    assert latest.name == "step_3"
    with torch.no_grad():
        model.weight.zero_()
    assert manager.load(latest)["completed_steps"] == 3
    assert torch.all(model.weight == 3)
    with pytest.raises(ValueError, match=f"not a complete cmsa_hf checkpoint: {tmp_path}/checkpoint_manifest.json is missing"):
        manager.resolve(str(tmp_path))
    with pytest.raises(ValueError, match="--checkpoints_total_limit must be at least 1"):
        CheckpointManager(manager.accelerator, tmp_path, total_limit=0)


def run_args(output_dir, resume=None, overwrite=False):
    return SimpleNamespace(output_dir=str(output_dir), resume_from_checkpoint=resume, overwrite_output_dir=overwrite)


def test_a_new_run_refuses_another_runs_checkpoints(tmp_path):
    """Item 1: checkpoints of one run only: a new run stops, or with --overwrite_output_dir deletes them first."""
    manager, model = make_manager(tmp_path)
    save_steps(manager, model, 7, 8)
    folder = tmp_path / "checkpoints"
    with pytest.raises(FileExistsError, match=rf"{folder} already holds the checkpoints of another run \(step_7, step_8\)"):
        prepare_output_dir(manager.accelerator, run_args(tmp_path))
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):  # resuming another folder's checkpoint
        prepare_output_dir(manager.accelerator, run_args(tmp_path, resume=str(tmp_path / "elsewhere" / "step_3")))
    with pytest.raises(ValueError, match="pass one of the two"):
        prepare_output_dir(manager.accelerator, run_args(tmp_path, resume="latest", overwrite=True))
    prepare_output_dir(manager.accelerator, run_args(tmp_path, resume="latest"))  # continuing is the point
    prepare_output_dir(manager.accelerator, run_args(tmp_path, resume=str(folder / "step_7")))
    assert [p.name for p in manager.complete()] == ["step_7", "step_8"]

    prepare_output_dir(manager.accelerator, run_args(tmp_path, overwrite=True))
    assert not folder.exists()
    save_steps(manager, model, 1)
    assert manager.resolve("latest") == folder / "step_1"  # not the old run's step_8


def damage(path: Path, how: str):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "unreadable":
        path.write_text("{not json")
    else:  # same size, other bytes: only the sha256 tells
        path.write_bytes(bytes(len(path.read_bytes())))


@pytest.mark.parametrize(
    ("file", "how"),
    [("model.safetensors", "truncated"), ("training_state.json", "unreadable"), ("training_state.json", "overwritten")],
)
def test_a_damaged_newest_checkpoint_is_named_and_skipped(tmp_path, caplog, file, how):
    """Item 2: the error and the warning name the file; 'latest' falls back to the newest complete checkpoint; the
    next saves succeed and replace the damaged one."""
    manager, model = make_manager(tmp_path, total_limit=3)
    save_steps(manager, model, 1, 2)
    newest = tmp_path / "checkpoints" / "step_2"
    damage(newest / file, how)
    with pytest.raises(ValueError, match=rf"{newest} is not a complete cmsa_hf checkpoint: {newest / file} "):
        manager.resolve(str(newest))
    with caplog.at_level(logging.WARNING):
        latest = manager.resolve("latest")
    assert latest.name == "step_1"
    assert f"Skipping the damaged checkpoint step_2: {newest / file}" in caplog.text
    assert "resuming from step_1" in caplog.text
    assert manager.load(latest)["completed_steps"] == 1 and torch.all(model.weight == 1)

    save_steps(manager, model, 2, 3)  # the resumed run passes the damaged name again
    assert [p.name for p in manager.complete(check_contents=True)] == ["step_1", "step_2", "step_3"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1", "step_2", "step_3"]
    assert manager.load(manager.resolve(str(newest)))["completed_steps"] == 2 and torch.all(model.weight == 2)


def test_only_damaged_checkpoints_stop_the_resume(tmp_path):
    manager, model = make_manager(tmp_path)
    save_steps(manager, model, 1)
    damage(tmp_path / "checkpoints" / "step_1" / "model.safetensors", "truncated")
    with pytest.raises(ValueError, match=r"No complete checkpoint in .*step_1: .*model.safetensors has \d+ bytes"):
        manager.resolve("latest")


def test_rotation_never_deletes_the_only_complete_checkpoint(tmp_path):
    """Item 4: damaged checkpoints are neither counted nor deleted, however far along their step."""
    manager, model = make_manager(tmp_path, total_limit=4)
    save_steps(manager, model, 1, 2, 5, 6)
    for step in (5, 6):
        damage(tmp_path / "checkpoints" / f"step_{step}" / "model.safetensors", "truncated")
    manager = make_manager(tmp_path, total_limit=2)[0]
    assert manager.resolve("latest").name == "step_2"
    save_steps(manager, model, 3)
    assert [p.name for p in manager.complete()] == ["step_2", "step_3"]
    manager.total_limit = 1
    save_steps(manager, model, 4)
    assert [p.name for p in manager.complete()] == ["step_4"]
    assert sorted(p.name for p in manager.existing()) == ["step_4", "step_5", "step_6"]  # kept for inspection


KILLED_SAVE = """
import os, shutil, signal, sys, torch
from accelerate import Accelerator
from cmsa_hf import training

output_dir, kill_point, total_limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
accelerator = Accelerator(cpu=True)
model = accelerator.prepare(torch.nn.Linear(2, 2))
manager = training.CheckpointManager(accelerator, output_dir, total_limit=total_limit)
replace, rmtree = os.replace, shutil.rmtree

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

def replace_then_kill(source, target):  # just before the new checkpoint is renamed into place
    if str(source) == str(target) + ".tmp":
        kill()
    replace(source, target)

def rmtree_then_kill(path, *args, **kwargs):  # halfway through deleting a rotated checkpoint
    os.remove(os.path.join(path, "model.safetensors"))
    kill()

for step, name in [(1, "step_1"), (2, "step_2"), (20, sys.argv[4])]:
    if step == 20:
        if kill_point == "swap":
            training.os.replace = replace_then_kill
        elif kill_point == "rotation":
            training.shutil.rmtree = rmtree_then_kill
        elif kill_point == "manifest":
            training._sha256 = lambda path: kill()
    with torch.no_grad():
        model.weight.fill_(step)
    manager.save(name, {"completed_steps": step, "epoch": 0, "batches_in_epoch": step})
print("not killed")
"""


def run_killed_save(output_dir, kill_point: str, total_limit: int, name: str):
    """Save step_1, step_2, then `name` in a subprocess SIGKILLed at `kill_point` of that last save."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", KILLED_SAVE, str(output_dir), kill_point, str(total_limit), name]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr[-3000:]


def test_a_kill_mid_swap_keeps_the_checkpoint(tmp_path):
    """Item 3: a re-save of step_2 killed just before the new folder is renamed into place (the old one is aside)."""
    run_killed_save(tmp_path, "swap", total_limit=2, name="step_2")
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_1", "step_2.old", "step_2.tmp"]
    manager, model = make_manager(tmp_path)
    latest = manager.resolve("latest")
    assert latest == folder / "step_2" and sorted(p.name for p in folder.iterdir()) == ["step_1", "step_2"]
    assert manager.load(latest)["completed_steps"] == 2 and torch.all(model.weight == 2)
    save_steps(manager, model, 2)  # an uninterrupted re-save swaps and leaves nothing aside
    assert sorted(p.name for p in folder.iterdir()) == ["step_1", "step_2"]


@pytest.mark.parametrize("kill_point", ["manifest", "rotation"])
def test_a_kill_mid_save_or_rotation_keeps_a_complete_checkpoint(tmp_path, kill_point):
    """Killed before the new checkpoint's manifest is written, or halfway through deleting the one it rotates out
    (total limit 1): the newest complete checkpoint survives and the debris is never taken for one."""
    run_killed_save(tmp_path, kill_point, total_limit=1, name="step_3")
    manager, model = make_manager(tmp_path, total_limit=1)
    expected = "step_2" if kill_point == "manifest" else "step_3"
    assert [p.name for p in manager.existing()] == [expected]
    assert manager.load(manager.resolve("latest"))["completed_steps"] == (2 if kill_point == "manifest" else 20)
    save_steps(manager, model, 4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_4"]


def test_checkpointing_steps_parsing():
    assert parse_checkpointing_steps("epoch") == "epoch" and parse_checkpointing_steps("50") == 50
    with pytest.raises(ValueError, match="positive integer or 'epoch'"):
        parse_checkpointing_steps("often")


def test_schedule_warms_up_then_decays_to_the_floor():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    args = SimpleNamespace(
        weight_decay=0.05, learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, max_train_steps=None,
        num_train_epochs=10, num_warmup_steps=None, num_warmup_epochs=1, lr_scheduler_type="cosine_with_min_lr",
        min_learning_rate=1e-5,
    )  # fmt: skip
    optimizer, scheduler, total = make_optimizer_and_scheduler(model, args, steps_per_epoch=10)
    assert total == 100
    decays = {g["weight_decay"]: len(g["params"]) for g in optimizer.param_groups}
    assert decays == {0.05: 1, 0.0: 3}  # only the linear weight is decayed
    rates = []
    for _ in range(total):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0.0 and max(rates) == pytest.approx(1e-3) and rates.index(max(rates)) == 10
    assert rates[-1] == pytest.approx(1e-5, rel=0.1)
    assert json.dumps(scheduler.state_dict())  # serialisable: part of every checkpoint
