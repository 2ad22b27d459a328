"""Training-time augmentation, without torchvision: classification (the DeiT recipe of the paper) and top-down
pose (flip with left / right swap, half body, scale, rotation, random erasing; keypoints move with the pixels) and
head pose (face box jitter, flip negating yaw and roll).

Per-sample randomness comes from a generator seeded by (seed, epoch, row), not from a global state: the same run
draws the same augmentations whatever the loader prefetches, however many workers it uses, and after a resume.
Batch-level mixing (mixup / cutmix) runs in the training loop on torch's global generator, which Accelerate
checkpoints.
"""

import math

import numpy as np
import torch

from ..codecs import mirror_angles
from ..configuration_cmsa import COCO_UPPER_BODY_KEYPOINTS
from ..geometry import (
    box_to_center_and_size, crop_matrix, flip_horizontally, mirror_matrix, points_to_center_and_size, swap_pairs,
    transform_points, warp_image,
)  # fmt: skip
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


def decode_image_of_row(value, where: str):
    """`decode_image`, its failure a ValueError that says `where` (split, row, file) the image is."""
    try:
        return decode_image(value)
    except Exception as error:
        raise ValueError(f"{where}: the image cannot be decoded ({error})") from error


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
        return decode_image_of_row(value, f"Split {self.split!r}, row {row}")

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
                image = flip_horizontally(image)
            image = (image * self.processor.rescale_factor - self.mean) / self.std
            out.append(random_erasing(torch.from_numpy(np.ascontiguousarray(image)), rng, self.random_erasing_probability))
        return {"pixel_values": torch.stack(out), "labels": torch.as_tensor(batch[self.label_column])}


def half_body_region(keypoints, visibility, upper_body, aspect_ratio: float, rng: np.random.Generator):
    """HRNet's half-body augmentation: the (centre, size) of the visible upper or lower body, or None."""
    visible = np.flatnonzero(np.asarray(visibility) > 0)
    upper = [i for i in visible if i in upper_body]
    lower = [i for i in visible if i not in upper_body]
    chosen = upper if (rng.random() < 0.5 and len(upper) > 2) else lower
    if len(chosen) < 2:
        chosen = upper if len(upper) >= 2 else []
    if len(chosen) < 2:
        return None
    return points_to_center_and_size(np.asarray(keypoints)[chosen], aspect_ratio, padding=1.5)


class _BoxCropTransform:
    """What the box-crop transforms share: the per-sample generator and the (augmented) crop itself."""

    def sample_generator(self, row_id: int) -> np.random.Generator | None:
        """The augmentation draws of a row: seeded by (seed, epoch, row) when training, none otherwise."""
        return np.random.default_rng([self.seed, self.epoch, row_id]) if self.train else None

    def crop(self, image_value, matrix: np.ndarray, rng: np.random.Generator | None, row_id: int) -> torch.Tensor:
        """Decode a row's image and warp it under `matrix`: (3, H, W) normalized, randomly erased when training.
        An image that cannot be decoded (a truncated file) is a ValueError naming the row and the file."""
        path = image_value.get("path") if isinstance(image_value, dict) else None
        image = decode_image_of_row(image_value, f"Row {row_id}" + (f" ({path})" if path else "")).convert("RGB")
        crop = torch.from_numpy(self.processor.normalize_crop(warp_image(image, matrix, self.processor.input_size)))
        return random_erasing(crop, rng, self.random_erasing_probability) if rng is not None else crop


