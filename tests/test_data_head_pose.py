"""Head pose data (300W-LP, AFLW2000-3D, BIWI) to a datasets.Dataset: the angle convention pinned on real
AFLW2000-3D faces, the rotation matrices, Hopenet's face box, fixtures in the official layouts and clear errors."""

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from conftest import SHARED_DATA
from PIL import Image

from cmsa_hf.codecs import euler_to_rotation_matrix, mirror_angles, rotation_matrix_to_euler
from cmsa_hf.data.head_pose import FEATURES, face_box_from_landmarks, load_300w_lp, load_aflw2000, load_biwi


AFLW2000_ZIP = SHARED_DATA / "aflw2000-half.zip"
SAMPLE_300W_LP = SHARED_DATA / "300w-lp-sample"


def _require(path: Path):
    if not path.exists():
        pytest.skip(f"{path} is not available (real head pose data lives outside the repository)")


@pytest.fixture(scope="module")
def aflw2000():
    """The kept rows, the dropped names and, per kept row, the 68 projected 3D landmarks (pt3d_68, x y)."""
    _require(AFLW2000_ZIP)
    dataset, dropped = load_aflw2000(AFLW2000_ZIP, return_dropped=True)
    labels = Path(dataset[0]["image"]["path"]).parents[1] / "labels"
    landmarks = np.stack([scipy.io.loadmat(labels / f"{name}.mat")["pt3d_68"][:2].T for name in dataset["name"]])
    return dataset, dropped, landmarks


def test_aflw2000_half_loads_with_the_99_degree_filter(aflw2000):
    dataset, dropped, _ = aflw2000
    angles = np.asarray(dataset["angles"])
    print(f"\nAFLW2000-3D half: {len(dataset)} loaded, {len(dropped)} dropped by the +-99 degree filter")
    for name, values in zip(("yaw", "pitch", "roll"), angles.T):
        stats = f"mean {values.mean():7.2f}  std {values.std():6.2f}  min {values.min():7.2f}  max {values.max():7.2f}"
        print(f"  {name:5s} {stats}")
    assert len(dataset) + len(dropped) == 1000 and dataset.features == FEATURES
    assert np.abs(angles).max() <= 99.0 and not set(dropped) & set(dataset["name"])
    path = Path(dataset[0]["image"]["path"])
    assert path.is_file() and SHARED_DATA not in path.parents  # extracted into the cache, not next to the zip
    boxes, sizes = np.asarray(dataset["box"]), np.asarray(dataset["image_size"])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= sizes + 1e-3).all() and (boxes[:, 2:] > 20).all()


def test_convention_pinned_on_real_faces(aflw2000):
    dataset, _, landmarks = aflw2000
    yaw, pitch, roll = np.asarray(dataset["angles"]).T
    boxes = np.asarray(dataset["box"])
    nose, bridge, chin = landmarks[:, 30], landmarks[:, 27], landmarks[:, 8]
    # positive yaw: the face turns to the image's left, its nose tip left of the face box centre
    nose_offset = nose[:, 0] - (boxes[:, 0] + boxes[:, 2] / 2)
    assert (nose_offset[yaw > 45] < 0).all() and (nose_offset[yaw < -45] > 0).all()
    assert (yaw > 45).sum() > 50 and (yaw < -45).sum() > 50
    # in the mirrored image (landmarks x -> 450 - x, box recomputed) the same rule holds with the mirrored angles
    for points, angles in zip(landmarks[np.abs(yaw) > 45], np.asarray(dataset["angles"])[np.abs(yaw) > 45]):
        points = np.stack([450 - points[:, 0], points[:, 1]], 1)
        x, _, width, _ = face_box_from_landmarks(points, 0.2, (450, 450))
        assert (points[30, 0] < x + width / 2) == (mirror_angles(angles)[0] > 0)
    # positive pitch: the face turns up, the nose tip moves up towards the eyes (nearly frontal faces)
    eyes, mouth = landmarks[:, 36:48, 1].mean(1), landmarks[:, 48:68, 1].mean(1)
    nose_height = (nose[:, 1] - eyes) / (mouth - eyes)  # 0 at the eyes, 1 at the mouth
    up, down = (np.abs(yaw) < 30) & (pitch > 20), (np.abs(yaw) < 30) & (pitch < -20)
    assert up.sum() > 10 and down.sum() > 10
    assert np.mean(nose_height[up] < 0.45) > 0.9 and np.mean(nose_height[down] > 0.55) > 0.9
    # positive roll: the head tilts clockwise in the image, the chin left of the nose bridge
    frontal = (np.abs(yaw) < 30) & (np.abs(pitch) < 30)
    chin_offset = chin[:, 0] - bridge[:, 0]
    assert (chin_offset[frontal & (roll > 20)] < 0).all() and (chin_offset[frontal & (roll < -20)] > 0).all()


