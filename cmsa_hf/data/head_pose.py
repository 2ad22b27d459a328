"""Head pose data sets (300W-LP, AFLW2000-3D, BIWI) as `datasets.Dataset` objects with one row per face.

Angles are in degrees, always in the order (yaw, pitch, roll). 300W-LP and AFLW2000-3D store
`Pose_Para = [pitch, yaw, roll, scale, tx, ty, tz]` with the angles in radians; they are read with the stored
signs, as Hopenet and FSA-Net do. `cmsa_hf.codecs` documents what the signs mean in the image (pinned on
AFLW2000-3D by tests/test_data_head_pose.py) and the rotation-matrix convention.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import scipy.io
from PIL import Image

from ..codecs import rotation_matrix_to_euler


logger = logging.getLogger(__name__)

# BIWI stores its rotations with 6 decimals: a matrix this far from orthonormal (or a reflection) is not a rotation.
ROTATION_TOLERANCE = 1e-2

FEATURES = datasets.Features(
    {
        "image": datasets.Image(decode=False),
        "name": datasets.Value("string"),  # sample id, e.g. "image00002", "AFW_Flip/AFW_134212_1_0", "01/frame_00003"
        "box": datasets.Sequence(datasets.Value("float32"), length=4),  # face crop x, y, width, height (pixels)
        "angles": datasets.Sequence(datasets.Value("float32"), length=3),  # yaw, pitch, roll in degrees
        "image_size": datasets.Sequence(datasets.Value("int32"), length=2),  # width, height
    }
)


def face_box_from_landmarks(points, loosen: float = 0.2, image_size=None) -> list[float]:
    """Hopenet's loose face crop around 2D landmarks (N, 2) as a COCO box [x, y, width, height].

    The tight box of the landmarks grows by 2k times its width on the left and 2k times its height at the top
    (k = `loosen`); then, as Hopenet's `datasets.py` computes it, the right and bottom grow by 2k and 0.6k times
    the already enlarged width and height, i.e. 2k(1 + 2k) w and 0.6k(1 + 2k) h. Landmarks with a negative
    coordinate (AFLW2000-3D marks its invisible ones with x = -1) are left out, where Hopenet's code takes them
    in. With `image_size` (width, height) the box is clipped to the image; Hopenet pads the crop instead.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"Expected landmarks of shape (N, 2), got {points.shape}")
    points = points[(points >= 0).all(1)]
    if not len(points):
        raise ValueError("No visible landmark (all have a negative coordinate)")
    (x_min, y_min), (x_max, y_max) = points.min(0), points.max(0)
    x_min -= 2 * loosen * (x_max - x_min)
    y_min -= 2 * loosen * (y_max - y_min)
    x_max += 2 * loosen * (x_max - x_min)
    y_max += 0.6 * loosen * (y_max - y_min)
    return _box(x_min, y_min, x_max, y_max, image_size)


def _box(x_min, y_min, x_max, y_max, image_size=None) -> list[float]:
    if image_size is not None:
        x_min, y_min = max(x_min, 0.0), max(y_min, 0.0)
        x_max, y_max = min(x_max, image_size[0]), min(y_max, image_size[1])
    return [float(x_min), float(y_min), float(x_max - x_min), float(y_max - y_min)]


def load_300w_lp(root, include_flipped: bool = True, loosen: float = 0.2) -> datasets.Dataset:
    """300W-LP: `root/<AFW|HELEN|IBUG|LFPW>[_Flip]/NAME.jpg + NAME.mat`, or a flat folder of such pairs.

    `root` may also be a zip or tar archive (extracted once into the `datasets` cache). The box is
    `face_box_from_landmarks` of the `pt2d` landmarks; `include_flipped=False` skips the `*_Flip` folders.
    Names are the paths relative to `root` without suffix, e.g. "AFW_Flip/AFW_134212_1_0".
    """
    root = _data_root(root, "300W-LP")
    mat_files = sorted(root.glob("*.mat")) + sorted(
        path for path in root.glob("*/*.mat") if include_flipped or not path.parent.name.endswith("_Flip")
    )
    names = [path.relative_to(root).with_suffix("").as_posix() for path in mat_files]
    rows = [_mat_row(path, path.with_suffix(".jpg"), name, loosen) for path, name in zip(mat_files, names)]
    return _dataset(rows, root)


