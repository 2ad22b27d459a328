"""Head pose (yaw, pitch, roll from a face crop): the paper's protocol (train on 300W-LP, test on AFLW2000-3D and
BIWI; or a seeded held-out share), MAE per angle against the training-mean baseline, mirror sign agreement."""

import argparse
from pathlib import Path

import numpy as np

from .. import evaluation
from ..configuration_cmsa import HEAD_POSE_HEADS
from ..data.head_pose import DATA_FORMATS
from ..data.transforms import HeadPoseTransform
from ..hub import head_pose_card
from ..image_processing_cmsa import CMSAImageProcessor
from ..metrics import head_pose_report, mirror_sign_agreement
from ..modeling_cmsa import CMSAForHeadPoseEstimation
from .base import Task


def read_splits(args) -> dict:
    """The train and validation faces (rows: image, name, box, angles, image_size) as `--train_format` and
    `--validation_format` read them, or a seeded `--validation_split_size` share of train held out."""
    train = DATA_FORMATS[args.train_format].load(args.train_data)
    if args.validation_data:
        return {"train": train, "validation": DATA_FORMATS[args.validation_format].load(args.validation_data)}
    if not 0 < args.validation_split_size < len(train):
        raise ValueError(f"--validation_split_size must be in (0, {len(train)}), got {args.validation_split_size}")
    split = train.train_test_split(test_size=args.validation_split_size, seed=args.seed)
    return {"train": split["train"], "validation": split["test"]}


def fit_splits(splits: dict, args, max_angle: float) -> dict:
    """The splits with a `sample_index` column, cut to `--max_train_samples` / `--max_eval_samples`. Training faces
    with an angle beyond +-`max_angle` (the range of the model's angle bins) are dropped first, as FSA-Net drops them
    from 300W-LP: the model refuses such labels."""
    train = splits["train"]
    expressible = np.flatnonzero((np.abs(np.asarray(train["angles"])) <= max_angle).all(axis=1))
    if len(expressible) < len(train):
        print(f"Dropping {len(train) - len(expressible)} training faces with an angle beyond +-{max_angle:g} degrees")
        train = train.select(expressible)
    splits = {"train": train, "validation": splits["validation"]}
    for name, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit is not None:
            splits[name] = splits[name].select(range(min(limit, len(splits[name]))))
        splits[name] = splits[name].add_column("sample_index", list(range(len(splits[name]))))
    return splits