def test_300w_lp_sample_loads():
    _require(SAMPLE_300W_LP)
    dataset = load_300w_lp(SAMPLE_300W_LP)
    row = dataset[0]
    assert len(dataset) == 1 and row["name"] == "IBUG_image_008_1_0" and row["image_size"] == [450, 450]
    pose = scipy.io.loadmat(SAMPLE_300W_LP / "IBUG_image_008_1_0.mat")["Pose_Para"][0]
    np.testing.assert_allclose(row["angles"], np.degrees(pose[[1, 0, 2]]), atol=1e-4)
    nose_x = scipy.io.loadmat(SAMPLE_300W_LP / "IBUG_image_008_1_0.mat")["pt2d"][0, 30]
    assert row["angles"][0] < -30 and nose_x > row["box"][0] + row["box"][2] / 2  # negative yaw: nose to the right


def _write_sample(folder: Path, name: str, angles, points, size=(64, 48), fields=("Pose_Para", "pt2d"), image=True):
    """A jpg + mat pair as in 300W-LP / AFLW2000-3D (Pose_Para: pitch, yaw, roll in radians, scale, translation)."""
    folder.mkdir(parents=True, exist_ok=True)
    yaw, pitch, roll = np.radians(angles)
    content = {"Pose_Para": np.array([[pitch, yaw, roll, 1.0, 0.0, 0.0, 0.0]]), "pt2d": np.asarray(points, float).T}
    scipy.io.savemat(folder / f"{name}.mat", {key: content[key] for key in fields})
    if image:
        Image.new("RGB", size, (90, 60, 40)).save(folder / f"{name}.jpg")


POINTS = [(20, 12), (40, 12), (30, 22), (24, 32), (36, 32)]


def test_300w_lp_official_layout_and_flipped_folders(tmp_path):
    _write_sample(tmp_path / "AFW", "AFW_1_0", (30, -10, 5), POINTS)
    _write_sample(tmp_path / "AFW_Flip", "AFW_1_0", mirror_angles((30, -10, 5)), [(64 - x, y) for x, y in POINTS])
    _write_sample(tmp_path / "IBUG", "IBUG_2_0", (-20, 15, 0), POINTS)
    (tmp_path / "landmarks" / "AFW").mkdir(parents=True)  # 300W-LP's separate landmark files are not samples
    scipy.io.savemat(tmp_path / "landmarks" / "AFW" / "AFW_1_0_pts.mat", {"pts_2d": np.zeros((68, 2))})
    everything = load_300w_lp(tmp_path)
    assert everything["name"] == ["AFW/AFW_1_0", "AFW_Flip/AFW_1_0", "IBUG/IBUG_2_0"]
    np.testing.assert_allclose(everything["angles"][1], [-30, -10, -5], atol=1e-4)
    assert load_300w_lp(tmp_path, include_flipped=False)["name"] == ["AFW/AFW_1_0", "IBUG/IBUG_2_0"]


def test_face_box_follows_hopenet():
    points = [(10, 20), (30, 60), (-1, 452)]  # the last one is invisible (AFLW2000-3D's marker)
    # left and top: 2k of the tight 20 x 40 box; right and bottom: 2k and 0.6k of the box grown left and up
    np.testing.assert_allclose(face_box_from_landmarks(points), [2, 4, 39.2, 62.72])
    np.testing.assert_allclose(face_box_from_landmarks(points, 0.2, (40, 64)), [2, 4, 38, 60])
    np.testing.assert_allclose(face_box_from_landmarks(points, 0.0), [10, 20, 20, 40])
    with pytest.raises(ValueError, match="No visible landmark"):
        face_box_from_landmarks([(-1, 452)])


