"""COCO-format keypoints (COCO's 17 person keypoints or any other set) as a `datasets.Dataset` with one row per
instance (the top-down protocol), and the keypoint metadata (config fields) that a file's category record holds."""

import json
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..configuration_cmsa import flip_pairs_from_names


COCO_PERSON_CATEGORY = 1
KEYPOINT_METADATA_FIELDS = ("keypoint_names", "flip_pairs", "skeleton", "keypoint_sigmas", "upper_body_keypoints")

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
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{what} {path} is not JSON: {error}") from None


def _field(entry, name: str, what: str, path):
    """`entry[name]`, or a ValueError naming the file, the entry (`what`, e.g. "annotation 5") and the field."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {what} is not a JSON object but {type(entry).__name__}")
    if name not in entry:
        raise ValueError(f"{path}: {what} has no {name!r} field")
    return entry[name]


def _image_of(images: dict, entry: dict, what: str, path) -> dict:
    """The image record `entry` refers to, with the fields the rows need checked."""
    image_id = _field(entry, "image_id", what, path)
    if image_id not in images:
        raise ValueError(f"{path}: {what} has image_id {image_id!r}, which is not in the file's 'images'")
    image = images[image_id]
    for name in ("file_name", "width", "height"):
        _field(image, name, f"image {image_id}", path)
    return image


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
    """One row per instance of a COCO keypoints json, with its image from `image_dir`.

    The instances are those of the file's keypoint category (the category record that lists `keypoints`: COCO's
    person, or any other set's). Ground-truth boxes (default) follow the HRNet filtering: that category only, no
    crowd annotations, at least one labelled keypoint, boxes clipped to the image and at least `min_box_size` pixels
    wide and high. With `detections_file` (a COCO results json of boxes, the detected-box protocol) the rows are the
    detections above `min_detection_score`, with unlabelled keypoints; evaluation then compares against
    `annotation_file`.
    """
    coco = _read_json(annotation_file, "COCO annotation file")
    for key in ("images", "annotations"):
        if key not in coco:
            raise ValueError(f"{annotation_file} is not a COCO annotation file: it has no {key!r} field")
    images = {_field(image, "id", f"entry {index} of 'images'", annotation_file): image for index, image in enumerate(coco["images"])}
    category = keypoint_category(coco, annotation_file)
    category_id, num_keypoints = category["id"], len(category["keypoints"])
    image_dir = Path(image_dir)

    rows = []
    if detections_file is None:
        for index, annotation in enumerate(coco["annotations"]):
            what = f"annotation {annotation['id']}" if isinstance(annotation, dict) and "id" in annotation else f"annotation #{index}"
            if _field(annotation, "category_id", what, annotation_file) != category_id or annotation.get("iscrowd", 0):
                continue
            values = _field(annotation, "keypoints", what, annotation_file)
            if not isinstance(values, list) or len(values) != 3 * num_keypoints:
                length = len(values) if isinstance(values, list) else type(values).__name__
                raise ValueError(
                    f"{annotation_file}: {what} has 'keypoints' of length {length}, expected 3 x {num_keypoints} = "
                    f"{3 * num_keypoints} (x, y, visibility per keypoint)"
                )
            values = np.asarray(values, dtype=np.float32).reshape(-1, 3)
            if not (values[:, 2] > 0).any():
                continue
            image = _image_of(images, annotation, what, annotation_file)
            box = clean_box(_field(annotation, "bbox", what, annotation_file), image["width"], image["height"])
            if box is None or box[2] < min_box_size or box[3] < min_box_size or annotation.get("area", 1) <= 0:
                continue
            rows.append(_row(image, image_dir, annotation["id"], box, values, annotation.get("area", 0.0), 1.0))
    else:
        for index, detection in enumerate(_read_json(detections_file, "detections file")):
            what = f"detection #{index}"
            score, image_id = _field(detection, "score", what, detections_file), _field(detection, "image_id", what, detections_file)
            if detection.get("category_id", category_id) != category_id:
                continue
            # Detections of images the annotation file does not hold (a subset of the detector's images) are skipped.
            if score < min_detection_score or image_id not in images:
                continue
            image = _image_of(images, detection, what, detections_file)
            box = clean_box(_field(detection, "bbox", what, detections_file), image["width"], image["height"])
            if box is None or box[2] < min_box_size or box[3] < min_box_size:
                continue
            empty = np.zeros((num_keypoints, 3), dtype=np.float32)
            rows.append(_row(image, image_dir, -1, box, empty, box[2] * box[3], score))
    if not rows:
        raise ValueError(f"No {category.get('name', 'keypoint')} instance left in {detections_file or annotation_file} after filtering")
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


def keypoint_category(coco: dict, annotation_file) -> dict:
    """The category record of a COCO keypoints file that lists `keypoints` (its names): the only one, or COCO's
    person (id 1) among several."""
    found = [category.get("name", category.get("id")) for category in coco.get("categories", [])]
    categories = [category for category in coco.get("categories", []) if category.get("keypoints")]
    if not categories:
        raise ValueError(f"{annotation_file}: no category lists keypoints (not a keypoints file); categories: {found}")
    if len(categories) > 1:
        categories = [category for category in categories if category.get("id") == COCO_PERSON_CATEGORY]
    if len(categories) != 1:
        raise ValueError(f"{annotation_file}: several categories list keypoints and none is id {COCO_PERSON_CATEGORY}: {found}")
    return categories[0]


def read_keypoint_category(annotation_file) -> dict:
    """The keypoint category record of a COCO keypoints file (`keypoint_category`): its `id` (the results'
    `category_id`), `name` and `keypoints`."""
    return keypoint_category(_read_json(annotation_file, "COCO annotation file"), annotation_file)


def keypoint_metadata(annotation_file=None, metadata_file=None) -> dict:
    """`CMSAConfig` keypoint fields: those of a COCO keypoints file (`keypoint_names` and `skeleton` from its keypoint
    category, COCO's 1-based skeleton made 0-based, and `flip_pairs` read from "left" / "right" in the names,
    `flip_pairs_from_names`), with the fields of `metadata_file` (a JSON object, e.g. `keypoint_sigmas`, `flip_pairs`,
    `upper_body_keypoints`) on top; either may be None. The fields left out take the config's defaults: COCO's for
    COCO's names; else no half-body set and `DEFAULT_KEYPOINT_SIGMA` for every keypoint, with a warning.
    """
    metadata = {}
    if annotation_file is not None:
        category = keypoint_category(_read_json(annotation_file, "COCO annotation file"), annotation_file)
        names = [str(name) for name in category["keypoints"]]
        skeleton = category.get("skeleton") or []
        if any(len(edge) != 2 or not all(1 <= int(i) <= len(names) for i in edge) for edge in skeleton):
            raise ValueError(f"{annotation_file}: the skeleton must hold pairs of 1-based keypoint indices in [1, {len(names)}]")
        metadata = {
            "keypoint_names": names,
            "skeleton": [[int(a) - 1, int(b) - 1] for a, b in skeleton],
            "flip_pairs": flip_pairs_from_names(names),
        }
    if metadata_file is None:
        return metadata
    given = _read_json(metadata_file, "keypoint metadata file")
    if not isinstance(given, dict) or set(given) - set(KEYPOINT_METADATA_FIELDS):
        unknown = sorted(set(given) - set(KEYPOINT_METADATA_FIELDS)) if isinstance(given, dict) else type(given).__name__
        raise ValueError(f"{metadata_file} must hold a JSON object of the fields {list(KEYPOINT_METADATA_FIELDS)}, got {unknown}")
    return {**metadata, **given}


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
