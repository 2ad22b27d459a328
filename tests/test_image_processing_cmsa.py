import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from cmsa_hf import CMSAConfig, CMSAImageProcessor


MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture
def processor():
    return CMSAImageProcessor.for_config(CMSAConfig(image_size=(32, 24)))


def _rgb(height=40, width=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_defaults_resize_rescale_normalize(processor):
    assert processor.size.height == 32 and processor.size.width == 24
    array = _rgb()
    out = processor(Image.fromarray(array), return_tensors="pt").pixel_values
    assert out.shape == (1, 3, 32, 24) and out.dtype == torch.float32
    expected = np.asarray(Image.fromarray(array).resize((24, 32), Image.BILINEAR), dtype=np.float64) / 255
    expected = ((expected - MEAN) / STD).transpose(2, 0, 1)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)


def test_pil_numpy_and_torch_inputs_agree(processor):
    array = _rgb()
    from_pil = processor(Image.fromarray(array), return_tensors="pt").pixel_values
    from_hwc = processor(array, return_tensors="pt").pixel_values
    from_chw_tensor = processor(torch.from_numpy(array).permute(2, 0, 1), return_tensors="pt").pixel_values
    torch.testing.assert_close(from_hwc, from_pil)
    torch.testing.assert_close(from_chw_tensor, from_pil)


def test_batches(processor):
    images = [Image.fromarray(_rgb(seed=i, height=20 + i, width=50 - i)) for i in range(3)]
    assert processor(images, return_tensors="pt").pixel_values.shape == (3, 3, 32, 24)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_non_rgb_modes_become_rgb(processor, mode):
    image = Image.fromarray(_rgb()).convert(mode)
    out = processor(image, return_tensors="pt").pixel_values
    assert out.shape == (1, 3, 32, 24)
    if mode == "L":  # gray: the three channels carry the same pixel values
        pixels = out[0] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
        torch.testing.assert_close(pixels[0], pixels[1], atol=1e-5, rtol=0)


def test_transparent_pixels_are_composited_on_white(processor):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black
    out = processor(Image.fromarray(rgba, "RGBA"), return_tensors="pt").pixel_values
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor((1 - MEAN) / STD, dtype=torch.float32))


def test_save_and_load(tmp_path, processor):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").exists()
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is CMSAImageProcessor
    assert (loaded.size.height, loaded.size.width) == (32, 24)
    assert list(loaded.image_mean) == list(processor.image_mean)


def test_unsupported_input_is_refused(processor):
    with pytest.raises((ValueError, TypeError)):
        processor("not an image")


# -------------------------------------------------------------------------------------------- person boxes


