import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from cmsa_hf import CMSAImageProcessor
from cmsa_hf.data.digits import load_digits_dataset
from cmsa_hf.data.transforms import (
    ClassificationTransform,
    mix_batch,
    random_crop_with_padding,
    random_erasing,
    smoothed_one_hot,
)


def test_digits_are_real_and_split_stratified():
    splits = load_digits_dataset()
    assert (len(splits["train"]), len(splits["validation"])) == (1437, 360)
    image = splits["train"][0]["image"]
    assert image.size == (8, 8) and image.mode == "L"
    counts = np.bincount(splits["validation"]["label"], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # every digit about 10% of the held-out split


def test_random_crop_with_padding_shifts_content():
    image = np.arange(2 * 6 * 6, dtype=np.float32).reshape(2, 6, 6) + 1
    rng = np.random.default_rng(0)
    crops = [random_crop_with_padding(image, 2, rng) for _ in range(20)]
    assert all(c.shape == image.shape for c in crops)
    assert any(not np.array_equal(c, image) for c in crops)
    assert np.array_equal(random_crop_with_padding(image, 0, rng), image)


def test_random_erasing_replaces_one_rectangle():
    image = torch.zeros(3, 16, 16)
    assert torch.equal(random_erasing(image, np.random.default_rng(0), probability=0.0), image)
    erased = random_erasing(image, np.random.default_rng(0), probability=1.0)
    changed = (erased != 0).any(dim=0)
    rows, cols = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
    assert changed.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a full rectangle
    assert 0 < changed.sum() < 16 * 16


def test_smoothed_one_hot_and_mixing():
    labels = torch.tensor([0, 2, 1, 2])
    targets = smoothed_one_hot(labels, 3, 0.1)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))
    assert targets[0, 0] == pytest.approx(0.9 + 0.1 / 3)

    pixels = torch.randn(4, 3, 8, 8)
    same, plain = mix_batch(pixels, labels, 3, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0)
    assert torch.equal(same, pixels) and torch.equal(plain, torch.nn.functional.one_hot(labels, 3).float())

    torch.manual_seed(0)
    mixed, soft = mix_batch(pixels, labels, 3, mixup_alpha=0.8, cutmix_alpha=0, label_smoothing=0)
    lam = soft[0, labels[0]].item()  # labels[0] != labels[-1]: the weight of sample 0's own class
    torch.testing.assert_close(mixed[0], lam * pixels[0] + (1 - lam) * pixels[-1])

    torch.manual_seed(1)
    cut, soft = mix_batch(pixels, labels, 3, mixup_alpha=0, cutmix_alpha=1.0, label_smoothing=0)
    from_partner = (cut[0] == pixels[-1]).all(dim=0) & (cut[0] != pixels[0]).any(dim=0)
    torch.testing.assert_close(soft[0, labels[-1]], from_partner.float().mean())  # lam is the pasted area


def _rows(count):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)) for _ in range(count)]
    dataset = datasets.Dataset.from_dict({"image": images, "label": list(range(count))})
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    return dataset.add_column("sample_index", list(range(count)))


def test_augmentation_depends_only_on_seed_epoch_and_row():
    processor = CMSAImageProcessor(size={"height": 8, "width": 8})
    transform = ClassificationTransform(processor, "image", "label", "train", train=True, seed=3)
    dataset = _rows(4)
    together = transform(dataset[:4])["pixel_values"]
    one_by_one = torch.cat([transform(dataset[i : i + 1])["pixel_values"] for i in (2, 0, 3, 1)])
    torch.testing.assert_close(one_by_one, together[[2, 0, 3, 1]])
    transform.epoch = 1
    assert not torch.equal(transform(dataset[:4])["pixel_values"], together)


def test_evaluation_transform_is_the_processor():
    processor = CMSAImageProcessor(size={"height": 8, "width": 8})
    dataset = _rows(2)
    out = ClassificationTransform(processor, "image", "label", "validation")(dataset[:2])
    images = [Image.open(io.BytesIO(v["bytes"])) for v in dataset[:2]["image"]]
    torch.testing.assert_close(out["pixel_values"], processor(images, return_tensors="pt").pixel_values)
    assert out["labels"].tolist() == [0, 1]


def _png_bytes(value: int) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.mark.parametrize(
    "labels, message",
    [
        ([0.0, 1.0, 1.5, 0.0], r"Split 'train', row 2: label 1.5 is not an integer class index \(column 'label' holds float64"),
        ([0.0, 1.0, 1.0, 0.0], r"Split 'train', row 0: label 0.0 is not an integer class index"),
        ([0.0, float("nan"), 1.0, 0.0], r"Split 'train', row 1: label nan is not an integer class index"),
    ],
    ids=["fractional", "whole-floats", "nan"],
)
def test_float_class_labels_in_an_image_folder_split_are_refused(labels, message):
    from cmsa_hf.data.image_classification import prepare_splits

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("float64")})
    train = datasets.Dataset.from_dict({"image": [_png_bytes(40 * i) for i in range(4)], "label": labels}, features=features)
    with pytest.raises(ValueError, match=message):
        prepare_splits(datasets.DatasetDict({"train": train, "validation": train}))
