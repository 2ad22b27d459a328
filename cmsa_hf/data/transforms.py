"""Training-time augmentation for classification (the DeiT recipe of the paper), without torchvision.

Per-sample randomness comes from a generator seeded by (seed, epoch, row), not from a global state: the same run
draws the same augmentations whatever the loader prefetches, however many workers it uses, and after a resume.
Batch-level mixing (mixup / cutmix) runs in the training loop on torch's global generator, which Accelerate
checkpoints.
"""

import math

import numpy as np
import torch

from .validation import decode_image


def random_crop_with_padding(image: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-pad a (C, H, W) image by `padding` on each side and crop a random H x W window back out."""
    if padding <= 0:
        return image
    _, height, width = image.shape
    padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)))
    top, left = rng.integers(0, 2 * padding + 1, size=2)
    return padded[:, top : top + height, left : left + width]


def random_erasing(
    image: torch.Tensor,
    rng: np.random.Generator,
    probability: float = 0.25,
    scale: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """Replace one random rectangle of a normalized (C, H, W) image by Gaussian noise (timm's "pixel" mode)."""
    if rng.random() >= probability:
        return image
    channels, height, width = image.shape
    for _ in range(10):
        area = rng.uniform(*scale) * height * width
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        box_h, box_w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < box_h < height and 0 < box_w < width:
            top, left = rng.integers(0, height - box_h + 1), rng.integers(0, width - box_w + 1)
            image = image.clone()
            noise = rng.standard_normal((channels, box_h, box_w)).astype(np.float32)
            image[:, top : top + box_h, left : left + box_w] = torch.from_numpy(noise)
            return image
    return image


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing + off)


def mix_batch(
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    probability: float = 1.0,
    switch_probability: float = 0.5,
    label_smoothing: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix each sample with the batch reversed; returns the mixed pixels and soft targets."""
    targets = smoothed_one_hot(labels, num_classes, label_smoothing)
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or torch.rand(()) >= probability:
        return pixel_values, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(()) < switch_probability)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = pixel_values.flip(0)
    if use_cutmix:
        height, width = pixel_values.shape[-2:]
        cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        centre_y, centre_x = int(torch.randint(height, ())), int(torch.randint(width, ()))
        top, bottom = max(centre_y - cut_h // 2, 0), min(centre_y + cut_h // 2, height)
        left, right = max(centre_x - cut_w // 2, 0), min(centre_x + cut_w // 2, width)
        pixel_values = pixel_values.clone()
        pixel_values[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (height * width)
    else:
        pixel_values = pixel_values * lam + partner * (1 - lam)
    return pixel_values, targets * lam + targets.flip(0) * (1 - lam)


class ClassificationTransform:
    """`Dataset.with_transform` callable: decode, resize (the image processor), augment, normalize.

    Expects the rows to carry a `sample_index` column (their position in the split) and the image column
    undecoded (`datasets.Image(decode=False)`), so a broken file is reported with its row. Set `epoch` before
    each epoch when training. Returns `pixel_values` (batch, 3, H, W) and `labels` (batch,).
    """

    def __init__(
        self,
        processor,
        image_column: str,
        label_column: str,
        split: str,
        train: bool = False,
        seed: int = 0,
        crop_padding: int = 4,
        hflip_probability: float = 0.5,
        random_erasing_probability: float = 0.25,
    ):
        self.processor, self.image_column, self.label_column, self.split = processor, image_column, label_column, split
        self.train, self.seed, self.epoch = train, seed, 0
        self.crop_padding, self.hflip_probability = crop_padding, hflip_probability
        self.random_erasing_probability = random_erasing_probability
        self.mean = np.asarray(processor.image_mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(processor.image_std, dtype=np.float32).reshape(-1, 1, 1)

    def _decode(self, value, row: int):
        try:
            return decode_image(value)
        except Exception as error:
            raise ValueError(f"Split {self.split!r}, row {row}: the image cannot be decoded ({error})") from error

    def __call__(self, batch: dict) -> dict:
        rows = batch["sample_index"]
        images = [self._decode(value, row) for value, row in zip(batch[self.image_column], rows)]
        if not self.train:
            pixel_values = self.processor(images, return_tensors="pt").pixel_values
            return {"pixel_values": pixel_values, "labels": torch.as_tensor(batch[self.label_column])}

        resized = self.processor(images, do_rescale=False, do_normalize=False).pixel_values  # (C, H, W), 0..255
        out = []
        for image, row in zip(resized, rows):
            rng = np.random.default_rng([self.seed, self.epoch, row])
            image = random_crop_with_padding(np.asarray(image, dtype=np.float32), self.crop_padding, rng)
            if rng.random() < self.hflip_probability:
                image = image[:, :, ::-1]
            image = (image * self.processor.rescale_factor - self.mean) / self.std
            out.append(random_erasing(torch.from_numpy(np.ascontiguousarray(image)), rng, self.random_erasing_probability))
        return {"pixel_values": torch.stack(out), "labels": torch.as_tensor(batch[self.label_column])}
