#!/usr/bin/env python
"""Train (or fine-tune) a CMSA image classifier with Accelerate, then evaluate it and write a Hub-ready folder.

Data: a Hub data set (--dataset_name uoft-cs/cifar10), image folders or zip archives (--train_dir,
--validation_dir; the `datasets` imagefolder layout), or the embedded default (--dataset_name digits, scikit-learn's
handwritten digits: no download). Model: a saved folder or Hub id (--model_name_or_path), or a preset from scratch
(--variant cmsa-s). Defaults follow the paper's (DeiT) recipe for CIFAR.

    accelerate launch examples/image-classification/run_classification.py --dataset_name digits \
        --variant cmsa-s --image_size 16 16 --output_dir outputs/digits-cmsa-s
"""

import argparse
import time

import datasets
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from cmsa_hf import CMSAConfig, CMSAForImageClassification, CMSAImageProcessor
from cmsa_hf.data.image_classification import card_data_fields, load_splits, prepare_splits
from cmsa_hf.data.transforms import ClassificationTransform, mix_batch
from cmsa_hf.hub import image_classification_card
from cmsa_hf.metrics import top_k_accuracy
from cmsa_hf.training import (
    add_common_arguments,
    make_accelerator,
    make_train_dataloader,
    memory_format,
    prepare_output_dir,
    prepare_training,
    recipe_hyperparameters,
    finish_run,
    train_loop,
    training_summary,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", type=str, default=None, help="A Hub data set id, or 'digits'.")
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--train_dir", type=str, default=None, help="Image folder or zip archive (imagefolder layout).")
    data.add_argument("--validation_dir", type=str, default=None)
    data.add_argument("--image_column_name", type=str, default="image")
    data.add_argument("--label_column_name", type=str, default="label")
    data.add_argument("--train_val_split", type=float, default=0.1, help="Validation share carved from train if needed.")
    data.add_argument("--max_train_samples", type=int, default=None)
    data.add_argument("--max_eval_samples", type=int, default=None)
    data.add_argument("--skip_corrupt_images", action="store_true", help="Drop unreadable images instead of stopping.")
    data.add_argument("--eval_every_epoch", action="store_true", help="Also evaluate (and log) after every epoch.")

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", type=str, default=None, help="A saved CMSA folder or Hub id.")
    model.add_argument("--variant", type=str, default="cmsa-s", help="Preset when training from scratch.")
    model.add_argument("--image_size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"))
    model.add_argument("--ignore_mismatched_sizes", action="store_true", help="Re-initialise a head of another size.")
    model.add_argument("--attn_implementation", choices=["sdpa", "eager"], default=None)

    augment = parser.add_argument_group("augmentation (paper / DeiT defaults)")
    augment.add_argument("--crop_padding", type=int, default=4, help="Random crop after zero padding (0: off).")
    augment.add_argument("--hflip_probability", type=float, default=0.5)
    augment.add_argument("--random_erasing_probability", type=float, default=0.25)
    augment.add_argument("--mixup_alpha", type=float, default=0.8)
    augment.add_argument("--cutmix_alpha", type=float, default=1.0)
    augment.add_argument("--mix_probability", type=float, default=1.0)
    augment.add_argument("--mix_switch_probability", type=float, default=0.5)
    augment.add_argument("--label_smoothing", type=float, default=0.1)

    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.dataset_name is None and args.train_dir is None:
        parser.error("give --dataset_name (a Hub id or 'digits') or --train_dir")
    return args


def load_and_prepare(args) -> tuple[datasets.DatasetDict, list[str]]:
    splits = load_splits(
        args.dataset_name, args.dataset_config_name, args.train_dir, args.validation_dir, args.train_val_split, args.seed
    )
    return prepare_splits(
        splits,
        args.image_column_name,
        args.label_column_name,
        max_samples={"train": args.max_train_samples, "validation": args.max_eval_samples},
        skip_corrupt_images=args.skip_corrupt_images,
        seed=args.seed,
    )


def load_model(args, names: list[str]):
    id2label = dict(enumerate(names))
    labels = {"id2label": id2label, "label2id": {name: i for i, name in id2label.items()}}
    extra = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    if args.model_name_or_path:
        model = CMSAForImageClassification.from_pretrained(
            args.model_name_or_path, revision=args.model_revision, ignore_mismatched_sizes=args.ignore_mismatched_sizes,
            drop_path_rate=args.drop_path_rate, **labels, **extra,
        )  # fmt: skip
        processor = CMSAImageProcessor.for_config(model.config)
    else:
        overrides = {"image_size": tuple(args.image_size)} if args.image_size else {}
        config = CMSAConfig.from_variant(args.variant, drop_path_rate=args.drop_path_rate, **overrides, **labels, **extra)
        model = CMSAForImageClassification(config)
        processor = CMSAImageProcessor.for_config(config)
    if args.image_size and tuple(args.image_size) != tuple(model.config.image_size):
        raise ValueError(
            f"--image_size {tuple(args.image_size)} differs from the checkpoint's image_size "
            f"{tuple(model.config.image_size)}; CMSA's attention windows are sized for one input resolution"
        )
    return model, processor


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


