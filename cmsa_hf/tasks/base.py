"""`Task`: what a training task tells `cmsa_hf.tasks.run`, which owns everything the tasks share (flags, Accelerate,
seeding, the train loop, checkpoints and resume, the gathered evaluation, the Hub-ready folder).

A fourth task subclasses `Task` and fills in its attributes and hooks; `run` checks its `extras`, then calls the
hooks in this order:

    add_arguments(parser)          its own flags (the runner adds the common ones: model, recipe, checkpoints, Hub)
    check_arguments(args, parser)  argument checks across flags (`parser.error(...)`)
    load_data(args)                {"train": Dataset, "validation": Dataset} (main process first)
    create_model(args, data)       (model, processor); may fit `data` to the model
    loader_datasets(args, data, model, processor) what the loaders read: by default the splits under
                                                  transforms(args, model, processor) (train transform with an
                                                  `epoch` attribute, eval transform)
    set_epoch(epoch)                              before each epoch: re-seeds the train transform's augmentation
    model_inputs(args, batch, train)              a loader batch, on the device, as the model takes it
    compute_loss(args, model, batch)              one training batch's loss
    evaluation_outputs(args, model, batch)        {name: tensor with the batch as first dim}, gathered by the runner
    compute_metrics(args, outputs, name)          the metrics of the whole split (main process; the runner shares them)
    card_fields(args), hyperparameters(args)      what the model card says about the data and the task's recipe

A `Task` instance serves one run: hooks keep on `self` what later hooks need (the label names, a codec).
"""

import argparse

import torch

from ..configuration_cmsa import CMSAConfig
from ..image_processing_cmsa import CMSAImageProcessor


def memory_format(args) -> torch.memory_format:
    """The run's memory format of images and convolution weights (`--channels_last`)."""
    return torch.channels_last if args.channels_last else torch.contiguous_format


