"""Pipelines for the CMSA tasks that transformers has no pipeline for, registered on import of `cmsa_hf`.

`pipeline("keypoint-detection", model=folder)`: images and person boxes in, keypoints per person out. (The name
follows the model class; transformers' own "keypoint-matching" task matches points between two images.)
`pipeline("head-pose-estimation", model=folder)`: images and face boxes in, yaw / pitch / roll per face out.
"""

from transformers import Pipeline
from transformers.image_utils import load_image

from .image_processing_cmsa import checked_image, to_rgb_image


class _BoxPipeline(Pipeline):
    """Shared input handling: `pipe(image, boxes=[[x, y, width, height], ...])` (the whole image when no box) or
    `pipe({"image": ..., "boxes": [...]})`; one crop per box."""

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    @staticmethod
    def _box_parameters(boxes, timeout, flip_test) -> tuple[dict, dict]:
        """The preprocess and forward keyword arguments the box pipelines share."""
        preprocess = {key: value for key, value in (("boxes", boxes), ("timeout", timeout)) if value is not None}
        return preprocess, ({"flip_test": flip_test} if flip_test is not None else {})

    def _run(self, model_inputs, flip_test: bool, output: str):
        """The model's `output` for the crops; None when the image has no box (an empty list of boxes)."""
        if model_inputs["pixel_values"].shape[0] == 0:
            return None
        return getattr(self.model(pixel_values=model_inputs["pixel_values"], flip_test=flip_test), output)

    def preprocess(self, inputs, boxes=None, timeout=None):
        if isinstance(inputs, dict):
            inputs, boxes = inputs["image"], inputs.get("boxes", boxes)
        image = to_rgb_image(checked_image(load_image(inputs, timeout=timeout) if isinstance(inputs, str) else inputs))
        if boxes is None:
            boxes = [[0, 0, image.width, image.height]]
        features = self.image_processor(image, boxes=boxes, return_tensors="pt")
        return {"pixel_values": features.pixel_values.to(self.dtype), "boxes": boxes, "image_size": image.size}


class KeypointDetectionPipeline(_BoxPipeline):
    """Top-down human pose: `pipe(image, boxes=[[x, y, width, height], ...])` (the whole image when no box), or
    `pipe([{"image": ..., "boxes": [...]}, ...])`. Returns per box `{"bbox", "keypoints": [{"label", "x", "y",
    "score"}, ...]}`; `flip_test=True` averages with the mirrored crops; `threshold` drops low-scoring keypoints."""

    def _sanitize_parameters(self, boxes=None, flip_test=None, threshold=None, timeout=None):
        postprocess = {"threshold": threshold} if threshold is not None else {}
        return (*self._box_parameters(boxes, timeout, flip_test), postprocess)

    def _forward(self, model_inputs, flip_test=False):
        heatmaps = self._run(model_inputs, flip_test, "heatmaps")
        return {"heatmaps": heatmaps, "boxes": model_inputs["boxes"], "image_size": model_inputs["image_size"]}

    def postprocess(self, model_outputs, threshold=None):
        if not model_outputs["boxes"]:
            return []
        names = self.model.config.keypoint_names
        (poses,) = self.image_processor.post_process_keypoint_detection(
            model_outputs["heatmaps"], [model_outputs["boxes"]], image_sizes=[model_outputs["image_size"]]
        )
        results = []
        for pose in poses:
            keypoints = [
                {"label": name, "x": float(x), "y": float(y), "score": float(score)}
                for name, (x, y), score in zip(names, pose["keypoints"].tolist(), pose["scores"].tolist())
                if threshold is None or score >= threshold
            ]
            results.append({"bbox": pose["bbox"], "keypoints": keypoints})
        return results


class HeadPoseEstimationPipeline(_BoxPipeline):
    """Head pose: `pipe(image, boxes=[[x, y, width, height], ...])` with loosened face boxes (the whole image when
    no box), or `pipe({"image": ..., "boxes": [...]})`. Returns per face `{"bbox", "yaw", "pitch", "roll"}` in
    degrees (the 300W-LP sign convention); `return_rotation_matrix=True` adds the 3x3 matrix; `flip_test=True`
    averages with the mirrored faces."""

    def _sanitize_parameters(self, boxes=None, flip_test=None, return_rotation_matrix=None, timeout=None):
        postprocess = {"return_rotation_matrix": return_rotation_matrix} if return_rotation_matrix is not None else {}
        return (*self._box_parameters(boxes, timeout, flip_test), postprocess)

    def _forward(self, model_inputs, flip_test=False):
        return {"angles": self._run(model_inputs, flip_test, "angles"), "boxes": model_inputs["boxes"]}

    def postprocess(self, model_outputs, return_rotation_matrix=False):
        if not model_outputs["boxes"]:
            return []
        poses = self.image_processor.post_process_head_pose(model_outputs["angles"], return_rotation_matrix)
        return [{"bbox": box, **pose} for box, pose in zip(model_outputs["boxes"], poses)]


__all__ = ["HeadPoseEstimationPipeline", "KeypointDetectionPipeline"]