@torch.no_grad()
def evaluate(accelerator, model, dataloader, layout=torch.contiguous_format) -> dict:
    """Top-1, top-5 and cross-entropy over the whole split, each sample counted once across processes."""
    model.eval()
    all_logits, all_labels = [], []
    for batch in dataloader:
        logits = model(pixel_values=batch["pixel_values"].contiguous(memory_format=layout)).logits
        logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
        all_logits.append(logits.float().cpu())
        all_labels.append(labels.cpu())
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    return {
        "eval_accuracy": round(top_k_accuracy(logits, labels, 1), 4),
        "eval_top5_accuracy": round(top_k_accuracy(logits, labels, 5), 4),
        "eval_loss": round(F.cross_entropy(logits, labels).item(), 4),
        "eval_samples": int(labels.numel()),
    }


def main(argv=None):
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    prepare_output_dir(accelerator, args)

    with accelerator.main_process_first():
        splits, names = load_and_prepare(args)
    model, processor = load_model(args, names)
    model.to(memory_format=memory_format(args))
    num_labels = model.config.num_labels

    train_transform = ClassificationTransform(
        processor, args.image_column_name, args.label_column_name, "train", train=True, seed=args.seed,
        crop_padding=args.crop_padding, hflip_probability=args.hflip_probability,
        random_erasing_probability=args.random_erasing_probability,
    )  # fmt: skip
    eval_transform = ClassificationTransform(processor, args.image_column_name, args.label_column_name, "validation")
    train_dataloader = make_train_dataloader(splits["train"].with_transform(train_transform), args)
    eval_dataloader = DataLoader(
        splits["validation"].with_transform(eval_transform),
        batch_size=args.per_device_eval_batch_size,
        num_workers=args.dataloader_num_workers,
    )
    model, optimizer, train_dataloader, eval_dataloader, scheduler, total_steps = prepare_training(
        accelerator, args, model, train_dataloader, eval_dataloader, unit="images"
    )

    def compute_loss(model, batch):
        pixel_values, targets = mix_batch(
            batch["pixel_values"], batch["labels"], num_labels, args.mixup_alpha, args.cutmix_alpha,
            args.mix_probability, args.mix_switch_probability, args.label_smoothing,
        )  # fmt: skip
        pixel_values = pixel_values.contiguous(memory_format=memory_format(args))
        return soft_cross_entropy(model(pixel_values=pixel_values).logits, targets)

    def on_epoch_start(epoch):
        train_transform.epoch = epoch

    def on_epoch_end(epoch):
        return evaluate(accelerator, model, eval_dataloader, memory_format(args)) if args.eval_every_epoch else {}

    stats = train_loop(
        accelerator, args, model, optimizer, scheduler, train_dataloader, total_steps, compute_loss,
        on_epoch_start, on_epoch_end,
    )  # fmt: skip
    started = time.perf_counter()
    results = evaluate(accelerator, model, eval_dataloader, memory_format(args))
    results.update(**training_summary(stats, len(splits["train"]), started))
    finish_run(
        accelerator, args, model, processor, results, image_classification_card,
        hyperparameters=_hyperparameters(args, accelerator, total_steps),
        **card_data_fields(args.dataset_name, args.train_dir, args.validation_dir, args.seed, args.hub_dataset_id),
    )  # fmt: skip
    return results


def _hyperparameters(args, accelerator, total_steps) -> dict:
    mixing = "off" if args.mixup_alpha <= 0 and args.cutmix_alpha <= 0 else (
        f"mixup {args.mixup_alpha} / cutmix {args.cutmix_alpha}, p {args.mix_probability}"
    )
    return {
        "label smoothing": args.label_smoothing,
        "mixup / cutmix": mixing,
        "random crop padding / h-flip / random erasing": f"{args.crop_padding} / {args.hflip_probability} / "
        f"{args.random_erasing_probability}",
        **recipe_hyperparameters(args, accelerator, total_steps),
    }


if __name__ == "__main__":
    main()
