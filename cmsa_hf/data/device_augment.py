"""Image classification with the images decoded once and augmented on the training device, for GPUs that a
per-image CPU pipeline cannot keep busy.

`DecodedImages` decodes and resizes a split once (uint8 in memory: CIFAR-10's 50,000 images take 150 MB) and serves
whole batches by indexing. `DeviceAugment` is the per-image recipe of `ClassificationTransform` (random crop with
zero padding, horizontal flip, normalize, random erasing) as batched tensor operations on the batch's device; its
draws come from torch's generator of that device, which Accelerate checkpoints, so a resumed run is the same run.
"""

import math

import numpy as np
import torch

from .transforms import decode_image_of_row


class DecodedImages(torch.utils.data.Dataset):
    """A prepared classification split (`prepare_splits`: undecoded images, a `sample_index` column) decoded and
    resized by `processor` once: `images` (N, 3, H, W) uint8, `labels` (N,) int64.

    A loader fetches a batch with one indexing (`__getitems__`), so give it `collate_fn=DecodedImages.collate_fn`.
    Items are {"pixel_values": uint8 (3, H, W), "labels": int64}; `DeviceAugment` / `normalize` finish them.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"expected uint8 images (N, 3, H, W) and N labels, got {tuple(images.shape)} {images.dtype}")
        self.images, self.labels = images, labels

    @classmethod
    def from_split(cls, dataset, processor, image_column: str, label_column: str, split: str, chunk_size: int = 1024):
        """Decode `dataset` (errors name the split and row) and resize it with `processor`, `chunk_size` rows at
        a time."""
        images = []
        for start in range(0, len(dataset), chunk_size):
            rows = dataset[start : start + chunk_size]
            decoded = [
                decode_image_of_row(value, f"Split {split!r}, row {row}")
                for value, row in zip(rows[image_column], rows["sample_index"])
            ]
            resized = np.stack(processor(decoded, do_rescale=False, do_normalize=False).pixel_values)  # 0..255
            if not np.array_equal(resized, np.round(resized)) or resized.min() < 0 or resized.max() > 255:
                raise ValueError("the processor's resize gave values that are not 8-bit pixels; use the per-image path")
            images.append(torch.from_numpy(resized.astype(np.uint8)))
        return cls(torch.cat(images), torch.as_tensor(dataset[label_column], dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}

    def __getitems__(self, indices: list[int]) -> dict:
        indices = torch.as_tensor(indices)
        return {"pixel_values": self.images[indices], "labels": self.labels[indices]}

    @staticmethod
    def collate_fn(batch: dict) -> dict:
        """`__getitems__` already returns the batch."""
        return batch


def normalize(images: torch.Tensor, processor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 rescaled and normalized as the processor does (the evaluation inputs)."""
    mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() * processor.rescale_factor - mean) / std


class DeviceAugment:
    """The training recipe of `ClassificationTransform` on a uint8 batch on its device: random crop after zero
    padding by `crop_padding`, horizontal flip with `hflip_probability`, normalize, random erasing (one Gaussian
    noise rectangle, timm's "pixel" mode: area 2-33%, aspect 0.3-3.3, up to 10 tries) with
    `random_erasing_probability`. An augmentation that is off draws nothing. Returns float32 (B, 3, H, W)."""

    def __init__(
        self,
        processor,
        crop_padding: int = 4,
        hflip_probability: float = 0.5,
        random_erasing_probability: float = 0.25,
        erasing_scale: tuple[float, float] = (0.02, 1 / 3),
        erasing_ratio: tuple[float, float] = (0.3, 3.3),
        erasing_tries: int = 10,
    ):
        self.processor, self.crop_padding, self.hflip_probability = processor, crop_padding, hflip_probability
        self.random_erasing_probability = random_erasing_probability
        self.erasing_scale, self.erasing_ratio, self.erasing_tries = erasing_scale, erasing_ratio, erasing_tries

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.float()
        if self.crop_padding > 0:
            pixels = self.random_crop(pixels)
        if self.hflip_probability > 0:
            flip = torch.rand(len(pixels), device=pixels.device) < self.hflip_probability
            pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
        pixels = normalize(pixels, self.processor)
        if self.random_erasing_probability > 0:
            pixels = self.random_erasing(pixels)
        return pixels

    def random_crop(self, pixels: torch.Tensor) -> torch.Tensor:
        """Each image's H x W window at a random offset of the image zero-padded by `crop_padding` on each side."""
        batch, _, height, width = pixels.shape
        padded = torch.nn.functional.pad(pixels, [self.crop_padding] * 4)
        top, left = torch.randint(0, 2 * self.crop_padding + 1, (2, batch, 1), device=pixels.device)
        rows = (top + torch.arange(height, device=pixels.device))[:, :, None]  # (B, H, 1)
        cols = (left + torch.arange(width, device=pixels.device))[:, None, :]  # (B, 1, W)
        batch_index = torch.arange(batch, device=pixels.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch_index, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)

    def random_erasing(self, pixels: torch.Tensor) -> torch.Tensor:
        """Replace one rectangle per chosen image by standard normal noise: the first of `erasing_tries` draws of
        area and aspect that fits strictly inside the image (an image with none is left as it is)."""
        batch, _, height, width = pixels.shape
        device = pixels.device
        chosen = torch.rand(batch, device=device) < self.random_erasing_probability
        low, high = self.erasing_scale
        area = (low + (high - low) * torch.rand(batch, self.erasing_tries, device=device)) * height * width
        log_low, log_high = math.log(self.erasing_ratio[0]), math.log(self.erasing_ratio[1])
        aspect = torch.exp(log_low + (log_high - log_low) * torch.rand(batch, self.erasing_tries, device=device))
        box_h, box_w = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
        fits = (box_h > 0) & (box_h < height) & (box_w > 0) & (box_w < width)
        first = fits.int().argmax(dim=1, keepdim=True)
        box_h, box_w = box_h.gather(1, first).squeeze(1), box_w.gather(1, first).squeeze(1)
        top = torch.floor(torch.rand(batch, device=device) * (height - box_h + 1))
        left = torch.floor(torch.rand(batch, device=device) * (width - box_w + 1))
        rows = torch.arange(height, device=device).view(1, -1, 1)
        cols = torch.arange(width, device=device).view(1, 1, -1)
        inside = (
            (rows >= top.view(-1, 1, 1)) & (rows < (top + box_h).view(-1, 1, 1))
            & (cols >= left.view(-1, 1, 1)) & (cols < (left + box_w).view(-1, 1, 1))
        )  # fmt: skip
        erase = (inside & (chosen & fits.any(dim=1)).view(-1, 1, 1)).unsqueeze(1)  # (B, 1, H, W)
        return torch.where(erase, torch.randn_like(pixels), pixels)
