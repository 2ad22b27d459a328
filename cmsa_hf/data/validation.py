"""Checks that turn bad data sets into errors naming the split, row and column, before training starts."""

import io

import datasets
import numpy as np
from PIL import Image, UnidentifiedImageError


def require_columns(dataset: datasets.Dataset, columns: list[str], split: str):
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Split {split!r} has no column {', '.join(map(repr, missing))}; available columns: "
            f"{', '.join(dataset.column_names)}. Choose others with --image_column_name / --label_column_name."
        )


def require_rows(dataset: datasets.Dataset, split: str):
    if len(dataset) == 0:
        raise ValueError(f"Split {split!r} is empty: it needs at least one row")


def check_labels(dataset: datasets.Dataset, column: str, num_labels: int, split: str):
    """Class indices must be integers in [0, num_labels) (a float column is refused, even of whole numbers)."""
    labels = np.asarray(dataset[column])
    if not np.issubdtype(labels.dtype, np.integer):
        fractional = np.flatnonzero(labels != np.floor(labels)) if np.issubdtype(labels.dtype, np.floating) else []
        row = int(fractional[0]) if len(fractional) else 0
        raise ValueError(
            f"Split {split!r}, row {row}: label {labels[row].item()!r} is not an integer class index (column {column!r} "
            f"holds {labels.dtype} values): cast it, e.g. dataset.cast_column({column!r}, datasets.Value('int64'))"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= num_labels))
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"Split {split!r}, row {row}: label {labels[row]} is outside [0, {num_labels}) "
            f"({bad.size} such rows; num_labels={num_labels})"
        )


def decode_image(value) -> Image.Image:
    """An image from a `datasets.Image(decode=False)` cell ({"bytes", "path"}), a PIL image or an array."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    if value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
    else:
        image = Image.open(value["path"])
    image.load()
    return image


def without_image_decoding(dataset: datasets.Dataset, column: str) -> datasets.Dataset:
    """Keep the image column undecoded, so that a bad file is reported with its row instead of deep in a loader."""
    if isinstance(dataset.features.get(column), datasets.Image):
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def find_undecodable_images(dataset: datasets.Dataset, column: str) -> list[int]:
    """Rows of an undecoded image column that PIL cannot read."""
    bad = []
    for row, value in enumerate(dataset[column]):
        try:
            decode_image(value)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            bad.append(row)
    return bad


def check_images(dataset: datasets.Dataset, column: str, split: str, skip_corrupt: bool) -> datasets.Dataset:
    """Raise on the first unreadable image (naming split and row), or drop them all and say how many."""
    bad = find_undecodable_images(dataset, column)
    if not bad:
        return dataset
    if not skip_corrupt:
        raise ValueError(
            f"Split {split!r}, row {bad[0]}: the image cannot be decoded ({len(bad)} unreadable images in this "
            "split). Fix the files, or pass --skip_corrupt_images to drop them."
        )
    print(f"Skipping {len(bad)} unreadable images in split {split!r} (rows {bad[:10]}{' ...' if len(bad) > 10 else ''})")
    keep = sorted(set(range(len(dataset))) - set(bad))
    return dataset.select(keep)
