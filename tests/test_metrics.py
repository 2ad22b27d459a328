import json

import numpy as np
import pytest
import torch
from conftest import make_coco_keypoints

from cmsa_hf.metrics import (
    COCO_SIGMAS,
    coco_keypoint_ap,
    coco_keypoint_results,
    head_pose_mae,
    head_pose_report,
    mirror_sign_agreement,
    object_keypoint_similarity,
    oks_nms,
    oks_nms_per_image,
    pck,
    top_k_accuracy,
)


def test_top_k_accuracy():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    assert top_k_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(logits, labels, 5) == 1.0  # k larger than the class count: every label is in
    with pytest.raises(ValueError):
        top_k_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        top_k_accuracy(logits, torch.tensor([1, 3, 0]))  # would count as a miss, not as an error, unchecked
    with pytest.raises(ValueError, match=r"logits \(N, classes\) and labels \(N,\)"):
        top_k_accuracy(logits, labels[:2])


# ---------------------------------------------------------------------------------------------- human pose


def test_pck_counts_labelled_keypoints_within_the_threshold():
    target = np.zeros((2, 3, 2))
    predicted = np.array([[[1, 0], [6, 0], [0, 0]], [[0, 4], [0, 0], [50, 50]]], dtype=float)
    visible = np.array([[2, 2, 1], [2, 0, 0]])
    # normalizer 100, threshold 0.05: within 5 pixels -> 1 (yes), 6 (no), 0 (yes), 4 (yes); unlabelled ignored
    assert pck(predicted, target, visible, np.array([100.0, 100.0])) == 0.75
    with pytest.raises(ValueError, match="at least one labelled keypoint"):
        pck(predicted, target, np.zeros((2, 3)), np.ones(2))
    with pytest.raises(ValueError, match=r"target \(N, K, 2\)"):
        pck(predicted, target[:, :2], visible, np.ones(2))
    with pytest.raises(ValueError, match=r"visible \(N, K\)"):
        pck(predicted, target, visible[:, :2], np.ones(2))
    with pytest.raises(ValueError, match="one normalizer per pose"):
        pck(predicted, target, visible, np.ones(3))


def _ground_truth_results(annotation_file, shift=0.0):
    coco = json.loads(annotation_file.read_text())
    people = [a for a in coco["annotations"] if a["num_keypoints"] > 0 and not a["iscrowd"]]
    keypoints = np.stack([np.asarray(a["keypoints"]).reshape(17, 3)[:, :2] for a in people]) + shift
    return coco_keypoint_results([a["image_id"] for a in people], keypoints, np.ones((len(people), 17)), np.ones(len(people)))


def test_coco_keypoint_ap_through_pycocotools(tmp_path):
    annotation_file = make_coco_keypoints(tmp_path / "coco")
    perfect = coco_keypoint_ap(annotation_file, _ground_truth_results(annotation_file), tmp_path / "results.json")
    assert set(perfect) >= {"AP", "AP50", "AP75", "APm", "APl", "AR"}
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AR"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "results.json").read_text())[0]["category_id"] == 1  # the file COCOeval read
    shifted = coco_keypoint_ap(annotation_file, _ground_truth_results(annotation_file, shift=3.0), tmp_path / "r.json")
    assert shifted["AP"] < 0.9
    with pytest.raises(ValueError, match="No keypoint results"):
        coco_keypoint_ap(annotation_file, [], tmp_path / "empty.json")


def test_coco_keypoint_ap_uses_the_given_sigmas_and_refuses_mismatches(tmp_path):
    annotation_file = make_coco_keypoints(tmp_path / "coco")
    shifted = _ground_truth_results(annotation_file, shift=3.0)
    default = coco_keypoint_ap(annotation_file, shifted, tmp_path / "r.json")
    assert coco_keypoint_ap(annotation_file, shifted, tmp_path / "r.json", sigmas=COCO_SIGMAS) == default
    assert coco_keypoint_ap(annotation_file, shifted, tmp_path / "r.json", sigmas=3 * COCO_SIGMAS)["AP"] > default["AP"]
    with pytest.raises(ValueError, match="14 sigmas for the 17 keypoints"):
        coco_keypoint_ap(annotation_file, shifted, tmp_path / "r.json", sigmas=COCO_SIGMAS[:14])
    other_category = [{**result, "category_id": 3} for result in shifted]
    with pytest.raises(ValueError, match=r"category_id 3, not a keypoint category .*\[1\]"):
        coco_keypoint_ap(annotation_file, other_category, tmp_path / "r.json")
    fewer = [{**result, "keypoints": result["keypoints"][:42]} for result in shifted]
    with pytest.raises(ValueError, match="a result has 14 keypoints, .* has 17"):
        coco_keypoint_ap(annotation_file, fewer, tmp_path / "r.json")