def load_aflw2000(root, max_angle: float = 99.0, loosen: float = 0.2, return_dropped: bool = False):
    """AFLW2000-3D: `imageNNNNN.mat` label files, each with its `imageNNNNN.jpg` anywhere under `root`.

    `root` is the official flat folder, a folder with `images/` and `labels/`, or a zip archive of either
    (extracted once into the `datasets` cache). The standard protocol drops samples with any |angle| above
    `max_angle` degrees; `return_dropped=True` returns `(dataset, dropped_names)`.
    """
    root = _data_root(root, "AFLW2000-3D")
    images = {path.stem: path for path in root.rglob("*.jpg")}
    rows, dropped = [], []
    for mat_file in sorted(root.rglob("*.mat"), key=lambda path: path.stem):
        row = _mat_row(mat_file, images.get(mat_file.stem, mat_file.with_suffix(".jpg")), mat_file.stem, loosen)
        (rows if np.abs(row["angles"]).max() <= max_angle else dropped).append(row)
    logger.info("AFLW2000-3D: %d kept, %d dropped with an angle beyond +-%g degrees", len(rows), len(dropped), max_angle)
    if dropped and not rows:
        raise ValueError(f"All {len(dropped)} samples of {root} have an angle beyond +-{max_angle} degrees")
    dataset = _dataset(rows, root)
    return (dataset, [row["name"] for row in dropped]) if return_dropped else dataset


def _mat_row(mat_file: Path, image_file: Path, name: str, loosen: float) -> dict:
    if not image_file.is_file():
        raise FileNotFoundError(f"Image {image_file} for label file {mat_file} does not exist")
    try:
        mat = scipy.io.loadmat(mat_file)
    except (scipy.io.matlab.MatReadError, ValueError, TypeError, IndexError, OSError) as error:
        raise ValueError(f"{mat_file} is not a readable MATLAB .mat label file ({error})") from None
    for field in ("Pose_Para", "pt2d"):
        if field not in mat:
            raise ValueError(f"{mat_file} has no {field!r} field")
    if mat["pt2d"].size % 2:
        raise ValueError(
            f"{mat_file}: 'pt2d' holds {mat['pt2d'].size} values (shape {mat['pt2d'].shape}), expected 2 x N "
            "landmark coordinates (a row of x, a row of y)"
        )
    pitch, yaw, roll = np.degrees(mat["Pose_Para"].ravel()[:3])
    if not np.isfinite([pitch, yaw, roll]).all():
        raise ValueError(f"{mat_file}: Pose_Para holds non-finite angles (pitch, yaw, roll = {pitch}, {yaw}, {roll})")
    with Image.open(image_file) as image:
        image_size = image.size
    return {
        "image": {"path": str(image_file), "bytes": None},
        "name": name,
        "box": face_box_from_landmarks(mat["pt2d"].reshape(2, -1).T, loosen, image_size),
        "angles": [float(yaw), float(pitch), float(roll)],
        "image_size": list(image_size),
    }


def load_biwi(root, head_size_mm: float = 250.0) -> datasets.Dataset:
    """BIWI Kinect head pose: `hpdb/NN/frame_XXXXX_rgb.png + frame_XXXXX_pose.txt` and a `rgb.cal` per folder.

    `root` is the `hpdb` folder, a folder holding it, or an archive of either. A pose file holds 3 lines of the head
    rotation matrix, an empty line and the head centre (x y z, mm), both in the depth camera's frame (x right,
    y down, z into the image). The angles are `rotation_matrix_to_euler` of that matrix, as Hopenet and FSA-Net
    read BIWI; the small rotation between the depth and RGB cameras (about 1 degree) is ignored, as there.

    `rgb.cal` holds 3 lines of the RGB intrinsics K, the distortion line, 3 lines of the rotation R and a line of
    the translation T (mm), separated by empty lines; a point X of the depth frame is R @ X + T in the RGB frame
    (the usual extrinsics convention; BIWI's T of about -24 mm in x matches the Kinect's RGB camera sitting right
    of its depth camera). BIWI has no face boxes: the box is a square of side f * head_size_mm / depth centred
    on the projected head centre. The default 250 mm is about Hopenet's loosened AFLW2000 crop (1.8 face
    widths) and keeps the face in the box when the head turns (the face is about 10 cm in front of the head
    centre). Names are "NN/frame_XXXXX".
    """
    root = _data_root(root, "BIWI")
    if (root / "hpdb").is_dir():
        root = root / "hpdb"
    calibrations, rows = {}, []
    for pose_file in sorted(root.glob("*/frame_*_pose.txt")):
        folder = pose_file.parent
        if folder not in calibrations:
            calibrations[folder] = _read_rgb_calibration(folder / "rgb.cal")
        intrinsics, rotation, translation = calibrations[folder]
        image_file = pose_file.with_name(pose_file.name.replace("_pose.txt", "_rgb.png"))
        if not image_file.is_file():
            raise FileNotFoundError(f"Image {image_file} for pose file {pose_file} does not exist")
        with Image.open(image_file) as image:
            image_size = image.size
        head_rotation, centre = _read_pose(pose_file)
        centre = rotation @ centre + translation
        if not centre[2] > 0:
            raise ValueError(f"{pose_file}: the head centre is at depth {centre[2]:g} mm in the RGB camera (must be > 0)")
        u, v = (intrinsics @ centre)[:2] / centre[2]
        half = intrinsics[0, 0] * head_size_mm / centre[2] / 2
        rows.append(
            {
                "image": {"path": str(image_file), "bytes": None},
                "name": f"{folder.name}/{pose_file.name.removesuffix('_pose.txt')}",
                "box": _box(u - half, v - half, u + half, v + half, image_size),
                "angles": list(rotation_matrix_to_euler(head_rotation)),
                "image_size": list(image_size),
            }
        )
    return _dataset(rows, root)


