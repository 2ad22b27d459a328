"""Fine-tune a saved CMSA classifier with `transformers.Trainer` on an image folder, a Hub data set or the embedded
digits, and write the same Hub-ready folder as `cmsa-hf train image-classification` (weights, processor, card,
all_results.json).

    cmsa-hf finetune image-classification --model_name_or_path outputs/digits-cmsa-s \
        --train_dir my_images/ --output_dir outputs/finetuned --num_train_epochs 3 --learning_rate 5e-4 \
        --per_device_train_batch_size 32 --eval_strategy epoch --save_strategy epoch

Every `TrainingArguments` flag is available. The head is re-initialised when the data's classes differ from the
checkpoint's (`--ignore_mismatched_sizes`). With `--push_to_hub` the folder is uploaded at the end with its CMSA
card (every upload, checkpoint pushes included, carries a CMSA card and the image processor).
"""

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from ..data.image_classification import card_data_fields, load_splits, prepare_splits
from ..data.transforms import ClassificationTransform
from ..hub import card_for_repo, image_classification_card, pushed_model_card, write_hub_folder
from ..image_processing_cmsa import CMSAImageProcessor
from ..metrics import top_k_accuracy
from ..modeling_cmsa import CMSAForImageClassification
from .image_classification import ImageClassificationTask


RECIPE = ImageClassificationTask.recipe


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "A saved CMSA classifier folder or Hub id."})
    base_model_id: str | None = field(
        default=None, metadata={"help": "The Hub id a local --model_name_or_path was downloaded from (card base_model)."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit on the Hub."})
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub data set id, or 'digits'."})
    dataset_config_name: str | None = None
    hub_dataset_id: str | None = field(default=None, metadata={"help": "The Hub data set the data is (card)."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder or zip archive, one subfolder per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "Default: the data set's own, or a share held out."})
    train_val_split: float = 0.1
    ignore_mismatched_sizes: bool = field(default=True, metadata={"help": "Re-initialise a head of another size."})
    crop_padding: int = RECIPE["crop_padding"]
    hflip_probability: float = RECIPE["hflip_probability"]
    random_erasing_probability: float = 0.0  # off for fine-tuning (the from-scratch recipe's is RECIPE's)


class CMSATrainer(Trainer):
    """`Trainer` with the model's own weight-decay exemptions (`no_weight_decay()`, as the Accelerate scripts use):
    Trainer's rule (names containing "bias" or "norm", LayerNorm modules) would decay the BatchNorm scales."""

    card: ModelCard | None = None
    """The run's CMSA card once it is measured; until then an upload carries `pushed_model_card`."""

    def get_decay_parameter_names(self, model) -> list[str]:
        exempt = model.no_weight_decay()
        return [name for name, _ in model.named_parameters() if name not in exempt]

    def create_model_card(self, *args, **kwargs):
        """Write the CMSA card (task metadata, measured results, data) where `push_to_hub` would write Trainer's
        generic draft, named for the repository."""
        if not self.is_world_process_zero():
            return
        repo_id = self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).name
        card = card_for_repo(self.card, repo_id) if self.card is not None else pushed_model_card(self.model, repo_id)
        card.save(Path(self.args.output_dir) / "README.md")


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
    logits, labels = torch.from_numpy(prediction.predictions), torch.from_numpy(prediction.label_ids)
    return {"accuracy": round(top_k_accuracy(logits, labels, 1), 4), "top5_accuracy": round(top_k_accuracy(logits, labels, 5), 4)}


def finetune(argv=None, prog: str | None = None) -> dict:
    """Fine-tune as the command line `argv` says (default: `sys.argv`) and write the Hub-ready folder. Returns the
    metrics written to `all_results.json`."""
    parser = HfArgumentParser(
        (ScriptArguments, TrainingArguments), prog=prog, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    script_args, training_args = parser.parse_args_into_dataclasses(argv)
    # The transform needs the raw `image` and `sample_index` columns, which Trainer would drop as unused inputs.
    training_args.remove_unused_columns = False
    if script_args.dataset_name is None and script_args.train_dir is None:
        raise ValueError("give --dataset_name (a Hub id or 'digits') or --train_dir")
    splits, names = prepare_splits(
        load_splits(
            script_args.dataset_name, script_args.dataset_config_name, script_args.train_dir,
            script_args.validation_dir, script_args.train_val_split, training_args.seed,
        )  # fmt: skip
    )
    id2label = dict(enumerate(names))
    model = CMSAForImageClassification.from_pretrained(
        script_args.model_name_or_path,
        revision=script_args.model_revision,
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
    trainer = CMSATrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"].with_transform(train_transform),
        eval_dataset=splits["validation"].with_transform(ClassificationTransform(processor, "image", "label", "validation")),
        data_collator=collate,
        processing_class=processor,
        compute_metrics=compute_metrics,
        callbacks=[AugmentationEpoch(train_transform)],
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # output_dir holds the trained model before evaluation: a failing one loses no training
    metrics = {
        **train_result.metrics, **trainer.evaluate(), "train_samples": len(splits["train"]),
        "eval_samples": len(splits["validation"]),
    }  # fmt: skip
    trainer.log_metrics("all", metrics)
    trainer.card = _card(model, metrics, script_args, training_args)
    if trainer.is_world_process_zero():
        write_hub_folder(training_args.output_dir, model, processor, metrics, trainer.card)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return metrics


def _card(model, metrics, script_args, training_args):
    data = card_data_fields(
        script_args.dataset_name, script_args.train_dir, script_args.validation_dir, training_args.seed,
        script_args.hub_dataset_id,
    )  # fmt: skip
    return image_classification_card(
        model.eval(), metrics, **data,
        training_script="cmsa-hf finetune image-classification (transformers Trainer)",
        repo_id=training_args.hub_model_id or Path(training_args.output_dir).name,
        base_model=script_args.model_name_or_path, base_model_id=script_args.base_model_id, has_reparameterized=False,
        hyperparameters={
            "learning rate (peak)": training_args.learning_rate,
            "learning-rate schedule": f"{training_args.lr_scheduler_type}, warmup {training_args.warmup_steps} steps",
            "batch size (per device)": training_args.per_device_train_batch_size,
            "epochs": training_args.num_train_epochs,
            "weight decay": training_args.weight_decay,
            "random crop padding / h-flip / random erasing": f"{script_args.crop_padding} / "
            f"{script_args.hflip_probability} / {script_args.random_erasing_probability}",
            "seed": training_args.seed,
        },
    )  # fmt: skip
