"""Crop / affine / flip geometry of the box tasks, in one place: the image processor, the training transforms and
the codecs call these pure functions.

Coordinates are continuous with pixel i spanning [i, i + 1] (its centre at i + 0.5), the convention of PIL's affine
transforms. Under it a crop of width W maps to a map of width w by a plain scaling x * w / W, and a horizontal
mirror is x -> W - x at every resolution (no one-pixel shift). Affine matrices are 3x3 NumPy arrays acting on
(x, y, 1) column vectors.
"""

import numpy as np
import torch
from PIL import Image


# ------------------------------------------------------------------------------------------------ boxes and crops


def box_to_center_and_size(box, aspect_ratio: float, padding: float = 1.25) -> tuple[np.ndarray, np.ndarray]:
    """COCO box (x, y, width, height) -> centre (2,) and (width, height) (2,) of the crop region: the box grown to
    the model's aspect ratio (width / height), then padded (x1.25 in the HRNet protocol)."""
    x, y, width, height = (float(v) for v in box)
    centre = np.array([x + width / 2, y + height / 2])
    if width > aspect_ratio * height:
        height = width / aspect_ratio
    else:
        width = height * aspect_ratio
    return centre, np.array([width, height]) * padding


def points_to_center_and_size(points, aspect_ratio: float, padding: float) -> tuple[np.ndarray, np.ndarray]:
    """The crop region (centre, size as `box_to_center_and_size`) of the tight box around points (N, 2), at least
    one pixel wide and high (the region of HRNet's half-body augmentation)."""
    points = np.asarray(points)
    top_left, bottom_right = points.min(axis=0), points.max(axis=0)
    width, height = bottom_right - top_left
    return box_to_center_and_size([top_left[0], top_left[1], max(width, 1.0), max(height, 1.0)], aspect_ratio, padding)


def crop_matrix(centre, size, output_size, rotation: float = 0.0) -> np.ndarray:
    """3x3 affine matrix from image to crop coordinates: the region of `size` (width, height) around `centre`,
    rotated by `rotation` degrees, fills an output of `output_size` (height, width)."""
    out_height, out_width = output_size
    angle = np.deg2rad(rotation)
    cos, sin = np.cos(angle), np.sin(angle)
    to_origin = np.array([[1, 0, -centre[0]], [0, 1, -centre[1]], [0, 0, 1]])
    rotate = np.array([[cos, sin, 0], [-sin, cos, 0], [0, 0, 1]])
    scale = np.diag([out_width / size[0], out_height / size[1], 1.0])
    to_output = np.array([[1, 0, out_width / 2], [0, 1, out_height / 2], [0, 0, 1]])
    return to_output @ scale @ rotate @ to_origin


def resize_matrix(from_size, to_size) -> np.ndarray:
    """3x3 scaling between two resolutions of the same crop ((height, width) each), e.g. heatmap -> input crop."""
    return np.diag([to_size[1] / from_size[1], to_size[0] / from_size[0], 1.0])


def transform_points(points, matrix) -> np.ndarray:
    """Apply a 3x3 affine matrix to points (..., 2) -> (..., 2) float64."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def crop_points_to_image(points, matrix) -> np.ndarray:
    """Points (..., 2) in crop pixels -> image pixels, for the crop made under `matrix` (image -> crop)."""
    return transform_points(points, np.linalg.inv(matrix))


def warp_image(image: Image.Image, matrix, output_size) -> np.ndarray:
    """The crop of an RGB image under `matrix` (image -> crop; bilinear, outside the image black): (H, W, 3) uint8
    for `output_size` (H, W)."""
    out_height, out_width = output_size
    inverse = np.linalg.inv(matrix)
    crop = image.transform((out_width, out_height), Image.AFFINE, data=tuple(inverse[:2].ravel()), resample=Image.BILINEAR)
    return np.asarray(crop)


# ------------------------------------------------------------------------------------------------ horizontal flip


def mirror_matrix(width: float) -> np.ndarray:
    """The 3x3 horizontal mirror of a crop `width` pixels wide (x -> width - x), to compose after a crop matrix."""
    return np.array([[-1.0, 0, width], [0, 1, 0], [0, 0, 1]])


def mirror_points(points, width: float) -> np.ndarray:
    """Points (..., 2) -> their positions in the mirrored image `width` pixels wide (x -> width - x)."""
    return transform_points(points, mirror_matrix(width))


def flip_horizontally(values):
    """Mirror the last axis (width) of an array (..., W) or tensor (..., W): images (C, H, W), heatmaps (N, K, h, w)."""
    return values.flip(-1) if isinstance(values, torch.Tensor) else np.asarray(values)[..., ::-1]


def flip_permutation(num_keypoints: int, flip_pairs) -> list[int]:
    """The keypoint order after a horizontal flip: index i of the mirrored pose holds keypoint `order[i]` (each
    pair of `flip_pairs` swapped, the other keypoints in place). Its own inverse."""
    order = list(range(num_keypoints))
    for left, right in flip_pairs:
        order[left], order[right] = right, left
    return order


def swap_pairs(values, flip_pairs, axis: int = 0):
    """Swap left / right keypoints along `axis` of an array or tensor (keypoints (K, 2), visibility (K,), heatmaps
    (N, K, h, w) with axis 1): a new array, the input unchanged."""
    if isinstance(values, torch.Tensor):
        order = flip_permutation(values.shape[axis], flip_pairs)
        return values.index_select(axis, torch.as_tensor(order, device=values.device))
    values = np.asarray(values)
    return np.take(values, flip_permutation(values.shape[axis], flip_pairs), axis=axis)


__all__ = [
    "box_to_center_and_size",
    "points_to_center_and_size",
    "crop_matrix",
    "resize_matrix",
    "transform_points",
    "crop_points_to_image",
    "warp_image",
    "mirror_matrix",
    "mirror_points",
    "flip_horizontally",
    "flip_permutation",
    "swap_pairs",
]
