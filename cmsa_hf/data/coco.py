"""COCO person keypoints as a `datasets.Dataset` with one row per person instance (the top-down protocol)."""

import json
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, UnidentifiedImageError


COCO_PERSON_CATEGORY = 1

FEATURES = datasets.Features(
    {
        "image": datasets.Image(decode=False),
        "image_id": datasets.Value("int64"),
        "annotation_id": datasets.Value("int64"),  # -1 for a detected box
        "box": datasets.Sequence(datasets.Value("float32"), length=4),  # x, y, width, height
        "keypoints": datasets.Array2D(shape=(None, 2), dtype="float32"),  # (K, 2) x, y in image pixels
        "visibility": datasets.Sequence(datasets.Value("int8")),  # COCO v: 0 unlabelled, 1 occluded, 2 visible
        "area": datasets.Value("float32"),
        "score": datasets.Value("float32"),  # 1 for ground-truth boxes, the detector's score otherwise
        "image_size": datasets.Sequence(datasets.Value("int32"), length=2),  # width, height
    }
)


def _read_json(path, what: str):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    with path.open() as handle:
        return json.load(handle)


def clean_box(box, width: int, height: int) -> list[float] | None:
    """Clip a COCO box to the image as HRNet does; None when nothing of it is left."""
    x, y, w, h = box
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
    y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
    if x2 < x1 or y2 < y1:
        return None
    return [x1, y1, x2 - x1, y2 - y1]


def load_coco_keypoints(
    annotation_file,
    image_dir,
    detections_file=None,
    min_box_size: float = 1.0,
    min_detection_score: float = 0.0,
) -> datasets.Dataset:
    """One row per person of a COCO keypoints json, with its image from `image_dir`.

    Ground-truth boxes (default) follow the HRNet filtering: person category only, no crowd annotations, at least
    one labelled keypoint, boxes clipped to the image and at least `min_box_size` pixels wide and high. With
    `detections_file` (a COCO results json of person boxes, the detected-box protocol) the rows are the detections
    above `min_detection_score`, with unlabelled keypoints; evaluation then compares against `annotation_file`.
    """
    coco = _read_json(annotation_file, "COCO annotation file")
    for key in ("images", "annotations"):
        if key not in coco:
            raise ValueError(f"{annotation_file} is not a COCO annotation file: it has no {key!r} field")
    images = {image["id"]: image for image in coco["images"]}
    num_keypoints = _num_keypoints(coco, annotation_file)
    image_dir = Path(image_dir)

    rows = []
    if detections_file is None:
        for annotation in coco["annotations"]:
            if annotation.get("category_id") != COCO_PERSON_CATEGORY or annotation.get("iscrowd", 0):
                continue
            if "keypoints" not in annotation:
                raise ValueError(f"{annotation_file}: annotation {annotation.get('id')} has no 'keypoints' field")
            values = np.asarray(annotation["keypoints"], dtype=np.float32).reshape(-1, 3)
            if values.shape[0] != num_keypoints:
                raise ValueError(
                    f"{annotation_file}: annotation {annotation['id']} has {values.shape[0]} keypoints, expected {num_keypoints}"
                )
            if not (values[:, 2] > 0).any():
                continue
            image = images[annotation["image_id"]]
            box = clean_box(annotation["bbox"], image["width"], image["height"])
            if box is None or box[2] < min_box_size or box[3] < min_box_size or annotation.get("area", 1) <= 0:
                continue
            rows.append(_row(image, image_dir, annotation["id"], box, values, annotation.get("area", 0.0), 1.0))
    else:
        for detection in _read_json(detections_file, "detections file"):
            if detection.get("category_id", COCO_PERSON_CATEGORY) != COCO_PERSON_CATEGORY:
                continue
            if detection["score"] < min_detection_score or detection["image_id"] not in images:
                continue
            image = images[detection["image_id"]]
            box = clean_box(detection["bbox"], image["width"], image["height"])
            if box is None or box[2] < min_box_size or box[3] < min_box_size:
                continue
            empty = np.zeros((num_keypoints, 3), dtype=np.float32)
            rows.append(_row(image, image_dir, -1, box, empty, box[2] * box[3], detection["score"]))
    if not rows:
        raise ValueError(f"No person instance left in {detections_file or annotation_file} after filtering")
    missing = sorted({row["image"]["path"] for row in rows if not Path(row["image"]["path"]).is_file()})
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {annotation_file} are missing from {image_dir}, e.g. {missing[0]}")
    _check_image_headers(rows)
    columns = {name: [row[name] for row in rows] for name in FEATURES}
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def _check_image_headers(rows: list[dict]):
    """Every image file must be an image PIL can identify (its header only is read: a cheap check at load; pixels
    are decoded, and a truncated file found, by the transforms)."""
    checked = set()
    for index, row in enumerate(rows):
        path = row["image"]["path"]
        if path in checked:
            continue
        try:
            with Image.open(path):
                pass
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"Row {index}: {path} is not an image PIL can read ({error})") from None
        checked.add(path)


def _num_keypoints(coco: dict, annotation_file) -> int:
    for category in coco.get("categories", []):
        if category.get("id") == COCO_PERSON_CATEGORY:
            if "keypoints" not in category:
                raise ValueError(f"{annotation_file}: the person category lists no keypoints (not a keypoints file)")
            return len(category["keypoints"])
    raise ValueError(f"{annotation_file} has no person category (id {COCO_PERSON_CATEGORY})")


def _row(image: dict, image_dir: Path, annotation_id: int, box, values: np.ndarray, area: float, score: float) -> dict:
    return {
        "image": {"path": str(image_dir / image["file_name"]), "bytes": None},
        "image_id": image["id"],
        "annotation_id": annotation_id,
        "box": [float(v) for v in box],
        "keypoints": values[:, :2],
        "visibility": values[:, 2].astype(np.int8),
        "area": float(area),
        "score": float(score),
        "image_size": [image["width"], image["height"]],
    }
