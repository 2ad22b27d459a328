"""The GPU recipe: CMSA-S trained from scratch on each task's real data in ../shared/data, as many epochs as fit
in a time budget, through the task runner (`cmsa_hf.tasks.run`): evaluated, saved as a Hub-ready folder per task,
and summarised in `results.json` (images/s, epochs, metrics, device).

    python benchmarks/gpu_run.py --output_dir outputs/gpu-run                   # one GPU, about 10 minutes
    python benchmarks/gpu_run.py --output_dir /tmp/gpu-run-tiny --tiny          # CPU: two steps of each task

- classification: CIFAR-10 (`cifar10-train.zip`, seeded 45k / 5k split) at 32x32, images decoded once into memory
  and augmented on the GPU (`--augment_on_device`);
- head pose: the AFLW2000 half (`aflw2000-half.zip`) at 32x32, 200 faces held out (a proxy: 300W-LP is not here);
- keypoints: `coco-mini` at 32x24, evaluated on its own 86 persons (a loop check, not a COCO figure).

On a GPU every run uses bf16 autocast, channels_last, fused AdamW (the runner's default there) and
`torch.compile`. The number of epochs is set so the cosine schedule ends within the task's share of the budget: a
probe run measures the training step rate first (for `--probe_s` seconds, compilation included, so the estimate
errs on the short side), and the real run also stops at what is left of its budget (`--time_budget_s`). A run
this short is not checkpointed: after a crash, run it again (the task scripts themselves checkpoint and resume).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from cmsa_hf.tasks import HeadPoseTask, ImageClassificationTask, KeypointDetectionTask, run  # noqa: E402


DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
BUDGET_SHARES = {"image-classification": 0.7, "head-pose": 0.15, "keypoint-detection": 0.15}


def task_recipes(data: Path) -> dict:
    """Per task: (Task, its data and recipe flags, batch size, tiny-run flags). The recipes are short-schedule ones
    (no mixup / cutmix for a few epochs of CIFAR; the paper's 300-epoch DeiT recipe needs 300 epochs)."""
    coco = data / "coco-mini"
    return {
        "image-classification": (
            ImageClassificationTask,
            ["--train_dir", str(data / "cifar10-train.zip"), "--train_val_split", "0.1", "--image_size", "32", "32",
             "--augment_on_device", "--mixup_alpha", "0", "--cutmix_alpha", "0", "--learning_rate", "2e-3",
             "--drop_path_rate", "0.05", "--num_warmup_epochs", "1"],
            256,
            ["--max_train_samples", "32", "--max_eval_samples", "16"],
        ),
        "head-pose": (
            HeadPoseTask,
            ["--train_data", str(data / "aflw2000-half.zip"), "--train_format", "aflw2000", "--validation_split_size",
             "200", "--image_size", "32", "32", "--learning_rate", "1e-3", "--drop_path_rate", "0",
             "--num_warmup_epochs", "1"],
            64,
            ["--max_train_samples", "16", "--max_eval_samples", "8"],
        ),
        "keypoint-detection": (
            KeypointDetectionTask,
            ["--train_annotation_file", str(coco / "annotations" / "person_keypoints_train2017.json"),
             "--train_image_dir", str(coco / "train2017"), "--dataset_name", "coco-mini", "--image_size", "32", "24",
             "--learning_rate", "2e-3", "--drop_path_rate", "0", "--num_warmup_epochs", "1"],
            32,
            ["--max_train_samples", "16", "--max_eval_samples", "8"],
        ),
    }  # fmt: skip


def device_flags(device: str, workers: int) -> list[str]:
    """What the device gets: on a GPU bf16 autocast and torch.compile; channels_last everywhere."""
    flags = ["--channels_last", "--dataloader_num_workers", str(workers)]
    if device == "cuda":
        flags += ["--mixed_precision", "bf16", "--torch_compile"]
    return flags


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({torch.get_num_threads()} threads)"


def train_task(name: str, args, budget_s: float) -> dict:
    task_class, recipe, batch_size, tiny = task_recipes(Path(args.data))[name]
    output_dir = Path(args.output_dir) / name
    # Classification batches come from memory (no workers); the others decode and warp per sample on the CPU.
    workers = 0 if name == "image-classification" else args.num_workers
    batch_size = 2 if args.tiny else batch_size
    common = [
        *recipe, "--variant", "cmsa-s", "--seed", str(args.seed), "--per_device_train_batch_size", str(batch_size), "--per_device_eval_batch_size", str(4 if args.tiny else 512),
        *device_flags(args.device, workers), *(tiny if args.tiny else []),
    ]  # fmt: skip
    if args.tiny:
        epochs, steps_per_s, left = 1, None, budget_s
        schedule = ["--max_train_steps", "2", "--num_warmup_steps", "1"]
    else:
        # Probe the step rate, then fit whole epochs of the cosine schedule into what is left of the budget.
        probe_started = time.perf_counter()
        probe = run(task_class(), [*common, "--output_dir", str(output_dir / "probe"), "--num_train_epochs", "1000",
                                   "--time_budget_s", str(args.probe_s), "--overwrite_output_dir"])  # fmt: skip
        steps_per_s = probe["train_steps"] / probe["train_runtime"]
        steps_per_epoch = probe["train_samples"] // batch_size
        left = budget_s - (time.perf_counter() - probe_started)
        epochs = max(1, math.floor(steps_per_s * left / steps_per_epoch))
        schedule = ["--num_train_epochs", str(epochs)]
    results = run(task_class(), [*common, *schedule, "--output_dir", str(output_dir), "--overwrite_output_dir",
                                 "--time_budget_s", str(max(left, 1.0))])  # fmt: skip
    images = results["train_steps"] * batch_size
    return {
        "task": name,
        "output_dir": str(output_dir),
        "epochs_scheduled": epochs,
        "epochs_trained": round(images / results["train_samples"], 2),
        "train_images_per_s": round(images / results["train_runtime"], 1),
        "probe_steps_per_s": round(steps_per_s, 2) if steps_per_s else None,
        **{key: value for key, value in results.items() if key.startswith(("eval_", "train_"))},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="One Hub-ready folder per task, and results.json.")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="The folder of cifar10-train.zip and the others.")
    parser.add_argument("--tasks", nargs="+", choices=list(BUDGET_SHARES), default=list(BUDGET_SHARES))
    parser.add_argument("--time_budget_s", type=float, default=540.0, help="Training seconds, shared by the tasks.")
    parser.add_argument("--probe_s", type=float, default=20.0, help="Seconds of the step-rate probe of each task.")
    parser.add_argument("--num_workers", type=int, default=8, help="Loader workers of the per-sample tasks.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="Two steps of each task on a few samples (a CPU check).")
    args = parser.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    missing = [name for name in ("cifar10-train.zip", "aflw2000-half.zip", "coco-mini") if not (Path(args.data) / name).exists()]
    if missing:
        parser.error(f"--data {args.data} lacks {', '.join(missing)}")

    shares = sum(BUDGET_SHARES[name] for name in args.tasks)
    started = time.perf_counter()
    rows = [train_task(name, args, args.time_budget_s * BUDGET_SHARES[name] / shares) for name in args.tasks]
    summary = {
        "device": device_name(),
        "torch": torch.__version__,
        "tiny": args.tiny,
        "time_budget_s": args.time_budget_s,
        "wall_s": round(time.perf_counter() - started, 1),
        "tasks": rows,
    }
    Path(args.output_dir, "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
