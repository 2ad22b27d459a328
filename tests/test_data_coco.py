"""COCO person keypoints to a datasets.Dataset (HRNet filtering, detected boxes, clear errors) and the top-down
training transform (keypoints follow the pixels through flip, half body, scale, rotation)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, make_coco_keypoints

from cmsa_hf import CMSAConfig, CMSAImageProcessor
from cmsa_hf.configuration_cmsa import COCO_FLIP_PAIRS, COCO_KEYPOINT_NAMES, COCO_SKELETON
from cmsa_hf.data.coco import keypoint_metadata, load_coco_keypoints
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
        (lambda c: c["annotations"][0].update(keypoints=[1, 2, 2] * 5), ValueError, r"changed.json: annotation 10 has 'keypoints' of length 15, expected 3 x 17 = 51"),
        (lambda c: c["annotations"][0].update(keypoints=[1.0] * 50), ValueError, r"changed.json: annotation 10 has 'keypoints' of length 50, expected 3 x 17 = 51"),
        (lambda c: c["annotations"][0].pop("bbox"), ValueError, r"changed.json: annotation 10 has no 'bbox' field"),
        (lambda c: c["images"][0].pop("width"), ValueError, r"changed.json: image 1 has no 'width' field"),
        (lambda c: c["annotations"][0].update(image_id=99), ValueError, r"changed.json: annotation 10 has image_id 99, which is not in the file's 'images'"),
        (lambda c: c["annotations"][0].pop("id") and c["annotations"][0].pop("keypoints"), ValueError, r"changed.json: annotation #0 has no 'keypoints' field"),
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


def test_keypoint_metadata_of_a_coco_file_is_cocos(coco):
    annotation_file, _ = coco
    metadata = keypoint_metadata(annotation_file)
    config = CMSAConfig(**metadata)
    assert config.keypoint_names == list(COCO_KEYPOINT_NAMES) and config.skeleton == [list(edge) for edge in COCO_SKELETON]
    assert config.flip_pairs == [list(pair) for pair in COCO_FLIP_PAIRS] and config.keypoint_sigmas == CMSAConfig().keypoint_sigmas


def _three_point_set(path, category_id=4, skeleton=((1, 2), (1, 3))):
    """A COCO-format file of another set (category 4, three keypoints, one image)."""
    category = {"id": category_id, "name": "bird", "keypoints": ["beak", "left_wing", "right_wing"], "skeleton": skeleton}
    annotation = {"id": 1, "image_id": 1, "category_id": category_id, "bbox": [2, 2, 20, 20], "area": 400.0, "iscrowd": 0,
                  "keypoints": [5, 5, 2, 10, 10, 2, 15, 10, 1], "num_keypoints": 3}  # fmt: skip
    image = {"id": 1, "file_name": "bird.png", "width": 32, "height": 32}
    path.write_text(json.dumps({"images": [image], "annotations": [annotation], "categories": [{"id": 1, "name": "x"}, category]}))
    return path


def test_another_keypoint_set_loads_with_its_metadata(tmp_path):
    from PIL import Image  # noqa: PLC0415

    annotation_file = _three_point_set(tmp_path / "birds.json")
    Image.new("RGB", (32, 32)).save(tmp_path / "bird.png")
    rows = load_coco_keypoints(annotation_file, tmp_path)
    assert len(rows) == 1 and np.asarray(rows[0]["keypoints"]).shape == (3, 2) and rows[0]["visibility"] == [2, 2, 1]
    metadata = keypoint_metadata(annotation_file)
    assert metadata == {"keypoint_names": ["beak", "left_wing", "right_wing"], "skeleton": [[0, 1], [0, 2]], "flip_pairs": [[1, 2]]}
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"keypoint_sigmas": [0.02, 0.05, 0.05], "upper_body_keypoints": [0]}))
    config = CMSAConfig(**keypoint_metadata(annotation_file, extra))
    assert config.keypoint_sigmas == [0.02, 0.05, 0.05] and config.upper_body_keypoints == [0]
    extra.write_text(json.dumps({"sigmas": [0.02, 0.05, 0.05]}))
    with pytest.raises(ValueError, match=r"extra.json must hold a JSON object of the fields .*got \['sigmas'\]"):
        keypoint_metadata(annotation_file, extra)
    with pytest.raises(ValueError, match=r"skeleton must hold pairs of 1-based keypoint indices in \[1, 3\]"):
        keypoint_metadata(_three_point_set(tmp_path / "zero_based.json", skeleton=[[0, 1]]))


def test_without_an_upper_body_set_there_are_no_half_body_crops(persons):
    """half body probability 1: COCO's upper body crops tighter than the box; an empty set keeps the box crop."""
    half, none = (_transform(train=True, half_body_probability=1.0, scale_factor=0.0, rotation_probability=0.0,
                             flip_probability=0.0, upper_body=upper) for upper in (range(11), []))  # fmt: skip
    box_crop, _ = _transform(train=False).crop_geometry(persons[0], rng=None)
    rng = np.random.default_rng(0)
    assert np.allclose(none.crop_geometry(persons[0], rng)[0], box_crop)
    assert not np.allclose(half.crop_geometry(persons[0], np.random.default_rng(0))[0], box_crop)


def test_a_detection_without_score_names_file_entry_and_field(coco, tmp_path):
    annotation_file, image_dir = coco
    detections = tmp_path / "detections.json"
    detections.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [5, 5, 30, 40], "score": 0.9},
                                      {"image_id": 2, "category_id": 1, "bbox": [5, 5, 30, 40]}]))  # fmt: skip
    with pytest.raises(ValueError, match=r"detections.json: detection #1 has no 'score' field"):
        load_coco_keypoints(annotation_file, image_dir, detections_file=detections)


def test_a_file_that_is_not_json_is_named(coco, tmp_path):
    _, image_dir = coco
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [1, 2')
    with pytest.raises(ValueError, match=r"COCO annotation file .*broken.json is not JSON: .*line 1 column"):
        load_coco_keypoints(broken, image_dir)