def test_pose_score_is_box_score_times_confident_keypoints():
    scores = np.array([[0.9, 0.5, 0.1]])
    (result,) = coco_keypoint_results([7], np.zeros((1, 3, 2)), scores, [0.5], visible_threshold=0.2)
    assert result["image_id"] == 7 and len(result["keypoints"]) == 9
    assert result["score"] == pytest.approx(0.5 * 0.7)


def test_oks_nms_drops_duplicates_only():
    pose = np.random.default_rng(0).uniform(0, 100, (17, 2))
    poses = np.stack([pose, pose + 0.5, pose + 60])
    keep = oks_nms(poses, np.array([0.8, 0.9, 0.7]), np.array([5000.0, 5000.0, 5000.0]))
    assert keep == [1, 2]  # the best of the two near-identical poses, and the distinct one
    assert object_keypoint_similarity(pose, pose[None], 5000.0)[0] == pytest.approx(1.0)


def test_oks_nms_per_image_suppresses_within_each_image_only():
    pose = np.random.default_rng(0).uniform(0, 50, (17, 2))
    poses = np.stack([pose, pose + 0.2, pose, pose + 30])
    keep = oks_nms_per_image([1, 1, 2, 2], poses, [0.5, 0.9, 0.8, 0.7], np.full(4, 2000.0))
    assert keep.tolist() == [1, 2, 3]  # the duplicate in image 1 goes; image 2's distinct poses both stay


def test_oks_follows_the_sets_sigmas():
    pose = np.random.default_rng(0).uniform(0, 100, (5, 2))
    near = pose + 2.0
    strict, loose = (object_keypoint_similarity(pose, near[None], 2000.0, [s] * 5)[0] for s in (0.03, 0.1))
    assert strict < loose < 1.0
    poses, scores, areas = np.stack([pose, near]), np.array([0.9, 0.8]), np.full(2, 2000.0)
    assert oks_nms(poses, scores, areas, threshold=0.9, sigmas=[0.03] * 5) == [0, 1]  # distinct under tight sigmas
    assert oks_nms(poses, scores, areas, threshold=0.9, sigmas=[0.5] * 5) == [0]  # duplicates under loose ones
    with pytest.raises(ValueError, match="17 OKS sigmas for poses of 5 keypoints"):
        oks_nms(poses, scores, areas)  # COCO's sigmas do not fit a 5-keypoint set


def test_pck_checks_its_shapes():
    with pytest.raises(ValueError, match=r"\(N, K, 2\) and visible \(N, K\)"):
        pck(np.zeros((2, 5, 2)), np.zeros((2, 4, 2)), np.ones((2, 5)), np.ones(2))
    with pytest.raises(ValueError, match="one normalizer per pose"):
        pck(np.zeros((2, 5, 2)), np.zeros((2, 5, 2)), np.ones((2, 5)), np.ones(3))


def test_head_pose_mae_and_report():
    target = np.array([[10.0, -5.0, 0.0], [-30.0, 5.0, 20.0]])
    mae = head_pose_mae(target + np.array([[2.0, -1.0, 0.0], [-4.0, 3.0, 6.0]]), target)
    assert mae == pytest.approx({"yaw": 3.0, "pitch": 2.0, "roll": 3.0, "mean": 8 / 3})
    assert "| model | 3.00 | 2.00 | 3.00 | 2.67 |" in head_pose_report({"model": mae})
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        head_pose_mae(target[:, :2], target[:, :2])


def test_mirror_sign_agreement_counts_strong_angles_only():
    target = np.array([[40.0, 0.0, -30.0], [-20.0, 0.0, 5.0], [5.0, 0.0, 25.0]])
    predicted = np.array([[35.0, 1.0, -10.0], [-15.0, 2.0, 1.0], [3.0, 0.0, 10.0]])
    mirrored = np.array([[-30.0, 1.0, -4.0], [-2.0, 2.0, 1.0], [3.0, 0.0, -8.0]])
    # yaw: faces 0 and 1 count (|yaw| > 15), only face 0 flips; roll: faces 0 and 2 count, only face 2 flips.
    assert mirror_sign_agreement(predicted, mirrored, target) == {"yaw": 0.5, "roll": 0.5}
    assert mirror_sign_agreement(predicted, -predicted, target) == {"yaw": 1.0, "roll": 1.0}
    assert np.isnan(mirror_sign_agreement(predicted, mirrored, target, min_angle=90)["yaw"])
    with pytest.raises(ValueError, match="three"):
        mirror_sign_agreement(predicted, mirrored[:2], target)
