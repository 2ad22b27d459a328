"""The `cmsa-hf` command.

    cmsa-hf train TASK [flags]     train (or fine-tune) with Accelerate, evaluate, write a Hub-ready folder; TASK is
                                   image-classification, keypoint-detection or head-pose
    cmsa-hf train TASK --help      the task's flags
    cmsa-hf finetune image-classification [flags]   fine-tune a saved classifier with transformers.Trainer
    cmsa-hf publish FOLDER --repo-id you/name [--private] [--revision main] [--add-reparameterized] [--dry-run]
    cmsa-hf convert CHECKPOINT.pth --variant cmsa-l --image-size 32 24 --output-dir DIR

On several GPUs or processes: `accelerate launch -m cmsa_hf.cli train TASK [flags]`.
"""

import argparse
import importlib
import json

from .convert_cmsa_original_to_hf import add_convert_command
from .extras import MissingExtraError, require_extras
from .publish import publish


TRAINING_TASKS = {
    "image-classification": "ImageClassificationTask",
    "keypoint-detection": "KeypointDetectionTask",
    "head-pose": "HeadPoseTask",
}
"""`cmsa-hf train` task names and their `cmsa_hf.tasks` classes."""


def run_train_command(args) -> dict:
    require_extras("train", needed_by="cmsa-hf train")
    from . import tasks  # noqa: PLC0415 (the `train` extra)

    task = getattr(tasks, TRAINING_TASKS[args.task])()
    description = importlib.import_module(type(task).__module__).__doc__
    return tasks.run(task, args.arguments, description=description, prog=f"cmsa-hf train {args.task}")


def run_finetune_command(args) -> dict:
    require_extras("train", needed_by="cmsa-hf finetune")
    from .tasks.trainer import finetune  # noqa: PLC0415 (the `train` extra)

    return finetune(args.arguments, prog=f"cmsa-hf finetune {args.task}")


def run_publish_command(args) -> dict:
    summary = publish(
        args.folder, args.repo_id, token=args.token, private=args.private, revision=args.revision,
        dry_run=args.dry_run, add_reparameterized=args.add_reparameterized,
    )  # fmt: skip
    print(f"{'Would upload' if args.dry_run else 'Uploaded'} to {args.repo_id}:")
    for name in summary["files"]:
        print(f"  {name}")
    print(f"Card usage snippets, naming {args.repo_id}:")
    for line in summary["usage"]:
        print(f"  {line}")
    print("Card metadata:")
    print(json.dumps(summary["card"], indent=2))
    if summary["url"]:
        print(f"URL: {summary['url']}")
    return summary


def add_training_commands(commands):
    """`cmsa-hf train TASK ...` and `cmsa-hf finetune image-classification ...`: the rest of the command line goes to
    the task's own parser, so `cmsa-hf train TASK --help` lists the task's flags."""
    train = commands.add_parser(
        "train", help="Train (or fine-tune) a model with Accelerate, evaluate it, write a Hub-ready folder.",
        description="Train (or fine-tune from --model_name_or_path) a CMSA model with Accelerate on the paper's "
        "recipe, evaluate it and write a Hub-ready folder. `cmsa-hf train TASK --help` lists the task's flags.",
    )  # fmt: skip
    train.add_argument("task", choices=TRAINING_TASKS)
    train.add_argument("arguments", nargs=argparse.REMAINDER, help="The task's flags (see cmsa-hf train TASK --help).")
    train.set_defaults(run=run_train_command)

    finetune = commands.add_parser(
        "finetune", help="Fine-tune a saved classifier with transformers.Trainer (every TrainingArguments flag).",
        description="Fine-tune a saved CMSA classifier with transformers.Trainer and write a Hub-ready folder. "
        "`cmsa-hf finetune image-classification --help` lists its flags.",
    )  # fmt: skip
    finetune.add_argument("task", choices=["image-classification"])
    finetune.add_argument("arguments", nargs=argparse.REMAINDER, help="Script and TrainingArguments flags.")
    finetune.set_defaults(run=run_finetune_command)


def add_publish_command(commands):
    command = commands.add_parser("publish", help="Check a Hub-ready folder and upload it to the Hub.")
    command.add_argument("folder", help="A training run's output_dir.")
    command.add_argument("--repo-id", required=True, help="you/model-name")
    command.add_argument("--private", action="store_true")
    command.add_argument("--revision", default=None, help="A branch to upload to (created if needed).")
    command.add_argument("--token", default=None)
    command.add_argument("--add-reparameterized", action="store_true", help="Also upload a folded inference copy.")
    command.add_argument("--dry-run", action="store_true", help="Print what would be uploaded; upload nothing.")
    command.set_defaults(run=run_publish_command)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="cmsa-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_training_commands(commands)
    add_publish_command(commands)
    add_convert_command(commands)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except MissingExtraError as error:
        parser.exit(1, f"cmsa-hf: error: {error}\n")


if __name__ == "__main__":
    main()
