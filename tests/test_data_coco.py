"""COCO person keypoints to a datasets.Dataset (HRNet filtering, detected boxes, clear errors) and the top-down
training transform (keypoints follow the pixels through flip, half body, scale, rotation)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, make_coco_keypoints

from cmsa_hf import CMSAImageProcessor
from cmsa_hf.configuration_cmsa import COCO_FLIP_PAIRS
from cmsa_hf.data.coco import load_coco_keypoints
from cmsa_hf.data.transforms import TopDownTransform
from cmsa_hf.geometry import swap_pairs, transform_points


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return make_coco_keypoints(root), root / "images"


def test_one_row_per_person_with_hrnet_filtering(coco):
    annotation_file, image_dir = coco
    persons = load_coco_keypoints(annotation_file, image_dir)
    # per image: the person is kept; the crowd region, the person without keypoints and the tiny box are dropped
    assert len(persons) == 4 and persons["annotation_id"] == [10, 20, 30, 40]
    source = json.loads(annotation_file.read_text())["annotations"][0]
    row = persons[0]
    np.testing.assert_allclose(np.asarray(row["keypoints"]), np.asarray(source["keypoints"]).reshape(17, 3)[:, :2], atol=1e-4)
    assert row["visibility"] == [2] * 17 and row["score"] == 1.0 and row["image_size"] == [80, 64]
    assert row["image"]["path"].endswith("000000000001.png")


def _rewrite(annotation_file, tmp_path, change) -> str:
    coco = json.loads(annotation_file.read_text())
    change(coco)
    path = tmp_path / "changed.json"
    path.write_text(json.dumps(coco))
    return str(path)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda c: c.pop("annotations"), ValueError, "no 'annotations' field"),
        (lambda c: c["categories"][0].pop("keypoints"), ValueError, "no category lists keypoints"),
        (lambda c: c["annotations"][0].pop("keypoints"), ValueError, "annotation 10 has no 'keypoints' field"),
        (lambda c: c.update(categories=[{"id": 3, "name": "car"}]), ValueError, r"no category lists keypoints .*\['car'\]"),
        (lambda c: c["annotations"][0].update(keypoints=[1, 2, 2] * 5), ValueError, "has 5 keypoints, expected 17"),
        (lambda c: c["images"][0].update(file_name="gone.png"), FileNotFoundError, "missing from"),
        (lambda c: c.update(annotations=c["annotations"][1:4]), ValueError, "No person instance left"),
    ],
)
def test_bad_annotation_files_are_clear_errors(coco, tmp_path, change, error, message):
    annotation_file, image_dir = coco
    with pytest.raises(error, match=message):
        load_coco_keypoints(_rewrite(annotation_file, tmp_path, change), image_dir)


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="COCO annotation file .*nope.json does not exist"):
        load_coco_keypoints(tmp_path / "nope.json", tmp_path)


def test_detected_boxes_replace_the_ground_truth(coco, tmp_path):
    annotation_file, image_dir = coco
    detections = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 5, 30, 40], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [12, 6, 28, 40], "score": 0.2},
        {"image_id": 2, "category_id": 3, "bbox": [12, 6, 28, 40], "score": 0.9},  # not a person
        {"image_id": 99, "category_id": 1, "bbox": [12, 6, 28, 40], "score": 0.9},  # not in the annotation file
    ]
    (tmp_path / "detections.json").write_text(json.dumps(detections))
    rows = load_coco_keypoints(annotation_file, image_dir, tmp_path / "detections.json", min_detection_score=0.1)
    assert rows["image_id"] == [1, 2] and rows["annotation_id"] == [-1, -1]
    assert rows["score"] == pytest.approx([0.9, 0.2]) and rows["visibility"][0] == [0] * 17


def test_real_coco_subsets_load():
    if not (SHARED_DATA / "coco-mini").is_dir():
        pytest.skip(f"{SHARED_DATA} is not available (real COCO data lives outside the repository)")
    mini = load_coco_keypoints(
        SHARED_DATA / "coco-mini/annotations/person_keypoints_train2017.json", SHARED_DATA / "coco-mini/train2017"
    )
    fixture = SHARED_DATA / "coco-fixture"
    ground_truth = load_coco_keypoints(fixture / "test_coco.json", fixture)
    detected = load_coco_keypoints(fixture / "test_coco.json", fixture, fixture / "test_coco_det_AP_H_56.json")
    assert (len(mini), len(ground_truth)) == (86, 12)  # the persons with keypoints, as the data README says
    assert len(detected) > 0 and set(detected["image_id"]) <= set(ground_truth["image_id"])


# ------------------------------------------------------------------------------------ top-down transform


@pytest.fixture(scope="module")
def persons(coco):
    annotation_file, image_dir = coco
    rows = load_coco_keypoints(annotation_file, image_dir)
    return rows.add_column("sample_index", list(range(len(rows))))


def _transform(train, **kwargs):
    processor = CMSAImageProcessor(size={"height": 32, "width": 24})
    return TopDownTransform(processor, processor.heatmap_codec((32, 24)), COCO_FLIP_PAIRS, train=train, **kwargs)


def test_evaluation_crops_encode_the_keypoints(persons):
    transform = _transform(train=False)
    batch = persons.with_transform(transform)[:4]
    assert batch["pixel_values"].shape == (4, 3, 32, 24) and batch["target_heatmaps"].shape == (4, 17, 32, 24)
    assert torch.all(batch["target_weights"] == 1)
    decoded, _ = transform.codec.decode(batch["target_heatmaps"])
    for index in range(4):
        matrix, mirror = transform.crop_geometry(persons[index], rng=None)
        assert not mirror
        back = transform_points(decoded[index].numpy(), np.linalg.inv(matrix))
        np.testing.assert_allclose(back, np.asarray(persons[index]["keypoints"]), atol=0.2)


def test_augmented_keypoints_follow_the_pixels(persons):
    """Under random flip, half body, scale and rotation every target peak sits on its bright dot, and a mirrored
    crop carries the left keypoints' targets on the right ones' dots."""
    transform = _transform(train=True, seed=3, half_body_probability=0.5, rotation_probability=1.0)
    background = (20 / 255 - 0.485) / 0.229
    mirrored_seen = 0
    for epoch in range(4):
        transform.epoch = epoch
        batch = persons.with_transform(transform)[:4]
        decoded, _ = transform.codec.decode(batch["target_heatmaps"])
        for index in range(4):
            rng = np.random.default_rng([transform.seed, epoch, index])
            matrix, mirror = transform.crop_geometry(persons[index], rng)
            mirrored_seen += mirror
            image_points = np.asarray(persons[index]["keypoints"])
            expected = transform_points(image_points, matrix)
            if mirror:
                expected = swap_pairs(expected, COCO_FLIP_PAIRS)
            # DARK needs two heatmap pixels around the peak: compare the keypoints clear of the border
            clear = (batch["target_weights"][index].numpy() > 0) & np.all((expected > 3) & (expected < [21, 29]), -1)
            assert clear.sum() >= 2
            np.testing.assert_allclose(decoded[index].numpy()[clear], expected[clear], atol=0.35)
            red = batch["pixel_values"][index, 0]
            for x, y in decoded[index].numpy()[clear]:
                assert red[int(y), int(x)] > background + 0.5  # a dot, not the dark background
    assert mirrored_seen > 0


def test_augmentation_depends_only_on_seed_epoch_and_row(persons):
    first = persons.with_transform(_transform(train=True, seed=1))[:2]["pixel_values"]
    again = persons.with_transform(_transform(train=True, seed=1))[:2]["pixel_values"]
    other = _transform(train=True, seed=1)
    other.epoch = 1
    assert torch.equal(first, again) and not torch.equal(first, persons.with_transform(other)[:2]["pixel_values"])


def test_a_file_that_is_not_an_image_is_found_at_load(coco, tmp_path):
    annotation_file, image_dir = coco
    images = Path(shutil.copytree(image_dir, tmp_path / "images"))
    (images / "000000000003.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"Row 2: .*000000000003.png is not an image PIL can read"):
        load_coco_keypoints(annotation_file, images)


def test_a_truncated_image_is_reported_with_its_row_and_file_at_decode(coco, tmp_path):
    annotation_file, image_dir = coco
    images = Path(shutil.copytree(image_dir, tmp_path / "images"))
    whole = (images / "000000000002.png").read_bytes()
    (images / "000000000002.png").write_bytes(whole[: len(whole) // 2])  # the header survives: loads, fails to decode
    persons = load_coco_keypoints(annotation_file, images).add_column("sample_index", list(range(4)))
    with pytest.raises(ValueError, match=r"Row 1 \(.*000000000002.png\): the image cannot be decoded"):
        _transform(train=False)(persons[:2])