class HeadPoseTask(Task):
    name = "head-pose-estimation"
    model_class = CMSAForHeadPoseEstimation
    make_card = staticmethod(head_pose_card)
    extras = ("train", "headpose")
    training_unit = "faces"
    recipe = {
        **Task.recipe,
        "image_size": (32, 32),
        "per_device_train_batch_size": 96,
        "per_device_eval_batch_size": 256,
        "num_train_epochs": 100,
        "flip_probability": 0.5,
        "scale_factor": 0.1,
        "shift_factor": 0.05,
        "random_erasing_probability": 0.0,
    }

    def add_arguments(self, parser):
        data = parser.add_argument_group("data")
        data.add_argument("--train_data", type=str, required=True, help="A data set folder (or zip for AFLW2000).")
        data.add_argument("--train_format", choices=sorted(DATA_FORMATS), default="300w_lp")
        data.add_argument("--validation_data", type=str, default=None)
        data.add_argument("--validation_format", choices=sorted(DATA_FORMATS), default="aflw2000")
        data.add_argument(
            "--validation_split_size", type=int, default=None, help="Faces held out of train if no validation data."
        )
        data.add_argument("--max_train_samples", type=int, default=None)
        data.add_argument("--max_eval_samples", type=int, default=None)

        model = parser.add_argument_group("head")
        model.add_argument(
            "--head", choices=HEAD_POSE_HEADS, default=None, help="Angle head (default: ssr, the paper's, or the checkpoint's)."
        )
        model.add_argument(
            "--regression_weight", type=float, default=None, help="alpha of the binned loss CE + alpha * MSE (2)."
        )
        model.add_argument("--flip_test", action=argparse.BooleanOptionalAction, default=False, help="At evaluation.")

        augment = parser.add_argument_group("augmentation")
        augment.add_argument("--flip_probability", type=float)
        augment.add_argument("--scale_factor", type=float, help="Face box scale jitter.")
        augment.add_argument("--shift_factor", type=float, help="Face box shift jitter (of its size).")
        augment.add_argument("--random_erasing_probability", type=float)

    def check_arguments(self, args, parser):
        if args.validation_data is None and not args.validation_split_size:
            parser.error("give --validation_data or --validation_split_size")

    def load_data(self, args):
        return read_splits(args)

    def create_model(self, args, data):
        """The model, and `data` fitted to its angle range (`fit_splits`)."""
        model = self.load_or_create_model(
            args, head_pose_head=args.head, head_pose_regression_weight=args.regression_weight
        )
        data.update(fit_splits(data, args, max_angle=model.config.head_pose_max_angle))
        self.training_mean = np.asarray(data["train"]["angles"], dtype=np.float64).mean(axis=0)
        # The loaders give loosened face boxes already: the processor only grows them to the model's aspect ratio.
        return model, CMSAImageProcessor.for_config(model.config, box_padding=1.0)

    def transforms(self, args, model, processor):
        train = HeadPoseTransform(
            processor, train=True, seed=args.seed, flip_probability=args.flip_probability, scale_factor=args.scale_factor,
            shift_factor=args.shift_factor, random_erasing_probability=args.random_erasing_probability,
        )  # fmt: skip
        return train, HeadPoseTransform(processor)

    def compute_loss(self, args, model, batch):
        return model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss

    def evaluation_outputs(self, args, model, batch):
        pixel_values = batch["pixel_values"]
        angles = model(pixel_values=pixel_values, flip_test=args.flip_test).angles
        mirrored = angles if args.flip_test else model(pixel_values=pixel_values.flip(-1)).angles
        return {"angles": angles.float(), "mirrored": mirrored.float(), "labels": batch["labels"]}

    def compute_metrics(self, args, outputs, name):
        """MAE per angle and mean over the whole split (the `cmsa_head_pose_mae` module), the MAE of always predicting the training mean (the baseline
        any model must beat), and, without flip test (which makes it 1 by construction), how often the mirrored
        face's yaw / roll comes out with the opposite sign."""
        predicted, truth = outputs["angles"].numpy(), outputs["labels"].numpy()
        head_pose_mae = evaluation.load("cmsa_head_pose_mae")
        mae = head_pose_mae.compute(predictions=predicted, references=truth)
        baseline = head_pose_mae.compute(predictions=np.broadcast_to(self.training_mean, truth.shape), references=truth)
        print(head_pose_report({"model": mae, "training mean (baseline)": baseline}))
        metrics = {"eval_mae": mae["mean"], **{f"eval_mae_{k}": v for k, v in mae.items() if k != "mean"}}
        if not args.flip_test:
            agreement = mirror_sign_agreement(predicted, outputs["mirrored"].numpy(), truth)
            metrics.update({f"eval_mirror_opposite_sign_{k}": v for k, v in agreement.items()})
        metrics = {key: round(value, 4) for key, value in metrics.items()}
        metrics.update(eval_mae_training_mean_baseline=round(baseline["mean"], 4), eval_samples=int(len(truth)))
        return metrics

    def card_fields(self, args):
        train_format = DATA_FORMATS[args.train_format]
        other_set = {"eval_dataset_name": DATA_FORMATS[args.validation_format].display_name, "eval_split": "test"}
        return {
            "dataset_name": train_format.display_name,
            "dataset_description": f"{train_format.display_name} (`{Path(args.train_data).name}`)",
            "data_terms": train_format.terms,
            "eval_description": self._describe_evaluation(args),
            **(other_set if args.validation_data else {"eval_split": "held-out"}),
        }

    def _describe_evaluation(self, args) -> str:
        if args.validation_data:
            which = f"{DATA_FORMATS[args.validation_format].display_name} (`{Path(args.validation_data).name}`)"
        else:
            which = f"{args.validation_split_size} faces held out of the training data (seed {args.seed})"
        return f"Evaluated on {which}, {'with' if args.flip_test else 'without'} flip test"

    def hyperparameters(self, args):
        return {
            "input size": f"{args.image_size[0]}x{args.image_size[1]}",
            "flip / box scale / box shift / random erasing": f"{args.flip_probability} / {args.scale_factor} / "
            f"{args.shift_factor} / {args.random_erasing_probability}",
        }
