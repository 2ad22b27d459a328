"""Crop / affine / flip geometry: round trips, flip involutions, and agreement with the pixels PIL warps."""

import numpy as np
import pytest
import torch
from PIL import Image

from cmsa_hf.configuration_cmsa import COCO_FLIP_PAIRS
from cmsa_hf.geometry import (
    box_to_center_and_size,
    crop_matrix,
    crop_points_to_image,
    flip_horizontally,
    flip_permutation,
    mirror_matrix,
    mirror_points,
    points_to_center_and_size,
    resize_matrix,
    swap_pairs,
    transform_points,
    warp_image,
)


def test_box_grows_to_the_aspect_ratio_then_pads():
    centre, size = box_to_center_and_size([10, 20, 30, 20], aspect_ratio=0.75, padding=1.25)
    np.testing.assert_allclose(centre, [25, 30])
    np.testing.assert_allclose(size, [30 * 1.25, 40 * 1.25])  # too wide for 3:4, so the height grows
    _, size = box_to_center_and_size([0, 0, 6, 40], aspect_ratio=0.75, padding=1.0)
    np.testing.assert_allclose(size, [30, 40])  # too tall, so the width grows


def test_points_region_is_the_box_of_the_points():
    points = np.array([[4.0, 10.0], [12.0, 2.0], [8.0, 6.0]])
    np.testing.assert_allclose(points_to_center_and_size(points, 1.0, 1.5)[0], [8, 6])
    np.testing.assert_allclose(points_to_center_and_size(points, 1.0, 1.5)[1], [12, 12])
    _, size = points_to_center_and_size(np.array([[3.0, 3.0], [3.0, 3.0]]), 1.0, 1.0)  # one point: one pixel
    np.testing.assert_allclose(size, [1, 1])


@pytest.mark.parametrize("rotation", [0.0, 30.0, -75.0])
def test_point_to_crop_and_back_is_the_identity(rotation):
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 100, (5, 17, 2))
    matrix = crop_matrix(np.array([40.0, 55.0]), np.array([36.0, 48.0]), (32, 24), rotation)
    np.testing.assert_allclose(crop_points_to_image(transform_points(points, matrix), matrix), points, atol=1e-9)


def test_crop_maps_the_region_onto_the_output():
    centre, size = np.array([40.0, 55.0]), np.array([36.0, 48.0])
    matrix = crop_matrix(centre, size, (32, 24))
    corners = np.array([[22.0, 31.0], [58.0, 79.0], [40.0, 55.0]])  # top-left, bottom-right, centre of the region
    np.testing.assert_allclose(transform_points(corners, matrix), [[0, 0], [24, 32], [12, 16]], atol=1e-9)
    rotated = crop_matrix(centre, size, (32, 24), rotation=90.0)
    # A 90-degree rotation turns the region's right-hand point (centre + (18, 0)) to the crop's top centre
    np.testing.assert_allclose(transform_points([58.0, 55.0], rotated), [12, 16 - 18 * 32 / 48], atol=1e-9)


def test_heatmap_to_image_composes_resize_and_crop():
    matrix = crop_matrix(np.array([40.0, 55.0]), np.array([36.0, 48.0]), (64, 48))
    heatmap_points = np.array([[0.0, 0.0], [24.0, 32.0]])  # the corners of a 32x24 heatmap of the 64x48 crop
    crop_points = transform_points(heatmap_points, resize_matrix((32, 24), (64, 48)))
    np.testing.assert_allclose(crop_points, [[0, 0], [48, 64]], atol=1e-9)
    np.testing.assert_allclose(crop_points_to_image(crop_points, matrix), [[22, 31], [58, 79]], atol=1e-9)


def test_warped_pixels_land_where_the_matrix_sends_them():
    pixels = np.zeros((60, 80, 3), dtype=np.uint8)
    pixels[30, 50] = 255  # the pixel spanning [50, 51] x [30, 31], centre (50.5, 30.5)
    matrix = crop_matrix(np.array([45.0, 32.0]), np.array([24.0, 32.0]), (32, 24), rotation=20.0)
    crop = warp_image(Image.fromarray(pixels), matrix, (32, 24))
    assert crop.shape == (32, 24, 3) and crop.dtype == np.uint8
    x, y = transform_points([50.5, 30.5], matrix)
    brightest = np.unravel_index(crop[..., 0].argmax(), crop.shape[:2])
    assert abs(brightest[1] + 0.5 - x) <= 1 and abs(brightest[0] + 0.5 - y) <= 1


def test_mirror_twice_is_the_identity_and_matches_the_flipped_pixels():
    rng = np.random.default_rng(1)
    points = rng.uniform(0, 24, (17, 2))
    np.testing.assert_allclose(mirror_points(mirror_points(points, 24), 24), points)
    np.testing.assert_allclose(mirror_matrix(24) @ mirror_matrix(24), np.eye(3))
    image = rng.integers(0, 255, (3, 32, 24))
    np.testing.assert_array_equal(flip_horizontally(flip_horizontally(image)), image)
    tensor = torch.from_numpy(image)
    np.testing.assert_array_equal(flip_horizontally(tensor).numpy(), flip_horizontally(image))
    # A pixel's centre x + 0.5 goes to the mirrored pixel's centre (24 - 1 - x) + 0.5
    np.testing.assert_allclose(mirror_points([[3.5, 7.0]], 24), [[20.5, 7.0]])


def test_flip_pairs_swap_keypoints_and_twice_is_the_identity():
    order = flip_permutation(17, COCO_FLIP_PAIRS)
    assert order[:3] == [0, 2, 1] and sorted(order) == list(range(17))
    assert [order[i] for i in order] == list(range(17))
    values = np.arange(17 * 2).reshape(17, 2)
    swapped = swap_pairs(values, COCO_FLIP_PAIRS)
    np.testing.assert_array_equal(swapped[1], values[2])
    np.testing.assert_array_equal(swap_pairs(swapped, COCO_FLIP_PAIRS), values)
    assert swap_pairs(list(range(17)), COCO_FLIP_PAIRS).tolist() == order  # lists too
    heatmaps = torch.arange(2 * 17 * 3 * 2.0).reshape(2, 17, 3, 2)
    np.testing.assert_array_equal(swap_pairs(heatmaps, COCO_FLIP_PAIRS, axis=1).numpy(), swap_pairs(heatmaps.numpy(), COCO_FLIP_PAIRS, axis=1))


def test_mirrored_crop_of_a_pose_equals_the_mirrored_pose_with_pairs_swapped():
    """The transforms' flip (mirror matrix after the crop, then the pairs swapped) on a symmetric pose gives back the
    pose: the left point lands where the right one was."""
    points = np.array([[10.0, 5.0], [6.0, 8.0], [14.0, 8.0]])  # nose on the axis x = 10, eyes symmetric about it
    matrix = crop_matrix(np.array([10.0, 8.0]), np.array([12.0, 16.0]), (32, 24))
    crop = transform_points(points, matrix)
    mirrored = swap_pairs(transform_points(points, mirror_matrix(24) @ matrix), [(1, 2)])
    np.testing.assert_allclose(mirrored, crop, atol=1e-9)
