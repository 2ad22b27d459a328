"""Pipelines for the CMSA tasks that transformers has no pipeline for, registered on import of `cmsa_hf`.

`pipeline("keypoint-detection", model=folder)`: images and person boxes in, keypoints per person out. (The name
follows the model class; transformers' own "keypoint-matching" task matches points between two images.)
`pipeline("head-pose-estimation", model=folder)`: images and face boxes in, yaw / pitch / roll per face out.

Both are transformers `ChunkPipeline`s: an image becomes one chunk per box (its crop), so `batch_size` counts crops
and a batch may mix the crops of several images; each image gets back exactly its own boxes. Without boxes, an
object detector given as `detector` (a transformers object-detection pipeline, model, or model name) finds them.
"""

import os

import torch
from transformers import Pipeline, PreTrainedModel, pipeline
from transformers.pipelines.base import ChunkPipeline
from transformers.image_utils import load_image

from .image_processing_cmsa import boxes_of_one_image, checked_image, to_rgb_image


def detection_pipeline(detector):
    """`detector` as an object-detection pipeline: a pipeline as it is, a model or a model name / folder wrapped in
    `pipeline("object-detection", ...)` (which finds the model's image processor by its name)."""
    if detector is None or isinstance(detector, Pipeline):
        return detector
    if isinstance(detector, (str, os.PathLike, PreTrainedModel)):
        return pipeline("object-detection", model=detector)
    raise TypeError(
        f"detector must be an object-detection pipeline, model or model name, got {type(detector).__name__}"
    )


def detect_boxes(detector: Pipeline, image, threshold: float | None, labels) -> tuple[list, list]:
    """The detector's boxes in `image` as COCO [x, y, width, height], with their `{"label", "score"}`: those scoring
    at least `threshold` (the detector's default when None) and, when `labels` is given, of those labels only.
    Boxes of zero size or entirely outside the image are left out."""
    id2label = getattr(getattr(detector.model, "config", None), "id2label", None) or {}
    if labels is not None and id2label and (unknown := sorted(set(labels) - set(id2label.values()))):
        raise ValueError(f"the detector has no label {unknown}; its labels are {sorted(set(id2label.values()))}")
    detections = detector(image, **({} if threshold is None else {"threshold": threshold}))
    boxes, found = [], []
    for detection in detections:
        corners = detection["box"]
        x, y = max(corners["xmin"], 0), max(corners["ymin"], 0)
        width, height = min(corners["xmax"], image.width) - x, min(corners["ymax"], image.height) - y
        if (labels is None or detection["label"] in labels) and width > 0 and height > 0:
            boxes.append([float(x), float(y), float(width), float(height)])
            found.append({"label": detection["label"], "score": float(detection["score"])})
    return boxes, found


class _BoxPipeline(ChunkPipeline):
    """Shared input handling: `pipe(image, boxes=[[x, y, width, height], ...])` or `pipe({"image": ..., "boxes":
    [...]})` (one flat box, a list or (N, 4) array of boxes, or VitPose's `[person_boxes]`), or, without boxes,
    `pipe(image, detector=...)`; one chunk (crop) per box. `output_name`: the model output the crops give."""

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    output_name: str

    def _shared_parameters(self, boxes, timeout, flip_test, detector, detector_threshold, detector_labels):
        """The preprocess and forward keyword arguments the box pipelines share."""
        if isinstance(detector_labels, str):
            detector_labels = [detector_labels]
        values = {
            "boxes": boxes, "timeout": timeout, "detector": detection_pipeline(detector),
            "detector_threshold": detector_threshold, "detector_labels": detector_labels,
        }  # fmt: skip
        preprocess = {key: value for key, value in values.items() if value is not None}
        return preprocess, ({"flip_test": flip_test} if flip_test is not None else {})

    def preprocess(self, inputs, boxes=None, timeout=None, detector=None, detector_threshold=None, detector_labels=None):
        if isinstance(inputs, dict):
            inputs, boxes = inputs["image"], inputs.get("boxes", boxes)
        image = to_rgb_image(checked_image(load_image(inputs, timeout=timeout) if isinstance(inputs, str) else inputs))
        if boxes is not None:
            per_image = boxes_of_one_image(boxes)
            if len(per_image) != 1:
                raise ValueError(f"boxes holds {len(per_image)} lists of boxes for one image: pass the image's boxes")
            boxes, detections = per_image[0], [None] * len(per_image[0])
        elif detector is not None:
            boxes, detections = detect_boxes(detector, image, detector_threshold, detector_labels)
        else:
            raise ValueError(
                "no boxes for the image: pass boxes=[[x, y, width, height], ...] (COCO, image pixels; "
                f"[[0, 0, {image.width}, {image.height}]] for the whole image), or detector=pipeline(\"object-detection\", "
                "model=...) to find them (with detector_threshold and detector_labels, e.g. [\"person\"])"
            )
        base = {"image_size": image.size}
        if len(boxes) == 0:  # one empty chunk, so that the image still gets its (empty) result
            pixel_values = torch.zeros((1, 3, *self.image_processor.input_size), dtype=self.dtype)
            yield {"is_last": True, "has_box": torch.tensor([False]), "pixel_values": pixel_values, "box": None, "detection": None, **base}
            return
        pixel_values = self.image_processor([image], boxes=[boxes], return_tensors="pt").pixel_values.to(self.dtype)
        for index, (box, detection) in enumerate(zip(boxes, detections)):
            yield {
                "is_last": index == len(boxes) - 1, "has_box": torch.tensor([True]),
                "pixel_values": pixel_values[index : index + 1], "box": [float(v) for v in box], "detection": detection,
                **base,
            }  # fmt: skip

    def _forward(self, model_inputs, flip_test=False):
        """The model's output for the chunks with a box (rows of zeros for the empty chunks, None when all are)."""
        has_box = model_inputs["has_box"]
        output = None
        if has_box.any():
            crops = getattr(self.model(pixel_values=model_inputs["pixel_values"][has_box], flip_test=flip_test), self.output_name)
            output = crops.new_zeros((len(has_box), *crops.shape[1:]))
            output[has_box] = crops
        passed = ("is_last", "has_box", "box", "detection", "image_size")
        return {**{key: model_inputs[key] for key in passed}, "output": output}

    @staticmethod
    def _chunks_with_a_box(model_outputs) -> list[dict]:
        return [chunk for chunk in model_outputs if bool(chunk["has_box"].item())]

    @staticmethod
    def _result(chunk, **fields) -> dict:
        """One box's result: its `bbox`, the detector's `detection` ({"label", "score"}) when it found it, `fields`."""
        return {"bbox": chunk["box"], **({"detection": chunk["detection"]} if chunk["detection"] else {}), **fields}


