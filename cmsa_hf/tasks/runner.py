"""`run(task, argv)`: one training run of a `Task`, from the command line to the Hub-ready folder.

The runner owns what every task shares: the common flags, Accelerate, seeding, the output folder's checkpoints,
per-epoch re-seeding of the augmentation, the train loop with exact resume, the evaluation gathered across
processes (before training, every epoch, at the end), the Hub-ready folder with its card, and `--push_to_hub`.
"""

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader

from ..extras import require_extras
from ..hub import write_hub_folder
from ..publish import publish
from ..training import make_accelerator, make_optimizer_and_scheduler, make_train_dataloader, prepare_output_dir, train_loop
from .base import Task, memory_format


def add_common_arguments(parser: argparse.ArgumentParser, offers_eval_before_training: bool = False):
    """The flags every task takes (their defaults: `Task.recipe`, set by `parse_args`)."""
    model = parser.add_argument_group("model (shared by the cmsa_hf tasks)")
    model.add_argument("--model_name_or_path", type=str, default=None, help="A saved CMSA folder or Hub id.")
    model.add_argument(
        "--model_revision", type=str, default=None, help="Branch, tag or commit of --model_name_or_path on the Hub."
    )
    model.add_argument(
        "--base_model_id", type=str, default=None,
        help="The Hub id a local --model_name_or_path was downloaded from (the card's base_model).",
    )  # fmt: skip
    model.add_argument("--variant", type=str, default="cmsa-s", help="Preset when training from scratch.")
    model.add_argument("--image_size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"))
    model.add_argument(
        "--ignore_mismatched_sizes", action="store_true", help="Re-initialise checkpoint weights of another shape."
    )
    model.add_argument("--attn_implementation", choices=["sdpa", "eager"], default=None)

    group = parser.add_argument_group("training (shared by the cmsa_hf tasks)")
    group.add_argument("--output_dir", type=str, required=True, help="Where the Hub-ready folder and checkpoints go.")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--per_device_train_batch_size", type=int)
    group.add_argument("--per_device_eval_batch_size", type=int)
    group.add_argument("--learning_rate", type=float, help="AdamW peak learning rate.")
    group.add_argument("--min_learning_rate", type=float, help="Cosine floor.")
    group.add_argument("--weight_decay", type=float)
    group.add_argument("--adam_beta1", type=float)
    group.add_argument("--adam_beta2", type=float)
    group.add_argument("--num_train_epochs", type=int)
    group.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs when set.")
    group.add_argument(
        "--time_budget_s", type=float, default=None,
        help="Stop training at the first optimizer step after this many seconds of training (of this run, a "
        "resumed one counting only its own); the model is still evaluated and saved.",
    )  # fmt: skip
    group.add_argument("--num_warmup_epochs", type=float)
    group.add_argument("--num_warmup_steps", type=int, default=None, help="Overrides --num_warmup_epochs when set.")
    group.add_argument("--lr_scheduler_type", choices=["cosine_with_min_lr", "cosine", "linear", "constant_with_warmup"])
    group.add_argument("--max_grad_norm", type=float, default=None, help="Gradient clipping (off in the paper).")
    group.add_argument("--drop_path_rate", type=float)
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="Default: accelerate config.")
    group.add_argument("--dataloader_num_workers", type=int, default=0)
    group.add_argument(
        "--channels_last", action="store_true", help="Run convolutions in NHWC memory format (faster on CPU)."
    )
    group.add_argument(
        "--gradient_checkpointing", action="store_true",
        help="Recompute each block's activations in the backward pass (less memory, a slower step; the same run).",
    )  # fmt: skip
    group.add_argument(
        "--torch_compile", action="store_true", help="torch.compile the model for training (evaluation runs eagerly)."
    )
    group.add_argument("--eval_every_epoch", action="store_true", help="Also evaluate (and log) after every epoch.")
    if offers_eval_before_training:
        group.add_argument("--eval_before_training", action="store_true", help="Also evaluate the initial model.")
    group.add_argument(
        "--checkpointing_steps", type=str, default=None, help="Save a resumable state every N optimizer steps, or 'epoch'."
    )
    group.add_argument(
        "--checkpoints_total_limit", type=int, default=2, help="Keep the newest N complete checkpoints (N >= 1)."
    )
    group.add_argument(
        "--resume_from_checkpoint", type=str, default=None, help="A checkpoint folder, or 'latest' in output_dir."
    )
    group.add_argument(
        "--overwrite_output_dir", action="store_true",
        help="Start a new run in an output_dir that holds another run's checkpoints (deletes them).",
    )  # fmt: skip
    group.add_argument("--with_tracking", action="store_true", help="Log metrics to the trackers of --report_to.")
    group.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, ... or 'all'.")
    group.add_argument("--reparameterize_on_save", action="store_true", help="Also write a folded inference copy.")
    group.add_argument(
        "--hub_dataset_id", type=str, default=None, help="The Hub data set the training data is (card `datasets:`)."
    )
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--hub_model_id", type=str, default=None, help="Repository id (default: output_dir's name).")
    group.add_argument("--hub_token", type=str, default=None)
    group.add_argument("--hub_private_repo", action="store_true")


def parse_args(task: Task, argv=None, description: str | None = None, prog: str | None = None) -> argparse.Namespace:
    """The task's flags, then the common ones, with the task's recipe as defaults; then the task's checks."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    task.add_arguments(parser)
    add_common_arguments(parser, task.offers_eval_before_training)
    unknown = set(task.recipe) - {action.dest for action in parser._actions}
    if unknown:
        raise ValueError(f"{type(task).__name__}.recipe sets {sorted(unknown)}, which no flag takes")
    parser.set_defaults(**task.recipe)
    args = parser.parse_args(argv)
    task.check_arguments(args, parser)
    return args


def run(task: Task, argv=None, description: str | None = None, prog: str | None = None) -> dict:
    """Train and evaluate `task` as the command line `argv` says (default: `sys.argv`), write the Hub-ready folder
    (and upload it with `--push_to_hub`). Returns the results written to `all_results.json`.

    The task's extras are checked before any data is read; the trained model is saved into `output_dir` before the
    final evaluation, so that an evaluation that fails loses no training."""
    args = parse_args(task, argv, description, prog)
    require_extras(*task.extras, needed_by=f"The {task.name} task")
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    prepare_output_dir(accelerator, args)

    with accelerator.main_process_first():
        data = task.load_data(args)
        model, processor = task.create_model(args, data)
    # On its device before the optimizer is built: fused AdamW when that is a GPU.
    model.to(accelerator.device, memory_format=memory_format(args))
    train_dataset, eval_dataset = task.loader_datasets(args, data, model, processor)
    train_dataloader = make_train_dataloader(train_dataset, args, collate_fn=getattr(train_dataset, "collate_fn", None))
    eval_dataloader = DataLoader(
        eval_dataset,
        batch_size=args.per_device_eval_batch_size,
        num_workers=args.dataloader_num_workers,
        collate_fn=getattr(eval_dataset, "collate_fn", None),
    )
    model, optimizer, train_dataloader, eval_dataloader, scheduler, total_steps = prepare_training(
        accelerator, args, model, train_dataloader, eval_dataloader, unit=task.training_unit
    )
    training_model = torch.compile(model) if args.torch_compile else model

    def evaluate_as(name: str) -> dict:
        return evaluate(accelerator, task, args, model, eval_dataloader, name, lambda batch: task.model_inputs(args, batch, False))

    initial = {}
    if getattr(args, "eval_before_training", False):
        initial = {f"initial_{key}": value for key, value in evaluate_as("initial").items() if key != "eval_samples"}
        accelerator.print(f"initial evaluation: {initial}")

    def on_epoch_end(epoch: int) -> dict:
        return evaluate_as(f"epoch_{epoch}") if args.eval_every_epoch else {}

    stats = train_loop(
        accelerator, args, model, optimizer, scheduler, train_dataloader, total_steps,
        lambda batch: task.compute_loss(args, training_model, task.model_inputs(args, batch, True)), task.set_epoch,
        on_epoch_end,
    )  # fmt: skip
    save_trained_model(accelerator, args, model, processor)
    started = time.perf_counter()
    try:
        results = evaluate_as("eval")
    except Exception as error:
        raise RuntimeError(
            f"The evaluation after training failed ({type(error).__name__}: {error}); the trained model is saved in "
            f"{args.output_dir} (model.safetensors, config.json, preprocessor_config.json)"
        ) from error
    results.update(initial, **training_summary(stats, len(data["train"]), started))
    if args.time_budget_s is not None:
        results["train_stopped_by_time_budget"] = stats["stopped_by_time_budget"]
    finish_run(
        accelerator, args, model, processor, results, task.make_card,
        hyperparameters={**task.hyperparameters(args), **recipe_hyperparameters(args, accelerator, total_steps)},
        **task.card_fields(args),
    )  # fmt: skip
    return results


def prepare_training(accelerator: Accelerator, args, model, train_dataloader, eval_dataloader, unit: str = "samples"):
    """Check that training has a batch, build the optimizer and schedule, and hand everything to Accelerate.

    Returns (model, optimizer, train_dataloader, eval_dataloader, scheduler, total_steps)."""
    if len(train_dataloader) == 0:
        raise ValueError(
            f"The training set has {len(train_dataloader.dataset)} {unit}, fewer than one batch of "
            f"--per_device_train_batch_size {args.per_device_train_batch_size}"
        )
    steps_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    optimizer, scheduler, total_steps = make_optimizer_and_scheduler(model, args, steps_per_epoch)
    prepared = accelerator.prepare(model, optimizer, train_dataloader, eval_dataloader, scheduler)
    return (*prepared, total_steps)


@torch.no_grad()
def evaluate(accelerator: Accelerator, task: Task, args, model, dataloader, name: str, prepare_batch: Callable) -> dict:
    """The task's metrics over the whole split: its per-batch outputs gathered across processes (each sample once),
    the metrics computed on the main process and shared with the others."""
    network = accelerator.unwrap_model(model).eval()
    gathered: dict[str, list[torch.Tensor]] = {}
    for batch in dataloader:
        outputs = accelerator.gather_for_metrics(task.evaluation_outputs(args, network, prepare_batch(batch)))
        for key, value in outputs.items():
            gathered.setdefault(key, []).append(value.cpu())
    metrics = [None]
    if accelerator.is_main_process:
        metrics[0] = task.compute_metrics(args, {key: torch.cat(values) for key, values in gathered.items()}, name)
    return broadcast_object_list(metrics)[0]


def save_trained_model(accelerator: Accelerator, args, model, processor):
    """Save the trained weights, config and processor into `output_dir` (main process) before the final evaluation;
    `finish_run` then completes the Hub-ready folder."""
    if accelerator.is_main_process:
        network = accelerator.unwrap_model(model)
        # channels_last weights are saved contiguous (as `finish_run` saves them), without changing the model's layout
        network.save_pretrained(args.output_dir, state_dict={k: v.contiguous() for k, v in network.state_dict().items()})
        processor.save_pretrained(args.output_dir)
        accelerator.print(f"Trained model saved in {args.output_dir} (before the final evaluation)")
    accelerator.wait_for_everyone()


def training_summary(stats: dict, train_samples: int, eval_started: float) -> dict:
    """The training figures every task adds to its evaluation results (all_results.json)."""
    return {
        "train_loss": round(stats["train_loss"], 6),
        "train_runtime": round(stats["train_runtime"], 1),
        "train_steps": stats["train_steps"],
        "train_samples": train_samples,
        "eval_runtime": round(time.perf_counter() - eval_started, 1),
    }


def recipe_hyperparameters(args, accelerator: Accelerator, total_steps: int) -> dict:
    """The optimisation rows of a model card's hyperparameter table (the task adds its own rows)."""
    return {
        "optimizer": f"AdamW (betas {args.adam_beta1}, {args.adam_beta2}), weight decay {args.weight_decay}",
        "learning rate": f"{args.learning_rate}, {args.lr_scheduler_type}, floor {args.min_learning_rate}",
        "warm-up": f"{args.num_warmup_steps} steps" if args.num_warmup_steps is not None else f"{args.num_warmup_epochs} epochs",
        "batch size": f"{args.per_device_train_batch_size} x {accelerator.num_processes} processes x "
        f"{args.gradient_accumulation_steps} accumulation",
        "optimizer steps": total_steps,
        "drop path": args.drop_path_rate,
        "mixed precision": accelerator.mixed_precision,
        "seed": args.seed,
    }


def finish_run(accelerator: Accelerator, args, model, processor, results: dict, make_card: Callable, **card_fields):
    """Print and log the final `results`, then on the main process write the Hub-ready folder, its card made by
    `make_card` (a `cmsa_hf.hub` card function) from `card_fields`, and with `--push_to_hub` upload it. Every process
    waits for the end."""
    accelerator.print(f"evaluation: {results}")
    if args.with_tracking:
        accelerator.log({f"final/{k}": v for k, v in results.items()}, step=results["train_steps"])
        accelerator.end_training()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model).eval().to(memory_format=torch.contiguous_format)
        repo_id = args.hub_model_id or Path(args.output_dir).name
        card_fields.setdefault("hub_dataset_id", args.hub_dataset_id)
        card = make_card(
            model, results, repo_id=repo_id, base_model=args.model_name_or_path, base_model_id=args.base_model_id,
            has_reparameterized=args.reparameterize_on_save, **card_fields,
        )  # fmt: skip
        write_hub_folder(args.output_dir, model, processor, results, card, reparameterize=args.reparameterize_on_save)
        accelerator.print(f"Hub-ready folder: {args.output_dir}")
        if args.push_to_hub:
            summary = publish(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo)
            accelerator.print(f"Uploaded to {summary['url']}")
    accelerator.wait_for_everyone()
