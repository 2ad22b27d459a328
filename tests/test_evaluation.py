"""The shipped `evaluate` modules: loaded offline from the package, fed in several batches, they give exactly the
numbers of the pure functions of `cmsa_hf.metrics` on the same inputs (synthetic and real data)."""

import inspect
import json
import socket

import evaluate
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, make_coco_keypoints

from cmsa_hf import evaluation
from cmsa_hf.metrics import (
    COCO_SIGMAS,
    coco_keypoint_ap,
    coco_keypoint_results,
    head_pose_mae,
    oks_nms_per_image,
    pck,
    top_k_accuracy,
)


COCO_FIXTURE = SHARED_DATA / "coco-fixture"
AFLW2000_ZIP = SHARED_DATA / "aflw2000-half.zip"


def load(name, tmp_path, **kwargs):
    return evaluation.load(name, cache_dir=str(tmp_path / "evaluate-cache"), **kwargs)


def add_in_batches(metric, batch_size, **columns):
    """add_batch over consecutive slices of every column (the last batch shorter)."""
    count = len(next(iter(columns.values())))
    for start in range(0, count, batch_size):
        metric.add_batch(**{name: values[start : start + batch_size] for name, values in columns.items()})


def require(path):
    if not path.exists():
        pytest.skip(f"{path} is not available (real data lives outside the repository)")


def test_every_metric_is_listed_and_loads_from_its_script(tmp_path):
    assert evaluation.list_metrics() == ["cmsa_accuracy", "cmsa_coco_keypoints", "cmsa_head_pose_mae", "cmsa_pck"]
    annotation_file = make_coco_keypoints(tmp_path / "coco")
    for name in evaluation.list_metrics():
        init = {"annotation_file": annotation_file} if name == "cmsa_coco_keypoints" else {}
        metric = evaluate.load(evaluation.metric_path(name), cache_dir=str(tmp_path), **init)
        assert metric.name == name and isinstance(metric, evaluate.Metric)
        for text in (metric.description, metric.citation, metric.inputs_description):
            assert len(text.strip()) > 100, name
        assert "@" in metric.citation and "Returns:" in metric.inputs_description, name
        assert set(metric.features) <= set(metric.inputs_description.replace("(", " ").split()), name
    with pytest.raises(ValueError, match="No metric module 'accuracy'.*cmsa_accuracy"):
        evaluation.load("accuracy")


def test_loading_and_computing_never_reach_the_network(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", False)  # evaluate ignores HF_HUB_OFFLINE
    mae = load("cmsa_head_pose_mae", tmp_path)
    assert mae.compute(predictions=[[12.0, -6.0, 0.0]], references=[[10.0, -5.0, 0.0]])["mean"] == 1.0
    with pytest.raises(AssertionError, match="network access"):  # a bare name is looked up on the Hub
        evaluate.load("cmsa_head_pose_mae")


def test_accuracy_matches_top_k_accuracy(tmp_path):
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 10, generator=generator), torch.randint(0, 10, (50,), generator=generator)
    accuracy = load("cmsa_accuracy", tmp_path)
    accuracy.add_batch(predictions=logits[:20], references=labels[:20])  # tensors
    accuracy.add_batch(predictions=logits[20:35].numpy(), references=labels[20:35].numpy())  # arrays
    accuracy.add_batch(predictions=logits[35:].tolist(), references=labels[35:].tolist())  # lists
    expected = {"accuracy": top_k_accuracy(logits, labels, 1), "top5_accuracy": top_k_accuracy(logits, labels, 5)}
    assert accuracy.compute() == expected
    assert 0.0 < expected["accuracy"] < expected["top5_accuracy"] < 1.0
    assert accuracy.compute(predictions=logits, references=labels, top_k=(3,)) == {
        "top3_accuracy": top_k_accuracy(logits, labels, 3)
    }


def test_pck_matches_pck(tmp_path):
    rng = np.random.default_rng(0)
    target = rng.uniform(0, 100, (30, 17, 2))
    predicted = target + rng.normal(0, 4, target.shape)
    visible = rng.integers(0, 3, (30, 17))
    normalizer = rng.uniform(50, 150, 30)
    metric = load("cmsa_pck", tmp_path)
    add_in_batches(metric, 7, predictions=predicted, references=target, visible=visible, normalizer=normalizer)
    result = metric.compute(threshold=0.05)
    assert result == {"pck": pck(predicted, target, visible, normalizer, 0.05)}
    assert 0.2 < result["pck"] < 0.9


def test_head_pose_mae_matches_head_pose_mae(tmp_path):
    rng = np.random.default_rng(0)
    target = rng.uniform(-90, 90, (40, 3))
    predicted = target + rng.normal(0, 5, target.shape)
    metric = load("cmsa_head_pose_mae", tmp_path)
    add_in_batches(metric, 16, predictions=predicted, references=target)
    assert metric.compute() == head_pose_mae(predicted, target)