def _square_image(width=100, height=80, box=(40, 20, 20, 40)):
    """A black image with a white rectangle at `box` (x, y, width, height)."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    x, y, w, h = box
    array[y : y + h, x : x + w] = 255
    return Image.fromarray(array)


def test_box_crop_keeps_the_aspect_ratio_and_pads(processor):
    box = [40, 20, 20, 40]
    out = processor(_square_image(box=box), boxes=[box], return_tensors="pt").pixel_values
    assert out.shape == (1, 3, 32, 24)
    white = (out[0, 0] > 0).numpy()  # normalized white is positive, black negative
    rows, cols = np.flatnonzero(white.any(1)), np.flatnonzero(white.any(0))
    # the 20x40 box widens to 30x40 (the model's 3:4), then x1.25: 37.5x50 image pixels fill the 24x32 crop,
    # so the white box covers 40 / 50 * 32 = 25.6 rows and 20 / 37.5 * 24 = 12.8 columns, centred
    assert rows.size in range(25, 28) and cols.size in range(12, 15)
    assert abs((rows.min() + rows.max() + 1) / 2 - 16) <= 0.5 and abs((cols.min() + cols.max() + 1) / 2 - 12) <= 0.5


def test_boxes_per_image_give_one_crop_each(processor):
    images = [_square_image(), _square_image(width=60)]
    out = processor(images, boxes=[[[0, 0, 10, 10], [5, 5, 20, 30]], [[1, 1, 30, 30]]], return_tensors="pt")
    assert out.pixel_values.shape == (3, 3, 32, 24)


def test_box_partly_outside_is_padded_with_black(processor):
    out = processor(_square_image(box=(0, 0, 100, 80)), boxes=[[-30, -30, 60, 60]], return_tensors="pt")
    black = (0 - MEAN[0]) / STD[0]
    assert np.isclose(out.pixel_values[0, 0, 0, 0].item(), black, atol=1e-4)  # the top-left lies off the image
    assert out.pixel_values[0, 0, -1, -1].item() > 0  # the bottom-right lies on the white image


@pytest.mark.parametrize(
    "boxes, message",
    [
        ([[0, 0, 10, 10]], "boxes has 1 entries for 2 images"),
        ([[[0, 0, 0, 10]], []], "zero or negative size"),
        ([[[200, 10, 10, 10]], []], "lies outside the 100x80 image"),
        ([[[-50, -50, 20, 20]], []], "lies outside"),
        ([[[0, 0, 10]], []], r"expected \[x, y, width, height\]"),
    ],
)
def test_bad_boxes_are_clear_errors(processor, boxes, message):
    with pytest.raises(ValueError, match=message):
        processor([_square_image(), _square_image()], boxes=boxes)


def test_heatmaps_decode_to_image_coordinates(processor):
    """Keypoints put into a crop's heatmaps come back at their image position (crop + codec + inverse map)."""
    box = [30.0, 10.0, 24.0, 50.0]
    image_points = np.array([[35.5, 20.25], [42.0, 35.0], [50.75, 55.5]])
    (matrix,) = processor.crop_matrices([(100, 80)], [[box]])[0]
    crop_points = image_points @ matrix[:2, :2].T + matrix[:2, 2]
    codec = processor.heatmap_codec((32, 24))
    heatmaps, _ = codec.encode(crop_points, np.ones(3))
    (poses,) = processor.post_process_keypoint_detection(torch.from_numpy(heatmaps)[None], boxes=[[box]])
    assert poses[0]["bbox"] == box and poses[0]["scores"].shape == (3,)
    # the crop is 1.25 * 50 / 32 = 1.95 image pixels per crop pixel; DARK is sub-pixel in the crop
    np.testing.assert_allclose(poses[0]["keypoints"].numpy(), image_points, atol=0.3)
    with pytest.raises(ValueError, match="1 heatmaps were given for 2 boxes"):
        processor.post_process_keypoint_detection(torch.from_numpy(heatmaps)[None], boxes=[[box, box]])


def test_vitpose_style_post_processing_matches_the_keypoint_one(processor):
    """`post_process_pose_estimation` (VitPose's name and output form): the same keypoints and scores as
    `post_process_keypoint_detection`, integer labels, xyxy boxes; `threshold` keeps what scores above it."""
    boxes = [[[30.0, 10.0, 24.0, 50.0], [5.0, 6.0, 20.0, 30.0]], [[0.0, 0.0, 16.0, 40.0]]]
    heatmaps = torch.rand(3, 17, 32, 24, generator=torch.Generator().manual_seed(0))
    reference = processor.post_process_keypoint_detection(heatmaps, boxes)
    vitpose_style = processor.post_process_pose_estimation(type("Outputs", (), {"heatmaps": heatmaps})(), boxes)
    assert [len(image) for image in vitpose_style] == [2, 1]
    for image_boxes, image_reference, image_result in zip(boxes, reference, vitpose_style):
        for (x, y, width, height), expected, pose in zip(image_boxes, image_reference, image_result):
            torch.testing.assert_close(pose["keypoints"], expected["keypoints"])
            torch.testing.assert_close(pose["scores"], expected["scores"])
            assert pose["labels"].dtype == torch.int64 and pose["labels"].tolist() == list(range(17))
            assert pose["bbox"].tolist() == [x, y, x + width, y + height]
    threshold = float(reference[0][0]["scores"].median())
    kept = processor.post_process_pose_estimation(heatmaps, boxes, threshold=threshold)[0][0]
    expected_ids = [i for i, score in enumerate(reference[0][0]["scores"].tolist()) if score > threshold]
    assert kept["labels"].tolist() == expected_ids and 0 < len(expected_ids) < 17
    torch.testing.assert_close(kept["keypoints"], reference[0][0]["keypoints"][expected_ids])


