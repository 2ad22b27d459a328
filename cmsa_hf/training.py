"""The reusable training pieces behind `cmsa_hf.tasks.run`: the Accelerator and the training loader, crash-safe
checkpoints with exact resume, the optimizer and learning-rate schedule, and the training loop. They read the common
flags that `cmsa_hf.tasks.runner.add_common_arguments` defines.
"""

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from .modeling_cmsa import no_weight_decay_names


logger = get_logger(__name__)


def make_accelerator(args) -> Accelerator:
    """An Accelerator whose shuffling depends only on (seed, epoch), so a resumed run sees the same batches."""
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "runs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def make_train_dataloader(dataset, args, **kwargs) -> DataLoader:
    """A shuffling loader that never draws from torch's global generator (its own generator seeds the workers),
    so the global random state that Accelerate checkpoints is consumed by training steps alone: exact resumes."""
    return DataLoader(
        dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
        **kwargs,
    )


def parse_checkpointing_steps(value: str | None) -> int | str | None:
    if value is None or value == "epoch":
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise ValueError(f"--checkpointing_steps must be a positive integer or 'epoch', got {value!r}")


def make_optimizer_and_scheduler(model, args, steps_per_epoch: int):
    """AdamW (fused when the parameters are on a GPU) without weight decay on the parameters its modules exempt
    (`no_weight_decay_names`: biases, norms, attention biases); warm-up then the chosen schedule."""
    exempt, decay, no_decay = no_weight_decay_names(model), [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if name in exempt else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        fused=fused_adamw(model.parameters()),
    )
    total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    warmup = args.num_warmup_steps if args.num_warmup_steps is not None else round(args.num_warmup_epochs * steps_per_epoch)
    extra = {"min_lr": args.min_learning_rate} if args.lr_scheduler_type == "cosine_with_min_lr" else None
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=min(warmup, total_steps), num_training_steps=total_steps,
        scheduler_specific_kwargs=extra,
    )  # fmt: skip
    return optimizer, scheduler, total_steps


def fused_adamw(parameters) -> bool | None:
    """True (the fused CUDA kernel) when every parameter is on a GPU, else None (PyTorch's default choice)."""
    return True if all(parameter.is_cuda for parameter in parameters) else None


