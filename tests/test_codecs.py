"""The heatmap codec: sub-pixel encode / decode, target weights, the flip-back, and the round trip on real COCO
annotations scored with the project's COCO evaluation (pycocotools)."""

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from cmsa_hf import CMSAImageProcessor
from cmsa_hf.codecs import HeatmapCodec, flip_heatmaps_back, gaussian_sigma_for
from cmsa_hf.configuration_cmsa import COCO_FLIP_PAIRS
from cmsa_hf.data.coco import load_coco_keypoints
from cmsa_hf.geometry import swap_pairs
from cmsa_hf.metrics import coco_keypoint_ap, coco_keypoint_results


def random_keypoints(rng, count, input_size, margin=4.0):
    height, width = input_size
    return np.stack([rng.uniform(margin, width - margin, count), rng.uniform(margin, height - margin, count)], -1)


@pytest.mark.parametrize("decoder", ["dark", "quarter"])
@pytest.mark.parametrize("input_size", [(32, 24), (64, 48), (128, 96)])
def test_round_trip_error_is_sub_pixel(decoder, input_size):
    heatmap_size = (input_size[0] // 2, input_size[1] // 2) if input_size[0] > 64 else input_size
    codec = HeatmapCodec(input_size, heatmap_size, decoder=decoder)
    stride = input_size[1] / heatmap_size[1]
    # DARK needs two heatmap pixels on each side of the peak (it keeps the argmax at the border).
    keypoints = random_keypoints(np.random.default_rng(0), 17, input_size, margin=3 * stride)
    heatmaps, weights = codec.encode(keypoints, np.full(17, 2))
    decoded, scores = codec.decode(torch.from_numpy(heatmaps)[None])
    error = np.abs(decoded[0].numpy() - keypoints).max()
    # DARK lands within a tenth of a heatmap pixel or so; the quarter offset within half a pixel.
    assert error < (0.15 if decoder == "dark" else 0.5) * stride
    assert weights.tolist() == [1.0] * 17
    assert torch.all(scores > 0.6)


def test_dark_beats_the_quarter_offset_on_sub_pixel_targets():
    keypoints = random_keypoints(np.random.default_rng(1), 17, (32, 24))
    errors = {}
    for decoder in ("dark", "quarter"):
        codec = HeatmapCodec((32, 24), (32, 24), decoder=decoder)
        heatmaps, _ = codec.encode(keypoints, np.ones(17))
        errors[decoder] = np.abs(codec.decode(torch.from_numpy(heatmaps)[None])[0][0].numpy() - keypoints).mean()
    assert errors["dark"] < errors["quarter"] / 3


def test_unlabelled_and_far_outside_keypoints_weigh_zero():
    codec = HeatmapCodec((32, 24), (32, 24))
    keypoints = np.array([[12.0, 16.0], [12.0, 16.0], [-20.0, 16.0], [25.0, 33.0]])
    heatmaps, weights = codec.encode(keypoints, np.array([2, 0, 2, 1]))
    assert weights.tolist() == [1.0, 0.0, 0.0, 1.0]  # the last is just outside: its Gaussian still shows
    assert heatmaps[1].max() == 0 and heatmaps[2].max() == 0 and heatmaps[3].max() > 0.1


def test_default_sigma_scales_with_the_heatmap():
    assert gaussian_sigma_for((32, 24)) == 1.0
    assert gaussian_sigma_for((64, 48)) == 2.0
    assert HeatmapCodec((64, 48), (64, 48)).blur_kernel_size() == 11


def test_unknown_decoder_is_refused():
    with pytest.raises(ValueError, match="decoder must be one of"):
        HeatmapCodec((32, 24), (32, 24), decoder="argmax")


def test_flip_back_of_the_mirrored_targets_is_the_original_targets():
    """Mirroring the crop (x -> W - x, pairs swapped) and flipping its heatmaps back gives the same heatmaps:
    the flip needs no pixel shift under the continuous coordinate convention."""
    codec = HeatmapCodec((32, 24), (32, 24))
    keypoints = random_keypoints(np.random.default_rng(2), 17, (32, 24))
    visible = np.random.default_rng(3).integers(0, 3, 17)
    original, _ = codec.encode(keypoints, visible)
    mirrored_points = keypoints * [-1, 1] + [24, 0]
    mirrored, _ = codec.encode(swap_pairs(mirrored_points, COCO_FLIP_PAIRS), swap_pairs(visible, COCO_FLIP_PAIRS))
    restored = flip_heatmaps_back(torch.from_numpy(mirrored)[None], COCO_FLIP_PAIRS)[0]
    torch.testing.assert_close(restored, torch.from_numpy(original), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ real annotations


def codec_round_trip_ap(folder, annotation_name, input_size, decoder, tmp_path) -> float:
    """Encode the ground-truth keypoints of every person crop, decode them, map them back, score with COCOeval."""
    annotation_file = folder / annotation_name
    image_dir = folder / "train2017" if (folder / "train2017").is_dir() else folder
    persons = load_coco_keypoints(annotation_file, image_dir)
    processor = CMSAImageProcessor(size={"height": input_size[0], "width": input_size[1]}, decoder=decoder)
    codec = processor.heatmap_codec(input_size)
    boxes = [[box] for box in persons["box"]]
    matrices = [m[0] for m in processor.crop_matrices([(w, h) for w, h in persons["image_size"]], boxes)]
    crop_points = np.stack([
        np.asarray(points) @ matrix[:2, :2].T + matrix[:2, 2] for points, matrix in zip(persons["keypoints"], matrices)
    ])  # fmt: skip
    heatmaps, _ = codec.encode(crop_points, np.stack(persons["visibility"]))
    decoded, scores = codec.decode(torch.from_numpy(heatmaps))
    poses = [p[0] for p in processor.crop_keypoints_to_image(decoded, scores, boxes)]
    results = coco_keypoint_results(
        persons["image_id"], np.stack([p["keypoints"].numpy() for p in poses]), scores.numpy(), persons["score"]
    )
    return coco_keypoint_ap(annotation_file, results, tmp_path / "results.json")["AP"]


COCO_SETS = [
    ("coco-fixture", "test_coco.json"),
    ("coco-mini", "annotations/person_keypoints_train2017.json"),
]


@pytest.mark.parametrize("decoder", ["dark", "quarter"])
@pytest.mark.parametrize("input_size", [(32, 24), (64, 48)])
@pytest.mark.parametrize("folder, annotation_name", COCO_SETS)
def test_codec_round_trip_on_real_annotations(folder, annotation_name, input_size, decoder, tmp_path):
    if not (SHARED_DATA / folder).is_dir():
        pytest.skip(f"{SHARED_DATA / folder} is not available (real COCO data lives outside the repository)")
    ap = codec_round_trip_ap(SHARED_DATA / folder, annotation_name, input_size, decoder, tmp_path)
    print(f"{folder} {input_size[0]}x{input_size[1]} {decoder}: OKS AP {ap:.4f}")
    # The ceiling below 1 is labelled keypoints outside the padded crop, which no crop-based model can place.
    assert ap >= 0.95