def _number_lines(path: Path, what: str) -> list[np.ndarray]:
    """The non-empty lines of a BIWI text file as arrays of numbers."""
    if not path.is_file():
        raise FileNotFoundError(f"BIWI {what} {path} does not exist")
    try:
        return [np.array(line.split(), dtype=np.float64) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as error:
        raise ValueError(f"{path} is not a BIWI {what}: {error}") from None


def _read_pose(path: Path) -> tuple[np.ndarray, np.ndarray]:
    lines = _number_lines(path, "pose file")
    if [len(line) for line in lines] != [3, 3, 3, 3]:
        raise ValueError(f"{path} is not a BIWI pose file: expected 3 rotation matrix lines and a head centre line")
    matrix = np.stack(lines[:3])
    if not (np.allclose(matrix @ matrix.T, np.eye(3), atol=ROTATION_TOLERANCE) and np.linalg.det(matrix) > 0):
        raise ValueError(
            f"{path}: the head rotation is not a rotation matrix (R R^T = I and det R = +1 to within "
            f"{ROTATION_TOLERANCE}; det R = {np.linalg.det(matrix):.4f})"
        )
    if not np.isfinite(lines[3]).all():
        raise ValueError(f"{path}: the head centre {lines[3]} is not finite")
    return matrix, lines[3]


def _read_rgb_calibration(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lines = _number_lines(path, "calibration file")
    if len(lines) != 8 or any(len(line) != 3 for line in lines[:3] + lines[4:]):
        raise ValueError(f"{path} is not a BIWI calibration file: expected K (3x3), distortion, R (3x3) and T (3)")
    return np.stack(lines[:3]), np.stack(lines[4:7]), lines[7]


def _data_root(root, what: str) -> Path:
    """The data folder; an archive is extracted once into the `datasets` cache, never next to the archive."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{what} data {root} does not exist")
    if root.is_file():
        return Path(datasets.DownloadManager().extract(str(root)))
    return root


def _dataset(rows: list[dict], root: Path) -> datasets.Dataset:
    if not rows:
        raise ValueError(f"No head pose sample found in {root}")
    columns = {name: [row[name] for row in rows] for name in FEATURES}
    return datasets.Dataset.from_dict(columns, features=FEATURES)


@dataclass(frozen=True)
class HeadPoseDataFormat:
    """One on-disk layout of head-pose data: its loader (a folder or zip -> `Dataset`), the data set's name and the
    terms of use its licence sets (which weights trained on it inherit; model cards state them)."""

    load: Callable[[str], datasets.Dataset]
    display_name: str
    terms: str


# The formats training takes (`--train_format`, `--validation_format`), by name.
DATA_FORMATS = {
    "300w_lp": HeadPoseDataFormat(
        load_300w_lp, "300W-LP", "non-commercial research use only (300W-LP, Zhu et al. 2016; the 300-W images' terms)"
    ),
    "aflw2000": HeadPoseDataFormat(
        load_aflw2000, "AFLW2000-3D", "non-commercial research use only (AFLW's academic licence; AFLW2000-3D, Zhu et al. 2016)"
    ),
    "biwi": HeadPoseDataFormat(
        load_biwi, "BIWI Kinect head pose", "non-commercial research use only (the BIWI Kinect Head Pose database licence)"
    ),
}


__all__ = [
    "DATA_FORMATS", "FEATURES", "HeadPoseDataFormat", "face_box_from_landmarks", "load_300w_lp", "load_aflw2000",
    "load_biwi",
]  # fmt: skip