def test_pose_settings_survive_save_and_load(tmp_path):
    processor = CMSAImageProcessor(
        size={"height": 64, "width": 48}, box_padding=1.3, decoder="quarter", heatmap_sigma=1.5, keypoint_names=["a", "b"]
    )
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert (loaded.box_padding, loaded.decoder, loaded.heatmap_sigma, loaded.keypoint_names) == (1.3, "quarter", 1.5, ["a", "b"])
    with pytest.raises(ValueError, match="decoder must be one of"):
        CMSAImageProcessor(decoder="soft-argmax")


# -------------------------------------------------------------------------------------------- head pose


def test_post_process_head_pose_returns_angles_and_rotations():
    processor = CMSAImageProcessor(size={"height": 32, "width": 32}, box_padding=1.0)
    angles = torch.tensor([[30.0, -10.0, 5.0], [0.0, 0.0, 0.0]])
    poses = processor.post_process_head_pose(angles, return_rotation_matrix=True)
    assert poses[0]["yaw"] == 30.0 and poses[0]["pitch"] == -10.0 and poses[0]["roll"] == 5.0
    rotation = np.asarray(poses[0]["rotation_matrix"])
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(poses[1]["rotation_matrix"], np.eye(3), atol=1e-12)
    assert "rotation_matrix" not in processor.post_process_head_pose(angles)[0]
    with pytest.raises(ValueError, match=r"expected angles of shape \(faces, 3\)"):
        processor.post_process_head_pose(torch.zeros(2, 2))


def _same_size_processor():
    """Output 32x24 = the input size: the whole-image resize and a whole-image box crop are both the identity."""
    return CMSAImageProcessor(size={"height": 32, "width": 24}, box_padding=1.0)


GRAY = _rgb(32, 24, seed=3)[..., 0]
COLOUR = _rgb(32, 24, seed=4)


@pytest.mark.parametrize(
    "image, reference",
    [
        (Image.fromarray(GRAY.astype(np.uint16) * 257), Image.fromarray(GRAY).convert("RGB")),  # I;16, full range
        (Image.fromarray(GRAY.astype(np.float32) / 255), Image.fromarray(GRAY).convert("RGB")),  # F in [0, 1]
        (Image.fromarray(GRAY.astype(np.float32)), Image.fromarray(GRAY).convert("RGB")),  # F in 0..255, as before
        (GRAY.astype(np.float32) / 255, Image.fromarray(GRAY).convert("RGB")),  # 2D float array
        (COLOUR.astype(np.float32) / 255, Image.fromarray(COLOUR)),  # HWC float32 in [0, 1]
        (COLOUR.astype(np.float64) / 255, Image.fromarray(COLOUR)),
        (torch.from_numpy(COLOUR).permute(2, 0, 1).float() / 255, Image.fromarray(COLOUR)),  # CHW float tensor
        (COLOUR.astype(np.float32), Image.fromarray(COLOUR)),  # float 0..255, as before
    ],
    ids=["I;16", "F-unit", "F-255", "float-2d", "float32", "float64", "tensor-chw", "float-255"],
)
def test_16_bit_and_float_images_match_the_8_bit_image_on_both_paths(image, reference):
    processor = _same_size_processor()
    if isinstance(image, Image.Image):
        assert image.mode in ("I;16", "F")
    expected = processor(reference, return_tensors="np").pixel_values
    whole = processor(image, return_tensors="np").pixel_values
    boxed = processor(image, boxes=[[0, 0, 24, 32]], return_tensors="np").pixel_values
    np.testing.assert_allclose(whole, expected, atol=1e-5)
    np.testing.assert_allclose(boxed, expected, atol=1e-5)


def test_8_bit_inputs_pass_through_unchanged():
    from cmsa_hf.image_processing_cmsa import checked_image

    for image in (Image.fromarray(COLOUR), COLOUR, torch.from_numpy(COLOUR), Image.fromarray(GRAY)):
        assert checked_image(image) is image


