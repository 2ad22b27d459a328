#!/usr/bin/env python
"""Fine-tune a saved CMSA classifier on an image folder with `transformers.Trainer`.

    python examples/image-classification/run_trainer.py --model_name_or_path outputs/digits-cmsa-s \
        --train_dir my_images/ --output_dir outputs/finetuned --num_train_epochs 3 --learning_rate 5e-4 \
        --per_device_train_batch_size 32 --eval_strategy epoch --save_strategy epoch

Every `TrainingArguments` flag is available. The head is re-initialised when the folder's classes differ from the
checkpoint's (`--ignore_mismatched_sizes`).
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from cmsa_hf import CMSAForImageClassification, CMSAImageProcessor
from cmsa_hf.data.image_classification import load_splits, prepare_splits
from cmsa_hf.data.transforms import ClassificationTransform


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "A saved CMSA classifier folder or Hub id."})
    train_dir: str = field(metadata={"help": "Image folder or zip archive, one subfolder per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "Default: a share of train_dir held out."})
    train_val_split: float = 0.1
    ignore_mismatched_sizes: bool = field(default=True, metadata={"help": "Re-initialise a head of another size."})
    crop_padding: int = 4
    hflip_probability: float = 0.5
    random_erasing_probability: float = 0.0


class AugmentationEpoch(TrainerCallback):
    """Tells the per-sample-seeded augmentation which epoch it is in, so each epoch draws new augmentations."""

    def __init__(self, transform: ClassificationTransform):
        self.transform = transform

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.transform.epoch = round(state.epoch or 0)


def collate(rows: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([row["pixel_values"] for row in rows]),
        "labels": torch.stack([torch.as_tensor(row["labels"]) for row in rows]),
    }


def compute_metrics(prediction) -> dict:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def main(argv=None):
    script_args, training_args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses(argv)
    # The transform needs the raw `image` and `sample_index` columns, which Trainer would drop as unused inputs.
    training_args.remove_unused_columns = False
    splits, names = prepare_splits(
        load_splits(
            train_dir=script_args.train_dir, validation_dir=script_args.validation_dir,
            train_val_split=script_args.train_val_split, seed=training_args.seed,
        )  # fmt: skip
    )
    id2label = dict(enumerate(names))
    model = CMSAForImageClassification.from_pretrained(
        script_args.model_name_or_path,
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        ignore_mismatched_sizes=script_args.ignore_mismatched_sizes,
    )
    processor = CMSAImageProcessor.for_config(model.config)
    train_transform = ClassificationTransform(
        processor, "image", "label", "train", train=True, seed=training_args.seed,
        crop_padding=script_args.crop_padding, hflip_probability=script_args.hflip_probability,
        random_erasing_probability=script_args.random_erasing_probability,
    )  # fmt: skip
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"].with_transform(train_transform),
        eval_dataset=splits["validation"].with_transform(ClassificationTransform(processor, "image", "label", "validation")),
        data_collator=collate,
        processing_class=processor,
        compute_metrics=compute_metrics,
        callbacks=[AugmentationEpoch(train_transform)],
    )
    train_result = trainer.train()
    metrics = {**train_result.metrics, **trainer.evaluate()}
    trainer.save_model()
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    return metrics


if __name__ == "__main__":
    main()