def test_rotation_matrix_round_trip():
    rng = np.random.default_rng(0)
    for yaw, pitch, roll in np.stack([rng.uniform(-90, 90, 50), rng.uniform(-89, 89, 50), rng.uniform(-90, 90, 50)], 1):
        matrix = euler_to_rotation_matrix(yaw, pitch, roll)
        np.testing.assert_allclose(matrix @ matrix.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(matrix) == pytest.approx(1.0)
        np.testing.assert_allclose(rotation_matrix_to_euler(matrix), [yaw, pitch, roll], atol=1e-8)
    with pytest.raises(ValueError, match="3x3"):
        rotation_matrix_to_euler(np.eye(4))


def test_matrices_match_hopenet():
    yaw, pitch, roll = 35.0, -20.0, 12.0
    matrix = euler_to_rotation_matrix(yaw, pitch, roll)
    # Hopenet's utils.draw_axis: the red, green and blue axes it draws from the image point of the face
    p, y, r = np.radians(pitch), -np.radians(yaw), np.radians(roll)
    red = [np.cos(y) * np.cos(r), np.cos(p) * np.sin(r) + np.cos(r) * np.sin(p) * np.sin(y)]
    green = [-np.cos(y) * np.sin(r), np.cos(p) * np.cos(r) - np.sin(p) * np.sin(y) * np.sin(r)]
    blue = [np.sin(y), -np.cos(y) * np.sin(p)]
    np.testing.assert_allclose([matrix[:2, 0], matrix[:2, 1], -matrix[:2, 2]], [red, green, blue], atol=1e-12)
    # Hopenet's and FSA-Net's reading of a BIWI matrix
    m = matrix.T
    hopenet_yaw = -np.arctan2(-m[2, 0], np.hypot(m[2, 1], m[2, 2]))
    hopenet = [hopenet_yaw, np.arctan2(m[2, 1], m[2, 2]), -np.arctan2(m[1, 0], m[0, 0])]
    np.testing.assert_allclose(np.degrees(hopenet), [yaw, pitch, roll], atol=1e-10)


def test_flip_negates_yaw_and_roll():
    np.testing.assert_allclose(mirror_angles([30.0, -10.0, 5.0]), [-30.0, -10.0, -5.0])
    np.testing.assert_allclose(mirror_angles([[1, 2, 3], [-4, 5, -6]]), [[-1, 2, -3], [4, 5, 6]])
    mirror = np.diag([-1.0, 1.0, 1.0])  # x -> -x, the horizontal flip
    for angles in ([30.0, -10.0, 5.0], [-70.0, 40.0, -25.0]):
        mirrored = mirror @ euler_to_rotation_matrix(*angles) @ mirror
        np.testing.assert_allclose(rotation_matrix_to_euler(mirrored), mirror_angles(angles), atol=1e-10)


FOCAL, CENTRE, EXTRINSIC_T = 500.0, (320.0, 240.0), np.array([-24.0, 6.0, -13.0])


def _make_biwi(root: Path) -> dict:
    """hpdb/NN/frame_XXXXX_rgb.png + _pose.txt and rgb.cal, as in the BIWI Kinect head pose database."""
    truth, rotation = {}, euler_to_rotation_matrix(0.5, -0.3, 0.2)
    for subject, (yaw, pitch, roll) in (("01", (40.0, -15.0, 8.0)), ("02", (-25.0, 30.0, -12.0))):
        folder = root / "hpdb" / subject
        folder.mkdir(parents=True)
        lines = [f"{FOCAL} 0 {CENTRE[0]}", f"0 {FOCAL} {CENTRE[1]}", "0 0 1", "", "0 0 0 0", ""]
        lines += [" ".join(f"{v:.8f}" for v in row) for row in rotation] + ["", " ".join(map(str, EXTRINSIC_T))]
        (folder / "rgb.cal").write_text("\n".join(lines) + "\n")
        for frame, shift in (("00003", 0.0), ("00004", 5.0)):
            head = np.array([40.0 + shift, -30.0, 900.0 + 10 * shift])
            matrix = euler_to_rotation_matrix(yaw + shift, pitch, roll)
            text = "\n".join(" ".join(f"{v:.8f}" for v in row) for row in matrix) + "\n\n" + " ".join(map(str, head)) + "\n"
            (folder / f"frame_{frame}_pose.txt").write_text(text)
            Image.new("RGB", (640, 480)).save(folder / f"frame_{frame}_rgb.png")
            truth[f"{subject}/frame_{frame}"] = ((yaw + shift, pitch, roll), rotation @ head + EXTRINSIC_T)
    return truth


def test_biwi_official_layout(tmp_path):
    truth = _make_biwi(tmp_path)
    dataset = load_biwi(tmp_path, head_size_mm=200.0)
    assert dataset["name"] == list(truth) and dataset.features == FEATURES
    for row in dataset:
        angles, head = truth[row["name"]]
        np.testing.assert_allclose(row["angles"], angles, atol=1e-4)
        x, y, width, height = row["box"]
        centre = FOCAL * head[:2] / head[2] + CENTRE
        np.testing.assert_allclose([x + width / 2, y + height / 2], centre, atol=1e-3)
        assert width == pytest.approx(FOCAL * 200 / head[2], rel=1e-5) and width == pytest.approx(height)
        assert row["image_size"] == [640, 480]
    assert len(load_biwi(tmp_path / "hpdb")) == 4


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="AFLW2000-3D data .*nowhere does not exist"):
        load_aflw2000(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="BIWI data"):
        load_biwi(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No head pose sample found"):
        load_300w_lp(tmp_path / "empty")

    _write_sample(tmp_path / "no_pose", "image00001", (0, 0, 0), POINTS, fields=("pt2d",))
    with pytest.raises(ValueError, match="image00001.mat has no 'Pose_Para' field"):
        load_aflw2000(tmp_path / "no_pose")
    _write_sample(tmp_path / "no_points", "image00001", (0, 0, 0), POINTS, fields=("Pose_Para",))
    with pytest.raises(ValueError, match="image00001.mat has no 'pt2d' field"):
        load_300w_lp(tmp_path / "no_points")
    _write_sample(tmp_path / "no_image", "image00001", (0, 0, 0), POINTS, image=False)
    with pytest.raises(FileNotFoundError, match="image00001.jpg for label file .*image00001.mat"):
        load_aflw2000(tmp_path / "no_image")
    _write_sample(tmp_path / "extreme", "image00001", (120, 0, 0), POINTS)
    with pytest.raises(ValueError, match="All 1 samples .* beyond"):
        load_aflw2000(tmp_path / "extreme")


def test_bad_biwi_files_are_clear_errors(tmp_path):
    _make_biwi(tmp_path)
    pose = tmp_path / "hpdb" / "02" / "frame_00004_pose.txt"
    pose.write_text("1 0 0\n0 1 0\n\n40 -30 900\n")
    with pytest.raises(ValueError, match="frame_00004_pose.txt is not a BIWI pose file"):
        load_biwi(tmp_path)
    pose.write_text("1 0 0\n0 one 0\n0 0 1\n\n40 -30 900\n")
    with pytest.raises(ValueError, match="frame_00004_pose.txt is not a BIWI pose file"):
        load_biwi(tmp_path)
    (tmp_path / "hpdb" / "01" / "frame_00003_rgb.png").unlink()
    with pytest.raises(FileNotFoundError, match="frame_00003_rgb.png for pose file"):
        load_biwi(tmp_path)
    (tmp_path / "hpdb" / "01" / "rgb.cal").unlink()
    with pytest.raises(FileNotFoundError, match="BIWI calibration file .*rgb.cal does not exist"):
        load_biwi(tmp_path)


@pytest.mark.parametrize("loader", [load_300w_lp, load_aflw2000])
def test_nan_angles_in_a_mat_file_are_refused(tmp_path, loader):
    _write_sample(tmp_path, "image00001", (30, -10, 5), POINTS)
    _write_sample(tmp_path, "image00002", (float("nan"), -10, 5), POINTS)
    with pytest.raises(ValueError, match=r"image00002.mat: Pose_Para holds non-finite angles"):
        loader(tmp_path)


@pytest.mark.parametrize(
    "rotation, message",
    [
        ("2 0 0\n0 2 0\n0 0 2", r"frame_00004_pose.txt: the head rotation is not a rotation matrix .*det R = 8.0000"),
        ("1 0 0\n0 1 0\n0 0 -1", r"frame_00004_pose.txt: the head rotation is not a rotation matrix .*det R = -1.0000"),
        ("1 0.5 0\n0 1 0\n0 0 1", r"frame_00004_pose.txt: the head rotation is not a rotation matrix"),
    ],
    ids=["scaled", "reflection", "sheared"],
)
def test_a_biwi_rotation_that_is_not_a_rotation_is_refused(tmp_path, rotation, message):
    _make_biwi(tmp_path)
    (tmp_path / "hpdb" / "02" / "frame_00004_pose.txt").write_text(rotation + "\n\n40 -30 900\n")
    with pytest.raises(ValueError, match=message):
        load_biwi(tmp_path)


def test_a_biwi_head_centre_at_depth_zero_is_refused(tmp_path):
    _make_biwi(tmp_path)
    # The calibration moves z by EXTRINSIC_T[2] (and rotates slightly): this centre lands at depth <= 0 in the RGB frame.
    (tmp_path / "hpdb" / "01" / "frame_00003_pose.txt").write_text("1 0 0\n0 1 0\n0 0 1\n\n0 0 0\n")
    with pytest.raises(ValueError, match=r"frame_00003_pose.txt: the head centre is at depth -?[\d.]+ mm in the RGB camera"):
        load_biwi(tmp_path)


def test_a_corrupt_mat_file_is_named(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "IBUG_image_008_1_0.jpg")
    (tmp_path / "IBUG_image_008_1_0.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated" + bytes(20))
    with pytest.raises(ValueError, match=r"IBUG_image_008_1_0.mat is not a readable MATLAB .mat label file"):
        load_300w_lp(tmp_path)


def test_an_odd_length_pt2d_is_named(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "image00002.jpg")
    scipy.io.savemat(tmp_path / "image00002.mat", {"Pose_Para": np.zeros((1, 7)), "pt2d": np.arange(41.0)[None]})
    with pytest.raises(ValueError, match=r"image00002.mat: 'pt2d' holds 41 values .*expected 2 x N"):
        load_aflw2000(tmp_path)
