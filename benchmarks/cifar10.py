"""CIFAR-10 training benchmark: CMSA-S against a transformers peer (a CIFAR ResNet-18), same data, same recipe,
same number of steps, timed in one run.

Trains on 45,000 images of the real CIFAR-10 training split (../shared/data/cifar10-train.zip, JPEG quality 75)
and validates on the 5,000 held out (seeded). Prints validation top-1, training and evaluation images/s and peak
memory per model (while training, and over the whole run with evaluation), as a Markdown table and JSON. Each
model trains in its own subprocess (clean memory peaks), with tcmalloc preloaded where it is installed
(`--allocator`, as PyTorch's `torch.backends.xeon.run_cpu` launcher does): glibc's malloc fragments its heap under
a training step's mix of tensor sizes.

    python benchmarks/cifar10.py --max_train_steps 300              # CPU: a fixed budget of steps
    python benchmarks/cifar10.py --device cuda --num_train_epochs 50 # GPU
"""

import argparse
import ctypes.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader


DEFAULT_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train.zip"
MODELS = ["cmsa-s", "cmsa-s-checkpointed", "resnet18-cifar"]


def build_model(name: str, num_labels: int):
    """CMSA-S at 32x32 (`-checkpointed`: with activation checkpointing per block), or ResNet-18 from transformers
    with the usual CIFAR stem (3x3 stride-1 conv, no max-pool)."""
    if name.startswith("cmsa-s"):
        from cmsa_hf import CMSAConfig, CMSAForImageClassification

        model = CMSAForImageClassification(CMSAConfig.from_variant("cmsa-s", image_size=(32, 32), num_labels=num_labels))
        if name.endswith("-checkpointed"):
            model.activation_checkpointing_enable()
        return model
    from transformers import ResNetConfig, ResNetForImageClassification
    from transformers.models.resnet.modeling_resnet import ResNetConvLayer

    config = ResNetConfig(
        embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
        num_labels=num_labels,
    )  # fmt: skip
    model = ResNetForImageClassification(config)
    model.resnet.embedder.embedder = ResNetConvLayer(3, 64, kernel_size=3, stride=1)
    model.resnet.embedder.pooler = torch.nn.Identity()
    return model


def load_cifar(zip_path: Path, seed: int):
    from cmsa_hf.data.image_classification import load_splits, prepare_splits

    splits = load_splits(train_dir=str(zip_path), train_val_split=0.1, seed=seed)  # 45,000 / 5,000
    return prepare_splits(splits, seed=seed)


def allocator_library(allocator: str) -> str | None:
    """The library that `--allocator` preloads in the workers: None for the system's malloc; "auto" is tcmalloc
    where it is installed, else the system's."""
    if allocator == "system":
        return None
    library = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    if library is None and allocator == "tcmalloc":
        raise SystemExit(
            "--allocator tcmalloc: libtcmalloc is not installed (Debian/Ubuntu: apt install libtcmalloc-minimal4); "
            "use --allocator system"
        )
    return library