@pytest.mark.parametrize(
    "images, boxes, message",
    [
        ([Image.fromarray(COLOUR), Image.new("RGB", (0, 0))], None, r"image 1 is empty \(0x0 pixels\)"),
        ([Image.new("RGB", (0, 0))], [[[0, 0, 1, 1]]], r"image 0 is empty \(0x0 pixels\)"),
        ([np.zeros((0, 24, 3), np.uint8)], None, r"image 0 is empty \(shape \(0, 24, 3\)\)"),
        ([np.full((32, 24, 3), np.nan, np.float32)], None, r"image 0 holds NaN or inf pixel values"),
        ([np.full((32, 24, 3), 300.0, np.float32)], None, r"image 0 has float values from 300 to 300: expected \[0, 1\]"),
        ([Image.fromarray(COLOUR)], [[[0, float("nan"), 10, 10]]], r"image 0, box 0: NaN or inf coordinates in \[0, nan, 10, 10\]"),
        ([Image.fromarray(COLOUR)], [[[0, 0, 10, 10], [0, 0, float("inf"), 10]]], r"image 0, box 1: NaN or inf coordinates"),
    ],
    ids=["0x0", "0x0-boxes", "empty-array", "nan-pixels", "out-of-range-float", "nan-box", "inf-box"],
)
def test_empty_images_non_finite_pixels_and_boxes_are_refused(images, boxes, message):
    with pytest.raises(ValueError, match=message):
        _same_size_processor()(images, boxes=boxes)


# -------------------------------------------------------------------------------------------- VitPose's forms


def test_flat_box_for_one_image_and_vitpose_box_forms(processor):
    image = _square_image()
    one = processor(image, boxes=[[40, 20, 20, 40]], return_tensors="np").pixel_values
    for boxes in ([40, 20, 20, 40], np.array([40, 20, 20, 40]), [np.array([[40, 20, 20, 40]])], np.array([[40, 20, 20, 40]])):
        np.testing.assert_array_equal(processor(image, boxes=boxes, return_tensors="np").pixel_values, one)
    with pytest.raises(ValueError, match=r"entry 0 is one flat box \[40, 20, 20, 40\]: wrap it as \[\[x, y, width, height\]\]"):
        processor([image], boxes=[[40, 20, 20, 40]])
    with pytest.raises(ValueError, match=r"boxes must hold one list of \[x, y, width, height\] boxes per image"):
        processor.post_process_keypoint_detection(torch.zeros(1, 17, 32, 24), boxes=[40, 20, 20, 40])


def test_vitpose_arguments(processor):
    image, boxes = _square_image(), [np.array([[40.0, 20.0, 20.0, 40.0]])]
    np.testing.assert_array_equal(
        processor(image, boxes=boxes, do_affine_transform=False, return_tensors="np").pixel_values,
        processor(image, return_tensors="np").pixel_values,
    )
    raw = processor(image, boxes=boxes, do_rescale=False, do_normalize=False, return_tensors="np").pixel_values
    assert raw.max() == 255.0
    assert processor(image, boxes=boxes, size={"height": 64, "width": 48}, return_tensors="np").pixel_values.shape == (1, 3, 64, 48)
    with pytest.raises(ValueError, match="normalize_factor=100.0: CMSA has no equivalent"):
        processor(image, boxes=boxes, normalize_factor=100.0)
    heatmaps = torch.rand(1, 17, 32, 24, generator=torch.Generator().manual_seed(1))
    default = processor.post_process_pose_estimation(heatmaps, boxes)[0][0]["keypoints"]
    assert not torch.equal(processor.post_process_pose_estimation(heatmaps, boxes, kernel_size=11)[0][0]["keypoints"], default)
    relative = [np.array([[0.4, 0.25, 0.2, 0.5]])]  # the same box relative to the 100x80 image
    scaled = processor.post_process_pose_estimation(heatmaps, relative, target_sizes=[(80, 100)])[0][0]["keypoints"]
    torch.testing.assert_close(scaled, default)
    with pytest.raises(ValueError, match="kernel_size must be an odd positive integer"):
        processor.post_process_pose_estimation(heatmaps, boxes, kernel_size=4)
    with pytest.raises(ValueError, match="target_sizes has 2 entries for 1 images"):
        processor.post_process_pose_estimation(heatmaps, boxes, target_sizes=[(80, 100), (80, 100)])