def test_head_pose_mae_on_aflw2000(tmp_path):
    """Real angles: the ground truth with seeded noise of 5 degrees, and the training-mean baseline."""
    require(AFLW2000_ZIP)
    from cmsa_hf.data.head_pose import load_aflw2000  # noqa: PLC0415

    truth = np.asarray(load_aflw2000(AFLW2000_ZIP)["angles"], dtype=np.float64)
    noisy = truth + np.random.default_rng(0).normal(0, 5, truth.shape)
    baseline = np.broadcast_to(truth[: len(truth) // 2].mean(0), truth.shape)
    for predicted in (noisy, baseline):
        metric = load("cmsa_head_pose_mae", tmp_path)
        add_in_batches(metric, 64, predictions=predicted, references=truth)
        assert metric.compute() == head_pose_mae(predicted, truth)
    assert head_pose_mae(noisy, truth)["mean"] == pytest.approx(5 * np.sqrt(2 / np.pi), abs=0.3)


def people_of(annotation_file):
    coco = json.loads(annotation_file.read_text())
    return [a for a in coco["annotations"] if a["num_keypoints"] > 0 and not a["iscrowd"]]


def noisy_poses(people, rng, pixels=3.0):
    """(keypoints (N, K, 2), keypoint_scores (N, K)) from the ground truth of `people`, moved by seeded noise."""
    keypoints = np.stack([np.asarray(a["keypoints"], dtype=np.float64).reshape(-1, 3)[:, :2] for a in people])
    return keypoints + rng.normal(0, pixels, keypoints.shape), rng.uniform(0.1, 1.0, keypoints.shape[:2])


def coco_columns(people, rng, boxes=None, box_scores=None):
    keypoints, keypoint_scores = noisy_poses(people, rng)
    return {
        "image_ids": np.asarray([a["image_id"] for a in people]),
        "keypoints": keypoints,
        "keypoint_scores": keypoint_scores,
        "boxes": np.asarray(boxes if boxes is not None else [a["bbox"] for a in people], dtype=np.float64),
        "box_scores": np.asarray(box_scores if box_scores is not None else np.ones(len(people))),
    }


def expected_coco(annotation_file, columns, results_file, oks_nms_threshold=None, image_ids=None, sigmas=None, category_id=None):
    """The pure functions' protocol: rescoring, OKS NMS per image (detected boxes), COCOeval; `sigmas` and
    `category_id` of a non-COCO set go on only when given (the pure functions' defaults are COCO's person)."""
    sigmas = {} if sigmas is None else {"sigmas": sigmas}
    category = {} if category_id is None else {"category_id": category_id}
    results = coco_keypoint_results(
        columns["image_ids"], columns["keypoints"], columns["keypoint_scores"], columns["box_scores"], **category
    )
    if oks_nms_threshold is not None:
        areas = columns["boxes"][:, 2] * columns["boxes"][:, 3]
        scores = [r["score"] for r in results]
        keep = oks_nms_per_image(columns["image_ids"], columns["keypoints"], scores, areas, oks_nms_threshold, **sigmas)
        results = [results[i] for i in keep]
    return coco_keypoint_ap(annotation_file, results, results_file, image_ids, **sigmas), len(results)


def test_coco_keypoints_matches_coco_keypoint_ap(tmp_path):
    annotation_file = make_coco_keypoints(tmp_path / "coco", num_images=6)
    columns = coco_columns(people_of(annotation_file), np.random.default_rng(0))
    metric = load("cmsa_coco_keypoints", tmp_path, annotation_file=annotation_file)
    add_in_batches(metric, 4, **columns)
    result = metric.compute(results_file=tmp_path / "written.json")
    expected, count = expected_coco(annotation_file, columns, tmp_path / "expected.json")
    assert result == expected and 0.0 < result["AP"] < 1.0
    assert json.loads((tmp_path / "written.json").read_text()) == json.loads((tmp_path / "expected.json").read_text())

    subset = load("cmsa_coco_keypoints", tmp_path, annotation_file=annotation_file, image_ids=[1, 2])
    add_in_batches(subset, 4, **columns)
    assert subset.compute() == expected_coco(annotation_file, columns, tmp_path / "e.json", image_ids=[1, 2])[0]


def test_coco_keypoints_on_the_coco_fixture_with_ground_truth_boxes(tmp_path):
    require(COCO_FIXTURE)
    annotation_file = COCO_FIXTURE / "test_coco.json"
    columns = coco_columns(people_of(annotation_file), np.random.default_rng(0))
    metric = load("cmsa_coco_keypoints", tmp_path, annotation_file=annotation_file)
    add_in_batches(metric, 5, **columns)
    result = metric.compute()
    assert result == expected_coco(annotation_file, columns, tmp_path / "expected.json")[0]
    assert 0.3 < result["AP"] < 1.0


def best_matches(detections, people):
    """For each detection, the person of its image whose box overlaps it most (IoU)."""

    def iou(a, b):
        width = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
        height = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
        return width * height / (a[2] * a[3] + b[2] * b[3] - width * height)

    return [max((p for p in people if p["image_id"] == d["image_id"]), key=lambda p: iou(p["bbox"], d["bbox"])) for d in detections]


def test_coco_keypoints_on_the_coco_fixture_with_detected_boxes(tmp_path):
    """The detected-box protocol: a pose per detection of the fixture's detection file (its matched person's
    keypoints with noise), scored by the detector, duplicates removed by OKS NMS."""
    require(COCO_FIXTURE)
    annotation_file = COCO_FIXTURE / "test_coco.json"
    people = people_of(annotation_file)
    detections = [d for d in json.loads((COCO_FIXTURE / "test_coco_det_AP_H_56.json").read_text())
                  if any(p["image_id"] == d["image_id"] for p in people)]  # fmt: skip
    columns = coco_columns(
        best_matches(detections, people), np.random.default_rng(0),
        boxes=[d["bbox"] for d in detections], box_scores=[d["score"] for d in detections],
    )  # fmt: skip
    metric = load("cmsa_coco_keypoints", tmp_path, annotation_file=annotation_file)
    add_in_batches(metric, 16, **columns)
    result = metric.compute(oks_nms_threshold=0.9)
    expected, kept = expected_coco(annotation_file, columns, tmp_path / "expected.json", oks_nms_threshold=0.9)
    assert result == expected
    assert len(people) <= kept < len(detections)  # the duplicates of a person go, each person keeps one pose
    assert metric.compute(**columns) == expected_coco(annotation_file, columns, tmp_path / "no-nms.json")[0]


@pytest.mark.skipif(
    "sigmas" not in inspect.signature(coco_keypoint_ap).parameters
    or "category_id" not in inspect.signature(coco_keypoint_results).parameters,
    reason="the pure functions take no keypoint-set sigmas / category yet",
)
def test_coco_keypoints_passes_a_keypoint_sets_sigmas_and_category(tmp_path):
    annotation_file = make_coco_keypoints(tmp_path / "coco", num_images=6)
    coco = json.loads(annotation_file.read_text())
    for entry in coco["annotations"] + coco["categories"]:
        entry["category_id" if "image_id" in entry else "id"] = 7
    annotation_file.write_text(json.dumps(coco))
    columns = coco_columns(people_of(annotation_file), np.random.default_rng(0))
    sigmas = (2 * COCO_SIGMAS).tolist()
    metric = load("cmsa_coco_keypoints", tmp_path, annotation_file=annotation_file)
    add_in_batches(metric, 4, **columns)
    result = metric.compute(oks_nms_threshold=0.9, sigmas=sigmas, category_id=7)
    expected = expected_coco(annotation_file, columns, tmp_path / "e.json", 0.9, sigmas=sigmas, category_id=7)[0]
    assert result == expected
    assert result["AP"] > expected_coco(annotation_file, columns, tmp_path / "c.json", 0.9, category_id=7)[0]["AP"]


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file .*missing.json does not exist"):
        load("cmsa_coco_keypoints", tmp_path, annotation_file=tmp_path / "missing.json")
    with pytest.raises(TypeError, match="annotation_file"):
        load("cmsa_coco_keypoints", tmp_path)

    annotation_file = make_coco_keypoints(tmp_path / "coco")
    columns = coco_columns(people_of(annotation_file), np.random.default_rng(0))
    five_scores = columns["keypoint_scores"][:, :5]
    coco = load("cmsa_coco_keypoints", tmp_path, annotation_file=annotation_file)
    coco.add_batch(**columns)
    coco.add_batch(**{**columns, "keypoints": columns["keypoints"][:, :5], "keypoint_scores": five_scores})
    with pytest.raises(ValueError, match="Every keypoints row needs the same shape"):
        coco.compute()
    coco = load("cmsa_coco_keypoints", tmp_path, annotation_file=annotation_file)
    with pytest.raises(ValueError, match=r"keypoint_scores \(8, 5\) do not match keypoints \(8, 17\)"):
        coco.compute(**{**columns, "keypoint_scores": five_scores})

    accuracy = load("cmsa_accuracy", tmp_path)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        accuracy.compute(predictions=[[0.1, 0.2, 0.7]], references=[3])
    with pytest.raises(ValueError, match="don't match the expected format"):
        accuracy.add_batch(predictions=[2, 0], references=[2, 0])  # class ids where logits belong

    with pytest.raises(ValueError, match="don't match the expected format"):
        load("cmsa_head_pose_mae", tmp_path).add_batch(predictions=[[1.0, 2.0]], references=[[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"pck needs .*visible \(N, K\)"):
        load("cmsa_pck", tmp_path).compute(
            predictions=[[[0.0, 0.0]] * 3], references=[[[0.0, 0.0]] * 3], visible=[[1, 1]], normalizer=[10.0]
        )
