#!/usr/bin/env python
"""Train (or fine-tune) a CMSA head-pose model (yaw, pitch, roll from a face crop) with Accelerate, evaluate its
mean absolute error and write a Hub-ready folder.

The paper's protocol: train on 300W-LP, test on AFLW2000-3D (samples with an angle beyond +-99 degrees removed) and
on BIWI. Defaults follow its recipe (AdamW 2.5e-3, cosine, batch 96, 100 epochs, 32x32, ImageNet normalisation).

    accelerate launch examples/head-pose/run_head_pose.py --train_data 300W_LP --train_format 300w_lp \
        --validation_data AFLW2000 --validation_format aflw2000 --variant cmsa-s --output_dir outputs/head-pose-cmsa-s

Without a validation set, `--validation_split_size N` holds out N training faces (seeded).
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from cmsa_hf import CMSAForHeadPoseEstimation, CMSAImageProcessor
from cmsa_hf.configuration_cmsa import HEAD_POSE_HEADS
from cmsa_hf.data.head_pose import load_300w_lp, load_aflw2000, load_biwi
from cmsa_hf.data.transforms import HeadPoseTransform
from cmsa_hf.hub import head_pose_card
from cmsa_hf.metrics import head_pose_mae, head_pose_report, mirror_sign_agreement
from cmsa_hf.training import (
    add_common_arguments,
    load_or_create_model,
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


LOADERS = {"300w_lp": load_300w_lp, "aflw2000": load_aflw2000, "biwi": load_biwi}
DATASET_NAMES = {"300w_lp": "300W-LP", "aflw2000": "AFLW2000-3D", "biwi": "BIWI Kinect head pose"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--train_data", type=str, required=True, help="A data set folder (or zip for AFLW2000).")
    data.add_argument("--train_format", choices=sorted(LOADERS), default="300w_lp")
    data.add_argument("--validation_data", type=str, default=None)
    data.add_argument("--validation_format", choices=sorted(LOADERS), default="aflw2000")
    data.add_argument("--validation_split_size", type=int, default=None, help="Faces held out of train if no validation data.")
    data.add_argument("--max_train_samples", type=int, default=None)
    data.add_argument("--max_eval_samples", type=int, default=None)
    data.add_argument("--eval_every_epoch", action="store_true")

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", type=str, default=None, help="A saved CMSA folder or Hub id.")
    model.add_argument("--variant", type=str, default="cmsa-s", help="Preset when training from scratch.")
    model.add_argument("--image_size", type=int, nargs=2, default=(32, 32), metavar=("HEIGHT", "WIDTH"))
    model.add_argument("--attn_implementation", choices=["sdpa", "eager"], default=None)
    model.add_argument("--head", choices=HEAD_POSE_HEADS, default=None, help="Angle head (default: ssr, the paper's, or the checkpoint's).")
    model.add_argument("--regression_weight", type=float, default=None, help="alpha of the binned loss CE + alpha * MSE (2).")
    model.add_argument("--flip_test", action=argparse.BooleanOptionalAction, default=False, help="At evaluation.")

    augment = parser.add_argument_group("augmentation")
    augment.add_argument("--flip_probability", type=float, default=0.5)
    augment.add_argument("--scale_factor", type=float, default=0.1, help="Face box scale jitter.")
    augment.add_argument("--shift_factor", type=float, default=0.05, help="Face box shift jitter (of its size).")
    augment.add_argument("--random_erasing_probability", type=float, default=0.0)

    add_common_arguments(parser, per_device_train_batch_size=96, per_device_eval_batch_size=256, num_train_epochs=100)
    args = parser.parse_args(argv)
    if args.validation_data is None and not args.validation_split_size:
        parser.error("give --validation_data or --validation_split_size")
    return args


def load_splits(args, max_angle: float) -> dict:
    """The train and validation sets (rows: image, name, box, angles, image_size) with a `sample_index` column.
    Training faces with an angle beyond +-`max_angle` (the range of the model's angle bins) are dropped, as FSA-Net
    drops them from 300W-LP: the model refuses such labels."""
    train = LOADERS[args.train_format](args.train_data)
    if args.validation_data:
        validation = LOADERS[args.validation_format](args.validation_data)
    else:
        if not 0 < args.validation_split_size < len(train):
            raise ValueError(f"--validation_split_size must be in (0, {len(train)}), got {args.validation_split_size}")
        split = train.train_test_split(test_size=args.validation_split_size, seed=args.seed)
        train, validation = split["train"], split["test"]
    expressible = np.flatnonzero((np.abs(np.asarray(train["angles"])) <= max_angle).all(axis=1))
    if len(expressible) < len(train):
        print(f"Dropping {len(train) - len(expressible)} training faces with an angle beyond +-{max_angle:g} degrees")
        train = train.select(expressible)
    splits = {"train": train, "validation": validation}
    for name, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit is not None:
            splits[name] = splits[name].select(range(min(limit, len(splits[name]))))
        splits[name] = splits[name].add_column("sample_index", list(range(len(splits[name]))))
    return splits


@torch.no_grad()
def evaluate(accelerator, model, dataloader, args, training_mean: np.ndarray) -> dict:
    """MAE per angle and mean over the whole split (each face once across processes), the MAE of always
    predicting the training mean (the baseline any model must beat), and, without flip test (which makes it 1 by
    construction), how often the mirrored face's yaw / roll comes out with the opposite sign."""
    network = accelerator.unwrap_model(model).eval()
    predictions, mirrored_predictions, labels = [], [], []
    for batch in dataloader:
        pixel_values = batch["pixel_values"].contiguous(memory_format=memory_format(args))
        angles = network(pixel_values=pixel_values, flip_test=args.flip_test).angles
        mirrored = angles if args.flip_test else network(pixel_values=pixel_values.flip(-1)).angles
        angles, mirrored, truth = accelerator.gather_for_metrics((angles.float(), mirrored.float(), batch["labels"]))
        predictions.append(angles.cpu())
        mirrored_predictions.append(mirrored.cpu())
        labels.append(truth.cpu())
    predicted, truth = torch.cat(predictions).numpy(), torch.cat(labels).numpy()
    mae = head_pose_mae(predicted, truth)
    baseline = head_pose_mae(np.broadcast_to(training_mean, truth.shape), truth)
    accelerator.print(head_pose_report({"model": mae, "training mean (baseline)": baseline}))
    metrics = {"eval_mae": mae["mean"], **{f"eval_mae_{k}": v for k, v in mae.items() if k != "mean"}}
    if not args.flip_test:
        agreement = mirror_sign_agreement(predicted, torch.cat(mirrored_predictions).numpy(), truth)
        metrics.update({f"eval_mirror_opposite_sign_{k}": v for k, v in agreement.items()})
    metrics = {key: round(value, 4) for key, value in metrics.items()}
    metrics.update(eval_mae_training_mean_baseline=round(baseline["mean"], 4), eval_samples=int(len(truth)))
    return metrics


def main(argv=None):
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    prepare_output_dir(accelerator, args)

    model = load_or_create_model(
        CMSAForHeadPoseEstimation, args, head_pose_head=args.head, head_pose_regression_weight=args.regression_weight
    )
    model.to(memory_format=memory_format(args))
    # The loaders give loosened face boxes already: the processor only grows them to the model's aspect ratio.
    processor = CMSAImageProcessor.for_config(model.config, box_padding=1.0)
    with accelerator.main_process_first():
        splits = load_splits(args, max_angle=model.config.head_pose_max_angle)
    training_mean = np.asarray(splits["train"]["angles"], dtype=np.float64).mean(axis=0)

    train_transform = HeadPoseTransform(
        processor, train=True, seed=args.seed, flip_probability=args.flip_probability, scale_factor=args.scale_factor,
        shift_factor=args.shift_factor, random_erasing_probability=args.random_erasing_probability,
    )  # fmt: skip
    train_dataloader = make_train_dataloader(splits["train"].with_transform(train_transform), args)
    eval_dataloader = DataLoader(
        splits["validation"].with_transform(HeadPoseTransform(processor)),
        batch_size=args.per_device_eval_batch_size,
        num_workers=args.dataloader_num_workers,
    )
    model, optimizer, train_dataloader, eval_dataloader, scheduler, total_steps = prepare_training(
        accelerator, args, model, train_dataloader, eval_dataloader, unit="faces"
    )

    def compute_loss(model, batch):
        pixel_values = batch["pixel_values"].contiguous(memory_format=memory_format(args))
        return model(pixel_values=pixel_values, labels=batch["labels"]).loss

    def on_epoch_start(epoch):
        train_transform.epoch = epoch

    def on_epoch_end(epoch):
        return evaluate(accelerator, model, eval_dataloader, args, training_mean) if args.eval_every_epoch else {}

    stats = train_loop(
        accelerator, args, model, optimizer, scheduler, train_dataloader, total_steps, compute_loss,
        on_epoch_start, on_epoch_end,
    )  # fmt: skip
    started = time.perf_counter()
    results = evaluate(accelerator, model, eval_dataloader, args, training_mean)
    results.update(**training_summary(stats, len(splits["train"]), started))
    finish_run(
        accelerator, args, model, processor, results, head_pose_card,
        dataset_name=DATASET_NAMES[args.train_format],
        dataset_description=f"{DATASET_NAMES[args.train_format]} (`{Path(args.train_data).name}`)",
        eval_description=_describe_evaluation(args),
        eval_split="validation" if args.validation_data else "held-out",
        hyperparameters=_hyperparameters(args, accelerator, total_steps),
    )
    return results


def _describe_evaluation(args) -> str:
    if args.validation_data:
        which = f"{DATASET_NAMES[args.validation_format]} (`{Path(args.validation_data).name}`)"
    else:
        which = f"{args.validation_split_size} faces held out of the training data (seed {args.seed})"
    return f"Evaluated on {which}, {'with' if args.flip_test else 'without'} flip test"


def _hyperparameters(args, accelerator, total_steps) -> dict:
    return {
        "input size": f"{args.image_size[0]}x{args.image_size[1]}",
        "flip / box scale / box shift / random erasing": f"{args.flip_probability} / {args.scale_factor} / "
        f"{args.shift_factor} / {args.random_erasing_probability}",
        **recipe_hyperparameters(args, accelerator, total_steps),
    }


if __name__ == "__main__":
    main()
