"""Decoded-in-memory classification data and the batched on-device augmentation (`cmsa_hf.data.device_augment`):
the same pixels as the per-image path, each augmentation doing what the per-image one does, draws only from torch's
generator (so a resumed run repeats them), clear errors."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from cmsa_hf import CMSAImageProcessor
from cmsa_hf.data.device_augment import DecodedImages, DeviceAugment, normalize
from cmsa_hf.data.image_classification import prepare_splits
from cmsa_hf.data.transforms import ClassificationTransform


@pytest.fixture(scope="module")
def split():
    """A prepared split of 10 random 12x10 RGB images (resized by the processor to 16x16), labels 0-2."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)) for _ in range(10)]
    dataset = datasets.Dataset.from_dict(
        {"image": images, "label": [i % 3 for i in range(10)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)}),
    )
    splits, _ = prepare_splits(datasets.DatasetDict({"train": dataset}))
    return splits["train"]


@pytest.fixture(scope="module")
def processor():
    return CMSAImageProcessor(size={"height": 16, "width": 16})


@pytest.fixture(scope="module")
def decoded(split, processor):
    return DecodedImages.from_split(split, processor, "image", "label", "train", chunk_size=4)  # chunks of 4, 4, 2


def test_decoded_images_normalize_to_the_per_image_evaluation_pixels(split, processor, decoded):
    assert decoded.images.dtype == torch.uint8 and decoded.images.shape == (10, 3, 16, 16)
    expected = ClassificationTransform(processor, "image", "label", "train")(split[:10])
    torch.testing.assert_close(normalize(decoded.images, processor), expected["pixel_values"], rtol=0, atol=1e-6)
    assert torch.equal(decoded.labels, expected["labels"])


def test_a_loader_fetches_whole_batches_by_indexing(decoded):
    loader = torch.utils.data.DataLoader(decoded, batch_size=4, collate_fn=DecodedImages.collate_fn)
    batches = list(loader)
    assert [len(batch["labels"]) for batch in batches] == [4, 4, 2]
    assert torch.equal(batches[1]["pixel_values"], decoded.images[4:8]) and decoded[5]["labels"] == decoded.labels[5]


def test_with_every_augmentation_off_it_is_normalize_and_draws_nothing(decoded, processor):
    state = torch.get_rng_state()
    output = DeviceAugment(processor, crop_padding=0, hflip_probability=0, random_erasing_probability=0)(decoded.images)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(output, normalize(decoded.images, processor))


def test_random_crop_takes_a_window_of_the_zero_padded_image(decoded, processor):
    torch.manual_seed(0)
    padding = 3
    pixels = decoded.images.float()
    cropped = DeviceAugment(processor, crop_padding=padding).random_crop(pixels)
    padded = torch.nn.functional.pad(pixels, [padding] * 4)
    offsets = []
    for image, source in zip(cropped, padded):
        matches = [
            (top, left) for top in range(2 * padding + 1) for left in range(2 * padding + 1)
            if torch.equal(image, source[:, top : top + 16, left : left + 16])
        ]  # fmt: skip
        assert matches, "a crop that is no window of the padded image"
        offsets.append(matches[0])
    assert len(set(offsets)) > 1  # offsets are drawn per image


def test_flip_mirrors_exactly_the_drawn_images(decoded, processor):
    augment = DeviceAugment(processor, crop_padding=0, hflip_probability=1.0, random_erasing_probability=0)
    assert torch.equal(augment(decoded.images), normalize(decoded.images.flip(-1), processor))
    torch.manual_seed(1)
    half = DeviceAugment(processor, crop_padding=0, hflip_probability=0.5, random_erasing_probability=0)(decoded.images)
    flipped = [torch.equal(a, b) for a, b in zip(half, normalize(decoded.images.flip(-1), processor))]
    kept = [torch.equal(a, b) for a, b in zip(half, normalize(decoded.images, processor))]
    assert all(f != k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < 10


def test_random_erasing_replaces_one_rectangle_of_the_drawn_area(decoded, processor):
    torch.manual_seed(2)
    clean = normalize(decoded.images, processor)
    erased = DeviceAugment(processor, crop_padding=0, hflip_probability=0, random_erasing_probability=1.0)(decoded.images)
    for before, after in zip(clean, erased):
        changed = (before != after).any(dim=0)
        rows, cols = changed.any(dim=1).nonzero().squeeze(1), changed.any(dim=0).nonzero().squeeze(1)
        assert len(rows) and len(cols), "p = 1 erases every image (16x16 always has a fitting draw)"
        box = changed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        assert box.float().mean() > 0.99  # one filled rectangle (noise equal to a pixel is improbable)
        assert 0.02 * 0.5 <= box.numel() / 256 <= 1 / 3 * 1.5  # the drawn area, up to rounding of the sides
        assert len(rows) < 16 and len(cols) < 16


def test_the_draws_come_from_torchs_generator(decoded, processor):
    augment = DeviceAugment(processor)
    torch.manual_seed(3)
    first = augment(decoded.images)
    torch.manual_seed(3)
    assert torch.equal(augment(decoded.images), first)
    assert not torch.equal(augment(decoded.images), first)


def test_bad_inputs_are_named(split, processor):
    with pytest.raises(ValueError, match="uint8 images"):
        DecodedImages(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="uint8 images"):
        DecodedImages(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    broken = split.cast_column("image", datasets.Image(decode=False)).map(
        lambda row, index: {"image": {"bytes": b"not an image", "path": None} if index == 7 else row["image"]},
        with_indices=True,
    )
    with pytest.raises(ValueError, match="Split 'train', row 7"):
        DecodedImages.from_split(broken, processor, "image", "label", "train")
