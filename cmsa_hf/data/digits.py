"""The embedded default data set: scikit-learn's handwritten digits (1,797 real 8x8 grayscale images)."""

import datasets
import numpy as np


def load_digits_dataset(validation_fraction: float = 0.2, seed: int = 0) -> datasets.DatasetDict:
    """Digits as a `DatasetDict` with a stratified held-out "validation" split.

    Columns: `image` (8x8 grayscale PIL image, 0-16 ink levels scaled to 0-255) and `label` (`ClassLabel` "0".."9").
    The data ship inside scikit-learn (UCI ML hand-written digits, Alpaydin and Kaynak 1998): no download.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    dataset = datasets.Dataset.from_dict(
        {"image": list(pixels), "label": digits.target.tolist()}, features=features
    )
    split = dataset.train_test_split(test_size=validation_fraction, seed=seed, stratify_by_column="label")
    return datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
