import json
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from cmsa_hf.training import CheckpointManager, make_optimizer_and_scheduler, parse_checkpointing_steps


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    manager = CheckpointManager(accelerator, tmp_path, total_limit=2)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(step)
        manager.save(f"step_{step}", {"completed_steps": step, "epoch": 0, "batches_in_epoch": step})
    (tmp_path / "checkpoints" / "step_4.tmp").mkdir()  # a save interrupted by a crash
    assert [p.name for p in manager.complete()] == ["step_2", "step_3"]
    latest = manager.resolve("latest")
    assert latest.name == "step_3"
    with torch.no_grad():
        model.weight.zero_()
    assert manager.load(latest)["completed_steps"] == 3
    assert torch.all(model.weight == 3)
    with pytest.raises(FileNotFoundError, match="not a complete cmsa_hf checkpoint"):
        manager.resolve(str(tmp_path))


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
