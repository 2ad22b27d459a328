"""Evaluation metrics as pure functions (COCO OKS AP through pycocotools, with any keypoint set's sigmas)."""

import contextlib
import io
import json

import numpy as np
import torch

from .configuration_cmsa import COCO_KEYPOINT_SIGMAS


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose label is among the k highest logits. logits (N, classes), labels (N,)."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"top_k_accuracy needs logits (N, classes) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("top_k_accuracy needs at least one sample")
    if labels.min() < 0 or labels.max() >= logits.shape[-1]:
        classes = logits.shape[-1]
        raise ValueError(f"labels must lie in [0, {classes}) for {classes} classes, got {labels.min()} to {labels.max()}")
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == labels.unsqueeze(-1)).any(dim=-1).float().mean().item()


# ---------------------------------------------------------------------------------------------- human pose

COCO_KEYPOINT_STATS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def coco_keypoint_ap(annotation_file, results: list[dict], results_file, image_ids=None, sigmas=None) -> dict:
    """COCO OKS AP / AR of keypoint `results` with pycocotools' COCOeval.

    `results` are COCO results entries (`image_id`, `category_id`, `keypoints` [x, y, score] * K, `score`); they
    are written to `results_file` first, and the evaluation reads that file, as the official protocol does. The
    evaluation covers `image_ids` (default: every image of the annotation file, so that persons in images without
    a result count as missed). `sigmas` (K,) are the keypoint set's OKS sigmas (`config.keypoint_sigmas`;
    pycocotools' COCO person sigmas when None, which only a 17-keypoint set may use).
    """
    from pycocotools.coco import COCO  # the `pose` extra
    from pycocotools.cocoeval import COCOeval

    if not results:
        raise ValueError("No keypoint results to evaluate")
    with open(results_file, "w") as handle:
        json.dump(results, handle)
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(annotation_file))
    num_keypoints = _check_keypoint_results(ground_truth, results, annotation_file)
    if sigmas is not None and np.shape(sigmas) != (num_keypoints,):
        raise ValueError(f"{len(sigmas)} sigmas for the {num_keypoints} keypoints of {annotation_file}: give one per keypoint")
    if sigmas is None and num_keypoints != len(COCO_KEYPOINT_SIGMAS):
        raise ValueError(f"{annotation_file} has {num_keypoints} keypoints, not COCO's 17: pass the set's sigmas=")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(str(results_file)), "keypoints")
        if sigmas is not None:
            evaluation.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        evaluation.params.imgIds = sorted(image_ids) if image_ids is not None else ground_truth.getImgIds()
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: float(value) for name, value in zip(COCO_KEYPOINT_STATS, evaluation.stats)}


def _check_keypoint_results(ground_truth, results: list[dict], annotation_file) -> int:
    """The keypoint count of the annotation file's keypoint categories; results of another count or category are
    errors (COCOeval would fail on a broadcast, or silently score them 0)."""
    counts = {category["id"]: len(category.get("keypoints", [])) for category in ground_truth.loadCats(ground_truth.getCatIds())}
    counts = {category_id: count for category_id, count in counts.items() if count}
    if len(set(counts.values())) != 1:
        raise ValueError(f"{annotation_file} must have keypoint categories of one keypoint count, got {counts or 'none'}")
    (num_keypoints,) = set(counts.values())
    for result in results:
        if result.get("category_id") not in counts:
            raise ValueError(
                f"a result has category_id {result.get('category_id')}, not a keypoint category of {annotation_file} "
                f"({sorted(counts)}): give coco_keypoint_results the set's category_id"
            )
        if len(result["keypoints"]) != 3 * num_keypoints:
            raise ValueError(
                f"a result has {len(result['keypoints']) // 3} keypoints, {annotation_file} has {num_keypoints}"
            )
    return num_keypoints


def pck(predicted, target, visible, normalizer, threshold: float = 0.05) -> float:
    """Percentage of correct keypoints: the share of labelled keypoints within `threshold * normalizer` pixels.

    predicted, target (N, K, 2); visible (N, K) (labelled when > 0); normalizer (N,), e.g. the box diagonal.
    """
    predicted, target = np.asarray(predicted, dtype=np.float64), np.asarray(target, dtype=np.float64)
    labelled = np.asarray(visible) > 0
    if predicted.shape != target.shape or predicted.ndim != 3 or labelled.shape != predicted.shape[:2]:
        raise ValueError(f"pck needs predicted, target (N, K, 2) and visible (N, K), got {predicted.shape}, {target.shape}, {labelled.shape}")
    if np.shape(normalizer) != predicted.shape[:1]:
        raise ValueError(f"pck needs one normalizer per pose ({predicted.shape[0]}), got shape {np.shape(normalizer)}")
    if not labelled.any():
        raise ValueError("pck needs at least one labelled keypoint")
    distance = np.linalg.norm(predicted - target, axis=-1) / np.asarray(normalizer, dtype=np.float64)[:, None]
    return float((distance[labelled] <= threshold).mean())


COCO_SIGMAS = np.asarray(COCO_KEYPOINT_SIGMAS)