def prepare_output_dir(accelerator: Accelerator, args):
    """Create `output_dir` and keep its checkpoints to one run.

    A run that does not continue them (no `--resume_from_checkpoint`, or one outside `output_dir/checkpoints`)
    refuses to start beside another run's checkpoints; `--overwrite_output_dir` deletes them first."""
    checkpoints = CheckpointManager(accelerator, args.output_dir)
    resume = args.resume_from_checkpoint
    continues = resume == "latest" or (resume is not None and Path(resume).resolve().parent == checkpoints.folder.resolve())
    if continues and args.overwrite_output_dir:
        raise ValueError(
            f"--overwrite_output_dir would delete the checkpoints that --resume_from_checkpoint {resume} continues "
            f"from; pass one of the two"
        )
    existing = [] if continues else [path.name for path in checkpoints.existing()]
    if existing and not args.overwrite_output_dir:
        raise FileExistsError(
            f"{checkpoints.folder} already holds the checkpoints of another run ({', '.join(existing)}). Continue "
            f"that run with --resume_from_checkpoint latest, start over with --overwrite_output_dir (deletes them), "
            f"or choose another --output_dir"
        )
    accelerator.wait_for_everyone()  # every process has looked before the main one deletes
    if existing and accelerator.is_main_process:
        shutil.rmtree(checkpoints.folder)
        accelerator.print(f"--overwrite_output_dir: deleted the previous run's checkpoints ({', '.join(existing)})")
    accelerator.wait_for_everyone()
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CheckpointManager:
    """Resumable states in `output_dir/checkpoints/<name>`, of one run; a crash at any point keeps the previous one.

    A checkpoint is written to `<name>.tmp` and renamed into place once complete; its last file is a manifest of
    every file's size and sha256 and its write order (`sequence`), checked before use. Re-saving a name swaps
    atomically: the old folder is renamed to `<name>.old`, the new one into place, then the old one deleted (a crash
    between the renames is undone by the next save or resume). `latest` is the most recently written complete
    checkpoint: damaged ones are skipped with a warning naming the file. Rotation keeps the newest `total_limit`
    complete checkpoints; damaged ones are neither counted nor deleted (a save of the same name replaces them).
    """

    STATE_FILE = "training_state.json"
    MANIFEST = "checkpoint_manifest.json"
    PARTIAL, ASIDE = ".tmp", ".old"

    def __init__(self, accelerator: Accelerator, output_dir: str, total_limit: int | None = 2):
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"--checkpoints_total_limit must be at least 1 (complete checkpoints kept), got {total_limit}")
        self.accelerator = accelerator
        self.folder = Path(output_dir) / "checkpoints"
        self.total_limit = total_limit

    def existing(self) -> list[Path]:
        """Every checkpoint folder, complete or not (interrupted `.tmp` writes excluded)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_dir() and not p.name.endswith(self.PARTIAL))

    def problem(self, path: Path, check_contents: bool = True) -> str | None:
        """Why `path` is not a complete checkpoint, naming the file, or None. Without `check_contents` only the file
        sizes are compared with the manifest, not the sha256 sums."""
        manifest_file = path / self.MANIFEST
        if not manifest_file.is_file():
            return f"{manifest_file} is missing (the save did not finish, or this is no cmsa_hf checkpoint)"
        try:
            manifest = json.loads(manifest_file.read_text())
            files, sequence = dict(manifest["files"]), int(manifest["sequence"])
            if sequence < 1:
                raise ValueError(f"sequence {sequence}")
        except (ValueError, KeyError, TypeError) as error:
            return f"{manifest_file} is unreadable ({type(error).__name__}: {error})"
        for name, expected in files.items():
            file = path / name
            if not file.is_file():
                return f"{file} is missing"
            if file.stat().st_size != expected["size"]:
                return f"{file} has {file.stat().st_size} bytes, the manifest says {expected['size']} (truncated?)"
            if check_contents and _sha256(file) != expected["sha256"]:
                return f"{file} is not the file saved (its sha256 differs from the manifest's)"
        return None

    def _sequence(self, path: Path) -> int:
        return int(json.loads((path / self.MANIFEST).read_text())["sequence"])

    def complete(self, check_contents: bool = False) -> list[Path]:
        """The complete checkpoints, oldest first in write order."""
        return sorted((p for p in self.existing() if self.problem(p, check_contents) is None), key=self._sequence)

    def _tidy(self):
        """Main process: drop interrupted writes and finish (or undo) an interrupted swap."""
        for path in self.folder.glob(f"*{self.PARTIAL}"):
            shutil.rmtree(path, ignore_errors=True)
        for aside in self.folder.glob(f"*{self.ASIDE}"):
            final = aside.with_name(aside.name[: -len(self.ASIDE)])
            if final.exists():
                self._delete(aside)
            else:
                os.replace(aside, final)

    def _delete(self, path: Path):
        """Rename to `.tmp` first, so that a crash mid-deletion leaves nothing that looks like a checkpoint."""
        doomed = path.with_name(path.name + self.PARTIAL)
        os.replace(path, doomed)
        shutil.rmtree(doomed)

    def save(self, name: str, state: dict):
        final = self.folder / name
        partial, aside = final.with_name(name + self.PARTIAL), final.with_name(name + self.ASIDE)
        if self.accelerator.is_main_process and self.folder.is_dir():
            self._tidy()
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (partial / self.STATE_FILE).write_text(json.dumps(state))
            files = sorted(p for p in partial.rglob("*") if p.is_file())
            sequence = 1 + max(map(self._sequence, self.complete()), default=0)
            entries = {p.relative_to(partial).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
            (partial / self.MANIFEST).write_text(json.dumps({"sequence": sequence, "files": entries}, indent=1))
            if final.exists():
                os.replace(final, aside)
            os.replace(partial, final)
            if aside.exists():
                self._delete(aside)
            for old in self.complete()[: -self.total_limit] if self.total_limit else []:
                self._delete(old)
        self.accelerator.wait_for_everyone()

    def resolve(self, value: str) -> Path | None:
        """The checkpoint to resume from: `value` itself (an error naming the damaged file if it is not complete) or,
        for 'latest', the most recently written complete one, with a warning for each damaged one skipped (None when
        the folder holds no checkpoint; an error when it holds only damaged ones)."""
        if self.accelerator.is_main_process and self.folder.is_dir():
            self._tidy()
        self.accelerator.wait_for_everyone()
        if value != "latest":
            if (problem := self.problem(Path(value))) is not None:
                raise ValueError(f"{value} is not a complete cmsa_hf checkpoint: {problem}")
            return Path(value)
        problems = {path: self.problem(path) for path in self.existing()}
        damaged = [f"{path.name}: {problem}" for path, problem in problems.items() if problem is not None]
        complete = sorted((path for path, problem in problems.items() if problem is None), key=self._sequence)
        if damaged and not complete:
            raise ValueError(
                f"No complete checkpoint in {self.folder} to resume from ({'; '.join(damaged)}). Start over without "
                f"--resume_from_checkpoint, with --overwrite_output_dir"
            )
        for line in damaged:
            logger.warning(f"Skipping the damaged checkpoint {line}; resuming from {complete[-1].name} (newest complete)")
        return complete[-1] if complete else None

    def load(self, path: Path) -> dict:
        self.accelerator.load_state(str(path))
        return json.loads((path / self.STATE_FILE).read_text())


def _past_budget(accelerator: Accelerator, budget_s: float | None, started: float) -> bool:
    """Whether `budget_s` seconds have passed since `started` on any process (all processes stop at the same step)."""
    if budget_s is None:
        return False
    past = torch.tensor(float(time.perf_counter() - started >= budget_s), device=accelerator.device)
    return bool(accelerator.reduce(past, "sum").item())


def train_loop(
    accelerator: Accelerator,
    args,
    model,
    optimizer,
    scheduler,
    train_dataloader,
    total_steps: int,
    compute_loss: Callable[[dict], torch.Tensor],
    on_epoch_start: Callable[[int], None] | None = None,
    on_epoch_end: Callable[[int], dict] | None = None,
) -> dict:
    """Optimise until `total_steps` optimizer steps, or the first step after `args.time_budget_s` seconds of this
    run's training (a step checkpoint then saves the exact position when checkpointing is on), checkpointing and
    resuming exactly.

    `compute_loss(batch)` returns the loss of one batch (through `model` or a compiled form of it);
    `on_epoch_start(epoch)` re-seeds per-epoch augmentation; `on_epoch_end(epoch)` may evaluate and returns metrics
    to log. Returns training statistics.
    """
    checkpointing = parse_checkpointing_steps(args.checkpointing_steps)
    checkpoints = CheckpointManager(accelerator, args.output_dir, args.checkpoints_total_limit)
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    completed_steps, start_epoch, resume_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        path = checkpoints.resolve(args.resume_from_checkpoint)
        if path is not None:
            state = checkpoints.load(path)
            completed_steps, start_epoch, resume_batches = state["completed_steps"], state["epoch"], state["batches_in_epoch"]
            accelerator.print(f"Resumed from {path} at step {completed_steps} (epoch {start_epoch}, batch {resume_batches})")
        else:
            accelerator.print("No checkpoint to resume from: starting from scratch")

    if args.with_tracking:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(Path(args.output_dir).name, config)

    progress = tqdm(total=total_steps, initial=completed_steps, disable=not accelerator.is_local_main_process)
    started, last_epoch_loss, out_of_time = time.perf_counter(), float("nan"), False
    for epoch in range(start_epoch, num_epochs):
        model.train()
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        skipped = resume_batches if epoch == start_epoch else 0
        if skipped:
            batches = accelerator.skip_first_batches(train_dataloader, skipped)
        loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
        for batch_index, batch in enumerate(batches, start=skipped):
            with accelerator.accumulate(model):
                loss = compute_loss(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            loss_sum, loss_count = loss_sum + loss.detach(), loss_count + 1
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch)
            if args.with_tracking:
                accelerator.log({"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0]}, step=completed_steps)
            out_of_time = completed_steps < total_steps and _past_budget(accelerator, args.time_budget_s, started)
            if (isinstance(checkpointing, int) and completed_steps % checkpointing == 0) or (out_of_time and checkpointing):
                state = {"completed_steps": completed_steps, "epoch": epoch, "batches_in_epoch": batch_index + 1}
                checkpoints.save(f"step_{completed_steps}", state)
            if completed_steps >= total_steps or out_of_time:
                break
        last_epoch_loss = accelerator.reduce(loss_sum, "mean").item() / max(loss_count, 1)
        metrics = on_epoch_end(epoch) if on_epoch_end is not None else {}
        accelerator.print(f"epoch {epoch}: train loss {last_epoch_loss:.4f} {metrics}")
        if args.with_tracking:
            accelerator.log({"train/epoch_loss": last_epoch_loss, **metrics, "epoch": epoch}, step=completed_steps)
        if checkpointing == "epoch" and not out_of_time:
            checkpoints.save(f"epoch_{epoch}", {"completed_steps": completed_steps, "epoch": epoch + 1, "batches_in_epoch": 0})
        if completed_steps >= total_steps or out_of_time:
            break
    progress.close()
    return {
        "train_loss": last_epoch_loss, "train_runtime": time.perf_counter() - started, "train_steps": completed_steps,
        "stopped_by_time_budget": out_of_time,
    }  # fmt: skip
