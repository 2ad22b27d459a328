"""Image classification data: Hub data sets, image folders / zip archives, or the embedded digits, as validated
`datasets` splits ready for `ClassificationTransform`."""

from pathlib import Path

import datasets

from ..hub import dataset_name_of_folder
from .digits import load_digits_dataset
from .validation import check_images, check_labels, require_columns, require_rows, without_image_decoding


def card_data_fields(dataset_name, train_dir, validation_dir, seed: int, hub_dataset_id=None) -> dict:
    """What `hub.image_classification_card` says about the data of `load_splits(dataset_name, ..., train_dir,
    validation_dir, seed=seed)`: its name, Hub id (`hub_dataset_id`, else a Hub `dataset_name`; None for the embedded
    digits and local folders), description, and the split evaluated on (a Hub data set's own validation split or
    `validation_dir`, else a seeded share held out from `train`)."""
    from_hub = dataset_name not in (None, "digits")
    if dataset_name == "digits":
        description = (
            "scikit-learn's handwritten digits (`sklearn.datasets.load_digits`: 1,797 8x8 grayscale images of the "
            "digits 0-9, UCI ML hand-written digits), upsampled to the model's input size"
        )
    else:
        description = f"the Hub data set `{dataset_name}`" if from_hub else f"the image folder `{Path(train_dir).name}`"
    has_validation = validation_dir is not None or from_hub
    return {
        "dataset_name": dataset_name or dataset_name_of_folder(train_dir),
        "hub_dataset_id": hub_dataset_id or (dataset_name if from_hub else None),
        "dataset_description": description,
        "eval_split": "validation" if has_validation else "held-out",
        "eval_split_description": "the data set's validation split" if has_validation
        else f"held out from the training data with seed {seed}",
    }  # fmt: skip


def load_splits(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    train_val_split: float = 0.1,
    seed: int = 0,
) -> datasets.DatasetDict:
    """`train` and `validation` splits. `dataset_name="digits"` is the embedded default; a Hub id needs a network.

    Without a validation split, the data set's `test` split is used, or a seeded share of `train` is held out.
    """
    if dataset_name == "digits":
        splits = load_digits_dataset(seed=seed)
    elif dataset_name is not None:
        splits = datasets.load_dataset(dataset_name, dataset_config_name)
    elif train_dir is not None:
        files = {"train": _data_files(train_dir)}
        if validation_dir:
            files["validation"] = _data_files(validation_dir)
        splits = datasets.load_dataset("imagefolder", data_files=files)
    else:
        raise ValueError("Give a dataset_name (a Hub id or 'digits') or a train_dir")
    if "train" not in splits:
        raise ValueError(f"The data set has no 'train' split; it has {', '.join(splits)}")
    if "validation" in splits:
        validation = splits["validation"]
    elif "test" in splits:
        validation = splits["test"]
    else:
        carved = splits["train"].train_test_split(test_size=train_val_split, seed=seed)
        splits, validation = {"train": carved["train"]}, carved["test"]
    return datasets.DatasetDict({"train": splits["train"], "validation": validation})


def _data_files(path: str) -> str:
    """A glob over an image folder; a zip archive is first extracted (once, into the `datasets` cache)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist")
    if Path(path).suffix == ".zip":
        path = datasets.DownloadManager().extract(path)
    return str(Path(path) / "**")


def prepare_splits(
    splits: datasets.DatasetDict,
    image_column: str = "image",
    label_column: str = "label",
    max_samples: dict[str, int | None] | None = None,
    skip_corrupt_images: bool = False,
    seed: int = 0,
) -> tuple[datasets.DatasetDict, list[str]]:
    """Validate columns, rows, labels and images of every split (errors name the split and row).

    Returns the splits with the image column undecoded and a `sample_index` column (for per-sample seeding and
    error messages), and the label names.
    """
    max_samples = max_samples or {}
    for split in splits:
        dataset = splits[split]
        require_columns(dataset, [image_column, label_column], split)
        if max_samples.get(split) is not None:
            dataset = dataset.shuffle(seed=seed).select(range(min(max_samples[split], len(dataset))))
        require_rows(dataset, split)
        splits[split] = without_image_decoding(dataset, image_column)
    feature = splits["train"].features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = feature.names
    else:
        names = [str(i) for i in range(int(max(splits["train"][label_column])) + 1)]
    for split in splits:
        check_labels(splits[split], label_column, len(names), split)
        dataset = check_images(splits[split], image_column, split, skip_corrupt_images)
        require_rows(dataset, split)
        splits[split] = dataset.add_column("sample_index", list(range(len(dataset))))
    return splits, names
