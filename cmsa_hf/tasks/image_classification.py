"""Image classification: Hub data sets, image folders / zip archives or the embedded digits; the paper's (DeiT)
recipe for CIFAR (mixup / cutmix, label smoothing, random crop + flip, random erasing); top-1 / top-5 / loss."""

import torch
import torch.nn.functional as F

from .. import evaluation
from ..data.device_augment import DecodedImages, DeviceAugment, normalize
from ..data.image_classification import card_data_fields, load_splits, prepare_splits
from ..data.transforms import ClassificationTransform, mix_batch
from ..hub import image_classification_card
from ..image_processing_cmsa import CMSAImageProcessor
from ..modeling_cmsa import CMSAForImageClassification
from .base import Task


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


class ImageClassificationTask(Task):
    name = "image-classification"
    model_class = CMSAForImageClassification
    make_card = staticmethod(image_classification_card)
    training_unit = "images"
    recipe = {
        **Task.recipe,
        "crop_padding": 4,
        "hflip_probability": 0.5,
        "random_erasing_probability": 0.25,
        "mixup_alpha": 0.8,
        "cutmix_alpha": 1.0,
        "mix_probability": 1.0,
        "mix_switch_probability": 0.5,
        "label_smoothing": 0.1,
    }

    def add_arguments(self, parser):
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

        augment = parser.add_argument_group("augmentation (paper / DeiT defaults)")
        augment.add_argument("--crop_padding", type=int, help="Random crop after zero padding (0: off).")
        augment.add_argument("--hflip_probability", type=float)
        augment.add_argument("--random_erasing_probability", type=float)
        augment.add_argument("--mixup_alpha", type=float)
        augment.add_argument("--cutmix_alpha", type=float)
        augment.add_argument("--mix_probability", type=float)
        augment.add_argument("--mix_switch_probability", type=float)
        augment.add_argument("--label_smoothing", type=float)
        augment.add_argument(
            "--augment_on_device", action="store_true",
            help="Decode and resize every image once into memory (uint8) and run crop / flip / normalize / erasing "
            "as batched tensor operations on the training device (for GPUs a per-image CPU pipeline cannot feed). "
            "Draws come from torch's generator instead of per (seed, epoch, row).",
        )  # fmt: skip

    def check_arguments(self, args, parser):
        if args.dataset_name is None and args.train_dir is None:
            parser.error("give --dataset_name (a Hub id or 'digits') or --train_dir")

    def load_data(self, args):
        splits = load_splits(
            args.dataset_name, args.dataset_config_name, args.train_dir, args.validation_dir, args.train_val_split, args.seed
        )
        splits, self.label_names = prepare_splits(
            splits,
            args.image_column_name,
            args.label_column_name,
            max_samples={"train": args.max_train_samples, "validation": args.max_eval_samples},
            skip_corrupt_images=args.skip_corrupt_images,
            seed=args.seed,
        )
        return splits

    def create_model(self, args, data):
        id2label = dict(enumerate(self.label_names))
        model = self.load_or_create_model(args, id2label=id2label, label2id={name: i for i, name in id2label.items()})
        return model, CMSAImageProcessor.for_config(model.config)

    def transforms(self, args, model, processor):
        train = ClassificationTransform(
            processor, args.image_column_name, args.label_column_name, "train", train=True, seed=args.seed,
            crop_padding=args.crop_padding, hflip_probability=args.hflip_probability,
            random_erasing_probability=args.random_erasing_probability,
        )  # fmt: skip
        return train, ClassificationTransform(processor, args.image_column_name, args.label_column_name, "validation")

    def loader_datasets(self, args, data, model, processor):
        """With `--augment_on_device`: both splits decoded once (`DecodedImages`), finished in `model_inputs`."""
        if not args.augment_on_device:
            return super().loader_datasets(args, data, model, processor)
        self.device_augment = DeviceAugment(
            processor, args.crop_padding, args.hflip_probability, args.random_erasing_probability
        )
        return tuple(
            DecodedImages.from_split(data[split], processor, args.image_column_name, args.label_column_name, split)
            for split in ("train", "validation")
        )

    def model_inputs(self, args, batch, train):
        if args.augment_on_device:
            images = batch["pixel_values"]
            batch = {**batch, "pixel_values": self.device_augment(images) if train else normalize(images, self.device_augment.processor)}
        return super().model_inputs(args, batch, train)

    def compute_loss(self, args, model, batch):
        pixel_values, targets = mix_batch(
            batch["pixel_values"], batch["labels"], len(self.label_names), args.mixup_alpha, args.cutmix_alpha,
            args.mix_probability, args.mix_switch_probability, args.label_smoothing,
        )  # fmt: skip
        return soft_cross_entropy(model(pixel_values=pixel_values).logits, targets)

    def evaluation_outputs(self, args, model, batch):
        return {"logits": model(pixel_values=batch["pixel_values"]).logits.float(), "labels": batch["labels"]}

    def compute_metrics(self, args, outputs, name):
        """Top-1 and top-5 (the `cmsa_accuracy` module) and cross-entropy over the whole split."""
        logits, labels = outputs["logits"], outputs["labels"]
        accuracy = evaluation.load("cmsa_accuracy").compute(predictions=logits, references=labels, top_k=(1, 5))
        return {
            "eval_accuracy": round(accuracy["accuracy"], 4),
            "eval_top5_accuracy": round(accuracy["top5_accuracy"], 4),
            "eval_loss": round(F.cross_entropy(logits, labels).item(), 4),
            "eval_samples": int(labels.numel()),
        }

    def card_fields(self, args):
        return card_data_fields(args.dataset_name, args.train_dir, args.validation_dir, args.seed, args.hub_dataset_id)

    def hyperparameters(self, args):
        mixing = "off" if args.mixup_alpha <= 0 and args.cutmix_alpha <= 0 else (
            f"mixup {args.mixup_alpha} / cutmix {args.cutmix_alpha}, p {args.mix_probability}"
        )
        return {
            "label smoothing": args.label_smoothing,
            "mixup / cutmix": mixing,
            "random crop padding / h-flip / random erasing": f"{args.crop_padding} / {args.hflip_probability} / "
            f"{args.random_erasing_probability}" + (", batched on the training device" if args.augment_on_device else ""),
        }