def object_keypoint_similarity(keypoints, others, area: float, sigmas=COCO_SIGMAS) -> np.ndarray:
    """OKS between one pose (K, 2) and others (M, K, 2) for an object of `area` (COCO's definition); `sigmas` (K,)
    the set's (`config.keypoint_sigmas`)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if sigmas.shape != np.shape(keypoints)[-2:-1]:
        raise ValueError(f"{len(sigmas)} OKS sigmas for poses of {np.shape(keypoints)[-2]} keypoints: give one per keypoint")
    variances = (2 * sigmas) ** 2
    squared = ((np.asarray(others) - np.asarray(keypoints)) ** 2).sum(-1)
    return np.exp(-squared / variances / (2 * (area + np.spacing(1)))).mean(-1)


OKS_NMS_THRESHOLD = 0.9  # HRNet's detected-box protocol


def oks_nms(poses, scores, areas, threshold: float = OKS_NMS_THRESHOLD, sigmas=COCO_SIGMAS) -> list[int]:
    """Greedy non-maximum suppression by OKS (HRNet's detected-box protocol): indices of the poses kept. poses
    (N, K, 2), scores (N,), areas (N,); `sigmas` (K,) the set's OKS sigmas."""
    order = list(np.argsort(scores)[::-1])
    keep = []
    while order:
        best, order = order[0], order[1:]
        keep.append(int(best))
        if order:
            similarity = object_keypoint_similarity(poses[best], np.asarray(poses)[order], areas[best], sigmas)
            order = [i for i, s in zip(order, similarity) if s <= threshold]
    return keep


def coco_keypoint_results(
    image_ids, keypoints, keypoint_scores, box_scores, visible_threshold: float = 0.2, category_id: int = 1
) -> list[dict]:
    """COCO results entries for predicted poses: keypoints (N, K, 2) in image pixels, keypoint_scores (N, K),
    box_scores (N,), all of category `category_id` (COCO's person: 1). The pose score is the box score times the
    mean of the keypoint scores above `visible_threshold` (HRNet's rescoring)."""
    keypoints, keypoint_scores = np.asarray(keypoints, dtype=np.float64), np.asarray(keypoint_scores, dtype=np.float64)
    results = []
    for image_id, points, scores, box_score in zip(image_ids, keypoints, keypoint_scores, box_scores):
        confident = scores[scores > visible_threshold]
        quality = confident.mean() if confident.size else 0.0
        triplets = np.concatenate([points, scores[:, None]], axis=1).ravel()
        results.append(
            {"image_id": int(image_id), "category_id": int(category_id), "keypoints": triplets.round(3).tolist(), "score": float(box_score * quality)}
        )
    return results


def oks_nms_per_image(image_ids, poses, scores, areas, threshold: float = OKS_NMS_THRESHOLD, sigmas=COCO_SIGMAS) -> np.ndarray:
    """`oks_nms` within each image: the sorted indices of the poses (N, K, 2) that survive among their own image's."""
    image_ids, poses, scores, areas = (np.asarray(values) for values in (image_ids, poses, scores, areas))
    kept = []
    for image_id in np.unique(image_ids):
        members = np.flatnonzero(image_ids == image_id)
        kept.extend(members[oks_nms(poses[members], scores[members], areas[members], threshold, sigmas)])
    return np.sort(np.asarray(kept, dtype=np.int64))


# ---------------------------------------------------------------------------------------------- head pose

ANGLE_NAMES = ("yaw", "pitch", "roll")


def head_pose_mae(predicted, target) -> dict:
    """Mean absolute error in degrees per angle and their mean: predicted, target (N, 3) yaw, pitch, roll."""
    predicted, target = np.asarray(predicted, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if predicted.shape != target.shape or predicted.ndim != 2 or predicted.shape[1] != 3 or not len(predicted):
        raise ValueError(f"head_pose_mae needs two (N, 3) arrays with N > 0, got {predicted.shape} and {target.shape}")
    errors = np.abs(predicted - target).mean(axis=0)
    return {**dict(zip(ANGLE_NAMES, errors.tolist())), "mean": float(errors.mean())}


def mirror_sign_agreement(predicted, mirrored, target, min_angle: float = 15.0) -> dict:
    """How often the mirrored face's prediction has the opposite sign for yaw and roll (the convention: a mirror
    negates both), over the faces whose true |angle| exceeds `min_angle` degrees. predicted, mirrored, target (N, 3)
    yaw, pitch, roll. Returns {"yaw": fraction, "roll": fraction} (NaN where no face qualifies)."""
    predicted, mirrored, target = (np.asarray(a, dtype=np.float64) for a in (predicted, mirrored, target))
    if not predicted.shape == mirrored.shape == target.shape or predicted.ndim != 2 or predicted.shape[1] != 3:
        raise ValueError(
            f"mirror_sign_agreement needs three (N, 3) arrays, got {predicted.shape}, {mirrored.shape}, {target.shape}"
        )
    agreement = {}
    for name in ("yaw", "roll"):
        index = ANGLE_NAMES.index(name)
        strong = np.abs(target[:, index]) > min_angle
        opposite = np.sign(predicted[strong, index]) == -np.sign(mirrored[strong, index])
        agreement[name] = float(opposite.mean()) if strong.any() else float("nan")
    return agreement


def head_pose_report(results: dict[str, dict]) -> str:
    """The standard table: one row per (model or baseline, test set), MAE of yaw, pitch, roll and their mean."""
    lines = ["| | yaw | pitch | roll | MAE |", "|---|---|---|---|---|"]
    for name, mae in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{mae[key]:.2f}" for key in (*ANGLE_NAMES, "mean")) + " |")
    return "\n".join(lines)