class TopDownTransform(_BoxCropTransform):
    """`Dataset.with_transform` callable for pose rows (`cmsa_hf.data.coco`): crop each person, encode its targets.

    Training draws, per sample from (seed, epoch, row): half body (p 0.3, when more than `half_body_min_keypoints`
    keypoints are visible: the visible `upper_body` keypoints or the others; never when `upper_body` is empty),
    scale (x clip(1 + 0.35 N, 0.65, 1.35)), rotation (p 0.6, clip(45 N, -90, 90) degrees), horizontal flip (p 0.5,
    `flip_pairs` swapped) and random erasing, all as one affine warp that the keypoints follow. Take `flip_pairs`
    and `upper_body` from the model's config (`config.flip_pairs`, `config.upper_body_keypoints`). Returns
    `pixel_values` (B, 3, H, W), `target_heatmaps` (B, K, h, w), `target_weights` (B, K) and `sample_index`.
    """

    def __init__(
        self,
        processor,
        codec,
        flip_pairs,
        train: bool = False,
        seed: int = 0,
        flip_probability: float = 0.5,
        half_body_probability: float = 0.3,
        scale_factor: float = 0.35,
        rotation_factor: float = 45.0,
        rotation_probability: float = 0.6,
        random_erasing_probability: float = 0.0,
        upper_body=COCO_UPPER_BODY_KEYPOINTS,
        half_body_min_keypoints: int = 8,
    ):
        self.processor, self.codec, self.flip_pairs = processor, codec, flip_pairs
        self.train, self.seed, self.epoch = train, seed, 0
        self.flip_probability, self.half_body_probability = flip_probability, half_body_probability
        self.scale_factor, self.rotation_factor, self.rotation_probability = scale_factor, rotation_factor, rotation_probability
        self.random_erasing_probability, self.upper_body = random_erasing_probability, set(upper_body)
        self.half_body_min_keypoints = half_body_min_keypoints

    def crop_geometry(self, row: dict, rng: np.random.Generator | None) -> tuple[np.ndarray, bool]:
        """The crop matrix (image -> crop) of a row and whether it mirrors; random when `rng` is given."""
        height, width = self.processor.input_size
        aspect = width / height
        centre, size = box_to_center_and_size(row["box"], aspect, self.processor.box_padding)
        rotation, mirror = 0.0, False
        if rng is not None:
            visibility = np.asarray(row["visibility"])
            enough = self.upper_body and (visibility > 0).sum() > self.half_body_min_keypoints
            if enough and rng.random() < self.half_body_probability:
                region = half_body_region(row["keypoints"], visibility, self.upper_body, aspect, rng)
                if region is not None:
                    centre, size = region
            size = size * np.clip(rng.standard_normal() * self.scale_factor + 1, 1 - self.scale_factor, 1 + self.scale_factor)
            if rng.random() <= self.rotation_probability:
                rotation = float(np.clip(rng.standard_normal() * self.rotation_factor, -2 * self.rotation_factor, 2 * self.rotation_factor))
            mirror = rng.random() < self.flip_probability
        matrix = crop_matrix(centre, size, (height, width), rotation)
        return (mirror_matrix(width) @ matrix if mirror else matrix), mirror

    def __call__(self, batch: dict) -> dict:
        pixels, heatmaps, weights = [], [], []
        for index, row_id in enumerate(batch["sample_index"]):
            row = {key: batch[key][index] for key in ("box", "keypoints", "visibility")}
            rng = self.sample_generator(row_id)
            matrix, mirror = self.crop_geometry(row, rng)
            pixels.append(self.crop(batch["image"][index], matrix, rng, row_id))
            keypoints = transform_points(row["keypoints"], matrix)
            visibility = np.asarray(row["visibility"])
            if mirror:
                keypoints, visibility = swap_pairs(keypoints, self.flip_pairs), swap_pairs(visibility, self.flip_pairs)
            target, weight = self.codec.encode(keypoints, visibility)
            heatmaps.append(torch.from_numpy(target))
            weights.append(torch.from_numpy(weight))
        return {
            "pixel_values": torch.stack(pixels),
            "target_heatmaps": torch.stack(heatmaps),
            "target_weights": torch.stack(weights),
            "sample_index": torch.as_tensor(batch["sample_index"]),
        }


class HeadPoseTransform(_BoxCropTransform):
    """`Dataset.with_transform` callable for head-pose rows (`cmsa_hf.data.head_pose`): crop each face box (grown to
    the model's aspect ratio) and return `pixel_values` (B, 3, H, W), `labels` (B, 3) (yaw, pitch, roll, degrees)
    and `sample_index`.

    Training draws, per sample from (seed, epoch, row): box scale x U(1 - scale_factor, 1 + scale_factor), a shift of
    the box centre by U(-shift_factor, shift_factor) of its size, horizontal flip (p 0.5; yaw and roll negated) and
    random erasing.
    """

    def __init__(
        self,
        processor,
        train: bool = False,
        seed: int = 0,
        flip_probability: float = 0.5,
        scale_factor: float = 0.1,
        shift_factor: float = 0.05,
        random_erasing_probability: float = 0.0,
    ):
        self.processor, self.train, self.seed, self.epoch = processor, train, seed, 0
        self.flip_probability, self.scale_factor, self.shift_factor = flip_probability, scale_factor, shift_factor
        self.random_erasing_probability = random_erasing_probability

    def crop_geometry(self, box, rng: np.random.Generator | None) -> tuple[np.ndarray, bool]:
        """The crop matrix (image -> crop) of a face box and whether it mirrors; random when `rng` is given."""
        height, width = self.processor.input_size
        centre, size = box_to_center_and_size(box, width / height, self.processor.box_padding)
        mirror = False
        if rng is not None:
            size = size * rng.uniform(1 - self.scale_factor, 1 + self.scale_factor)
            centre = centre + size * rng.uniform(-self.shift_factor, self.shift_factor, 2)
            mirror = rng.random() < self.flip_probability
        matrix = crop_matrix(centre, size, (height, width))
        return (mirror_matrix(width) @ matrix if mirror else matrix), mirror

    def __call__(self, batch: dict) -> dict:
        pixels, labels = [], []
        for index, row_id in enumerate(batch["sample_index"]):
            rng = self.sample_generator(row_id)
            matrix, mirror = self.crop_geometry(batch["box"][index], rng)
            pixels.append(self.crop(batch["image"][index], matrix, rng, row_id))
            angles = np.asarray(batch["angles"][index], dtype=np.float32)
            labels.append(torch.from_numpy(mirror_angles(angles) if mirror else angles))
        return {
            "pixel_values": torch.stack(pixels),
            "labels": torch.stack(labels),
            "sample_index": torch.as_tensor(batch["sample_index"]),
        }