class KeypointDetectionPipeline(_BoxPipeline):
    """Top-down human pose: `pipe(image, boxes=[[x, y, width, height], ...])`, `pipe([{"image": ..., "boxes":
    [...]}, ...], batch_size=...)`, or, from the whole photo, `pipe(image, detector=pipeline("object-detection",
    ...), detector_labels=["person"], detector_threshold=0.5)`. Returns per box `{"bbox", "keypoints": [{"label",
    "x", "y", "score"}, ...]}` (plus `"detection": {"label", "score"}` for detected boxes); `flip_test=True` averages
    with the mirrored crops; `threshold` drops low-scoring keypoints."""

    output_name = "heatmaps"

    def _sanitize_parameters(
        self, boxes=None, flip_test=None, threshold=None, timeout=None, detector=None, detector_threshold=None,
        detector_labels=None,
    ):  # fmt: skip
        postprocess = {"threshold": threshold} if threshold is not None else {}
        shared = self._shared_parameters(boxes, timeout, flip_test, detector, detector_threshold, detector_labels)
        return (*shared, postprocess)

    def postprocess(self, model_outputs, threshold=None):
        chunks = self._chunks_with_a_box(model_outputs)
        if not chunks:
            return []
        names = self.model.config.keypoint_names
        heatmaps = torch.cat([chunk["output"] for chunk in chunks])
        (poses,) = self.image_processor.post_process_keypoint_detection(
            heatmaps, [[chunk["box"] for chunk in chunks]], image_sizes=[chunks[0]["image_size"]]
        )
        results = []
        for chunk, pose in zip(chunks, poses):
            keypoints = [
                {"label": name, "x": float(x), "y": float(y), "score": float(score)}
                for name, (x, y), score in zip(names, pose["keypoints"].tolist(), pose["scores"].tolist())
                if threshold is None or score >= threshold
            ]
            results.append(self._result(chunk, keypoints=keypoints))
        return results


class HeadPoseEstimationPipeline(_BoxPipeline):
    """Head pose: `pipe(image, boxes=[[x, y, width, height], ...])` with loosened face boxes, `pipe([{"image": ...,
    "boxes": [...]}, ...], batch_size=...)`, or `pipe(image, detector=<a face detector>, detector_threshold=...)`
    (the detector's boxes are used as they come; the models are trained on boxes loosened around the face).
    Returns per face `{"bbox", "yaw", "pitch", "roll"}` in degrees (the 300W-LP sign convention);
    `return_rotation_matrix=True` adds the 3x3 matrix; `flip_test=True` averages with the mirrored faces."""

    output_name = "angles"

    def _sanitize_parameters(
        self, boxes=None, flip_test=None, return_rotation_matrix=None, timeout=None, detector=None,
        detector_threshold=None, detector_labels=None,
    ):  # fmt: skip
        postprocess = {"return_rotation_matrix": return_rotation_matrix} if return_rotation_matrix is not None else {}
        shared = self._shared_parameters(boxes, timeout, flip_test, detector, detector_threshold, detector_labels)
        return (*shared, postprocess)

    def postprocess(self, model_outputs, return_rotation_matrix=False):
        chunks = self._chunks_with_a_box(model_outputs)
        if not chunks:
            return []
        angles = torch.cat([chunk["output"] for chunk in chunks])
        poses = self.image_processor.post_process_head_pose(angles, return_rotation_matrix)
        return [self._result(chunk, **pose) for chunk, pose in zip(chunks, poses)]


__all__ = ["HeadPoseEstimationPipeline", "KeypointDetectionPipeline"]