class Task:
    """The base of the cmsa_hf training tasks. Subclasses set the class attributes and implement the hooks."""

    name: str = ""
    """The Hub task id, e.g. "image-classification"."""
    train_transform = None
    """Set by `loader_datasets` (the default one); re-seeded by `set_epoch`."""
    model_class: type | None = None
    """The `CMSAPreTrainedModel` subclass trained, e.g. `CMSAForImageClassification`."""
    make_card = None
    """The `cmsa_hf.hub` card function of the task (a template in `cmsa_hf/model_cards/`)."""
    extras: tuple[str, ...] = ("train",)
    """The cmsa_hf extras the task needs (`cmsa_hf.extras.EXTRAS`), checked before any data is read."""
    training_unit: str = "samples"
    """What one training example is, in error messages ("images", "faces")."""
    offers_eval_before_training: bool = False
    """Whether the task takes `--eval_before_training` (its results then hold `initial_eval_*`)."""
    recipe: dict = {
        "image_size": None,  # None: the variant's (from scratch) or the checkpoint's
        "learning_rate": 2.5e-3,
        "min_learning_rate": 1e-5,
        "lr_scheduler_type": "cosine_with_min_lr",
        "weight_decay": 0.05,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "per_device_train_batch_size": 128,
        "per_device_eval_batch_size": 256,
        "num_train_epochs": 300,
        "num_warmup_epochs": 5,
        "drop_path_rate": 0.1,
    }
    """The paper's recipe: defaults of the common flags and of the task's own (subclasses extend this dict)."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the task's flags (data, task model options, augmentation); their defaults may come from `recipe`."""

    def check_arguments(self, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
        """Reject combinations of flags with `parser.error(message)`."""

    def load_data(self, args) -> dict:
        """The splits {"train": Dataset, "validation": Dataset}, validated; rows need a `sample_index` column."""
        raise NotImplementedError

    def create_model(self, args, data: dict) -> tuple[torch.nn.Module, CMSAImageProcessor]:
        """The model (`load_or_create_model`) and its processor."""
        model = self.load_or_create_model(args)
        return model, CMSAImageProcessor.for_config(model.config)

    def transforms(self, args, model, processor) -> tuple:
        """(train transform, eval transform) for `Dataset.with_transform`; the train one has an `epoch` attribute
        that the runner sets at each epoch (per-sample augmentation seeded by seed, epoch and row)."""
        raise NotImplementedError

    def loader_datasets(self, args, data: dict, model, processor) -> tuple:
        """(train dataset, eval dataset) for the loaders: by default `data`'s splits under `transforms`. A dataset
        with a `collate_fn` attribute is loaded with it."""
        self.train_transform, eval_transform = self.transforms(args, model, processor)
        return data["train"].with_transform(self.train_transform), data["validation"].with_transform(eval_transform)

    def set_epoch(self, epoch: int) -> None:
        """Called before each training epoch: the train transform's per-sample augmentation is seeded by (seed,
        epoch, row). Nothing to do when `loader_datasets` made no train transform."""
        if self.train_transform is not None:
            self.train_transform.epoch = epoch

    def model_inputs(self, args, batch: dict, train: bool) -> dict:
        """A loader batch (already on the device) as `compute_loss` / `evaluation_outputs` take it: by default its
        `pixel_values` in the run's memory format (`--channels_last`)."""
        return {**batch, "pixel_values": batch["pixel_values"].contiguous(memory_format=memory_format(args))}

    def compute_loss(self, args, model, batch: dict) -> torch.Tensor:
        """The loss of one training batch (after `model_inputs`)."""
        raise NotImplementedError

    def evaluation_outputs(self, args, model, batch: dict) -> dict[str, torch.Tensor]:
        """What one evaluation batch contributes to the metrics: tensors whose first dimension is the batch. The
        runner gathers them across processes (`gather_for_metrics`: each sample once) and concatenates them."""
        raise NotImplementedError

    def compute_metrics(self, args, outputs: dict[str, torch.Tensor], name: str) -> dict:
        """The metrics (`eval_*` keys, and `eval_samples`) of the whole split from the gathered `outputs`; `name` says
        which evaluation this is ("initial", "epoch_3", "eval": the final one). Runs on the main process only."""
        raise NotImplementedError

    def card_fields(self, args) -> dict:
        """Keyword arguments of `make_card` that describe the data and the evaluation."""
        return {}

    def hyperparameters(self, args) -> dict:
        """The task's rows of the card's hyperparameter table (the runner adds the optimisation rows)."""
        return {}

    def load_or_create_model(self, args, **config_overrides) -> torch.nn.Module:
        """`--model_name_or_path` (a folder or Hub id; its image size must equal `--image_size` when given) or, from
        scratch, the `--variant` preset at `--image_size`. `config_overrides` (None values skipped) set task fields of
        either, such as another head on a checkpoint of another task (its new weights are initialised)."""
        extra = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
        config_overrides = {key: value for key, value in config_overrides.items() if value is not None}
        if args.model_name_or_path:
            model = self.model_class.from_pretrained(
                args.model_name_or_path, revision=args.model_revision, drop_path_rate=args.drop_path_rate,
                ignore_mismatched_sizes=args.ignore_mismatched_sizes, **config_overrides, **extra,
            )  # fmt: skip
        else:
            size = {"image_size": tuple(args.image_size)} if args.image_size else {}
            config = CMSAConfig.from_variant(
                args.variant, drop_path_rate=args.drop_path_rate, **size, **config_overrides, **extra
            )
            model = self.model_class(config)
        if args.image_size and tuple(args.image_size) != tuple(model.config.image_size):
            raise ValueError(
                f"--image_size {tuple(args.image_size)} differs from the checkpoint's image_size "
                f"{tuple(model.config.image_size)}; CMSA's attention windows are sized for one input resolution"
            )
        if args.gradient_checkpointing:
            model.activation_checkpointing_enable()
        return model