def loaded_allocator() -> str:
    """"tcmalloc" if this process runs on tcmalloc (mapped in, e.g. by LD_PRELOAD), else "system"."""
    maps = Path("/proc/self/maps")
    return "tcmalloc" if maps.exists() and "libtcmalloc" in maps.read_text() else "system"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train_one(args) -> dict:
    """Worker: train and evaluate one model, return its measurements."""
    from cmsa_hf import CMSAImageProcessor
    from cmsa_hf.data.transforms import ClassificationTransform, mix_batch
    from cmsa_hf.training import make_optimizer_and_scheduler

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    splits, names = load_cifar(Path(args.data), args.seed)
    processor = CMSAImageProcessor(size={"height": 32, "width": 32})
    train_transform = ClassificationTransform(
        processor, "image", "label", "train", train=True, seed=args.seed, random_erasing_probability=0.0
    )
    train_loader = DataLoader(
        splits["train"].with_transform(train_transform), batch_size=args.batch_size, shuffle=True, drop_last=True,
        num_workers=args.num_workers, generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip
    eval_loader = DataLoader(
        splits["validation"].with_transform(ClassificationTransform(processor, "image", "label", "validation")),
        batch_size=args.eval_batch_size, num_workers=args.num_workers,
    )  # fmt: skip

    model = build_model(args.model, len(names)).to(device)
    model = model.to(memory_format=torch.channels_last)
    from cmsa_hf.tasks import ImageClassificationTask

    paper = ImageClassificationTask.recipe
    recipe = SimpleNamespace(
        weight_decay=paper["weight_decay"], learning_rate=args.learning_rate, adam_beta1=paper["adam_beta1"],
        adam_beta2=paper["adam_beta2"],
        max_train_steps=args.max_train_steps, num_train_epochs=args.num_train_epochs, num_warmup_steps=None,
        num_warmup_epochs=args.warmup_fraction * (args.max_train_steps / len(train_loader) if args.max_train_steps
                                                  else args.num_train_epochs),
        lr_scheduler_type=paper["lr_scheduler_type"], min_learning_rate=paper["min_learning_rate"],
    )  # fmt: skip
    optimizer, scheduler, total_steps = make_optimizer_and_scheduler(model, recipe, len(train_loader))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    step, train_images, train_seconds, epoch = 0, 0, 0.0, 0
    model.train()
    while step < total_steps:
        train_transform.epoch = epoch
        for batch in train_loader:
            started = time.perf_counter()
            pixels = batch["pixel_values"].to(device).contiguous(memory_format=torch.channels_last)
            labels = batch["labels"].to(device)
            pixels, targets = mix_batch(pixels, labels, len(names), mixup_alpha=0, cutmix_alpha=0, label_smoothing=paper["label_smoothing"])
            with autocast:
                logits = model(pixel_values=pixels).logits
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_seconds += time.perf_counter() - started
            train_images += labels.shape[0]
            step += 1
            if step % 50 == 0:
                print(f"[{args.model}] step {step}/{total_steps} loss {loss.item():.3f}", file=sys.stderr, flush=True)
            if step >= total_steps:
                break
        epoch += 1
    train_peak_memory_mb = peak_memory_mb(device)

    model.eval()
    correct, seen, eval_seconds = 0, 0, 0.0
    with torch.no_grad():
        for batch in eval_loader:
            started = time.perf_counter()
            pixels = batch["pixel_values"].to(device).contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = model(pixel_values=pixels).logits
            correct += (logits.argmax(-1).cpu() == batch["labels"]).sum().item()
            if device.type == "cuda":
                torch.cuda.synchronize()
            eval_seconds += time.perf_counter() - started
            seen += batch["labels"].shape[0]
    return {
        "model": args.model,
        "allocator": loaded_allocator(),
        "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "steps": step,
        "epochs": round(step * args.batch_size / len(splits["train"]), 2),
        "val_top1": round(correct / seen, 4),
        "val_samples": seen,
        "train_images_per_s": round(train_images / train_seconds, 1),
        "eval_images_per_s": round(seen / eval_seconds, 1),
        "train_peak_memory_mb": round(train_peak_memory_mb, 1),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("CMSA_CIFAR10_ZIP", str(DEFAULT_ZIP)))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max_train_steps", type=int, default=None, help="Fixed budget (CPU); else epochs.")
    parser.add_argument("--num_train_epochs", type=int, default=50)
    from cmsa_hf.tasks import ImageClassificationTask

    paper = ImageClassificationTask.recipe
    parser.add_argument("--batch_size", type=int, default=paper["per_device_train_batch_size"])
    parser.add_argument("--eval_batch_size", type=int, default=250)
    parser.add_argument("--learning_rate", type=float, default=paper["learning_rate"])
    parser.add_argument("--warmup_fraction", type=float, default=0.05)
    parser.add_argument(
        "--bf16", action="store_true", help="bf16 autocast (a GPU, or a CPU with AVX512-BF16 / AMX: lscpu flags)."
    )
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--allocator", default="auto", choices=["auto", "tcmalloc", "system"],
        help="malloc of the workers (auto: tcmalloc where installed).",
    )  # fmt: skip
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()

    if not Path(args.data).is_file():
        print(f"CIFAR-10 archive not found at {args.data}: nothing to benchmark (set --data or CMSA_CIFAR10_ZIP).")
        return
    if args.model:
        print(json.dumps(train_one(args)))
        return

    library = allocator_library(args.allocator)
    environment = dict(os.environ)
    if library is not None:
        environment["LD_PRELOAD"] = " ".join(filter(None, [library, environment.get("LD_PRELOAD")]))
    rows = []
    for name in args.models:
        command = [sys.executable, __file__, *sys.argv[1:], "--model", name]
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
        if result.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        expected = "system" if library is None else "tcmalloc"
        if rows[-1]["allocator"] != expected:
            raise RuntimeError(f"{name} ran on the {rows[-1]['allocator']} allocator, not {expected} ({library}):\n"
                               f"{result.stderr[-3000:]}")
    allocator = "tcmalloc" if library else "the system's malloc"
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    device = f"{device}, {allocator}"
    print(f"\nCIFAR-10 (45k train / 5k validation), {rows[0]['steps']} steps of batch {args.batch_size}, {device}")
    print("| model | params (M) | steps | epochs | val top-1 | train img/s | eval img/s | peak MB: training | run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['parameters_millions']} | {r['steps']} | {r['epochs']} | {r['val_top1']} | "
            f"{r['train_images_per_s']} | {r['eval_images_per_s']} | {r['train_peak_memory_mb']} | "
            f"{r['peak_memory_mb']} |"
        )
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"device": device, "args": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
