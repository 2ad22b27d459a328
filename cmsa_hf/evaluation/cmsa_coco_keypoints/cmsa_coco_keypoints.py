"""COCO OKS keypoint AP / AR through pycocotools, an `evaluate` wrapper of `cmsa_hf.metrics`: the poses are rescored
by `coco_keypoint_results`, optionally suppressed by `oks_nms_per_image` (the detected-box protocol) and scored by
`coco_keypoint_ap` against the ground-truth annotation file given at load time."""

import tempfile
from pathlib import Path

import datasets
import evaluate

from cmsa_hf.evaluation import metric_info, stacked
from cmsa_hf.metrics import coco_keypoint_ap, coco_keypoint_results, oks_nms_per_image


_DESCRIPTION = """
COCO keypoint detection AP / AR: average precision and recall over object keypoint similarity (OKS) thresholds
0.50:0.05:0.95, for all, medium and large persons, by pycocotools' COCOeval on a results file written as the
official protocol does. Each prediction is one person: its keypoints in image pixels, their scores, the person box
it was predicted in and that box's score. The pose score is the box score times the mean of the keypoint scores
above `visible_threshold` (HRNet's rescoring); with `oks_nms_threshold` the poses of each image go through OKS
non-maximum suppression first (HRNet's detected-box protocol). Every image of the annotation file (or of
`image_ids`) is evaluated, so persons of images without a prediction count as missed.
"""

_CITATION = """
@inproceedings{lin2014coco,
  title     = {Microsoft {COCO}: Common Objects in Context},
  author    = {Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and Hays, James and Perona, Pietro and
               Ramanan, Deva and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  booktitle = {European Conference on Computer Vision (ECCV)},
  pages     = {740--755},
  year      = {2014}
}
@inproceedings{sun2019hrnet,
  title     = {Deep High-Resolution Representation Learning for Human Pose Estimation},
  author    = {Sun, Ke and Xiao, Bin and Liu, Dong and Wang, Jingdong},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {5693--5703},
  year      = {2019}
}
"""

_KWARGS_DESCRIPTION = """
Load arguments (`cmsa_hf.evaluation.load("cmsa_coco_keypoints", ...)` or `evaluate.load(path, ...)`):
    annotation_file (`str` or `Path`, required): the COCO person-keypoints ground truth (json).
    image_ids (`list` of `int`, optional): evaluate these images only (default: every image of the annotation file).
Args (add_batch / compute), one row per predicted person:
    image_ids (`int`): the COCO id of the person's image.
    keypoints (`list` (K) of [x, y], or an array (N, K, 2)): the keypoints in image pixels.
    keypoint_scores (`list` (K) of `float`, or an array (N, K)): the keypoints' confidences.
    boxes (`list` of 4 `float`, or an array (N, 4)): the person box [x, y, width, height]; its area is the one OKS
        NMS uses.
    box_scores (`float`): the box's score (1 for ground-truth boxes, the detector's score for detected ones).
Compute keywords:
    oks_nms_threshold (`float`, optional): OKS NMS within each image at this threshold (0.9 in HRNet's
        detected-box protocol); default None, no suppression (ground-truth boxes).
    visible_threshold (`float`, default 0.2): keypoint scores above it count in the pose score.
    results_file (`str` or `Path`, optional): where the COCO results json is written (default: a temporary file).
    sigmas (`list` (K) of `float`, optional): the keypoint set's OKS sigmas (`config.keypoint_sigmas`), for OKS NMS
        and COCOeval; default COCO's person sigmas.
    category_id (`int`, optional): the results' category for a non-person keypoint set (default COCO's person, 1).
Returns:
    AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl (`float`): COCOeval's keypoint statistics, in [0, 1] (-1
    where a size range holds no person).
Examples:
    >>> coco = cmsa_hf.evaluation.load("cmsa_coco_keypoints", annotation_file="person_keypoints_val2017.json")
    >>> for batch in batches:
    ...     coco.add_batch(image_ids=batch["image_id"], keypoints=keypoints, keypoint_scores=scores,
    ...                    boxes=batch["box"], box_scores=batch["score"])
    >>> coco.compute(oks_nms_threshold=0.9)["AP"]
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CmsaCocoKeypoints(evaluate.Metric):
    def __init__(self, *, annotation_file, image_ids=None, **kwargs):
        super().__init__(**kwargs)
        if not Path(annotation_file).is_file():
            raise FileNotFoundError(f"COCO keypoint annotation file {annotation_file} does not exist")
        self.annotation_file = str(annotation_file)
        self.image_ids = None if image_ids is None else [int(image_id) for image_id in image_ids]

    def _info(self):
        return metric_info(
            _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION,
            {
                "image_ids": datasets.Value("int64"),
                "keypoints": datasets.Sequence(datasets.Sequence(datasets.Value("float64"), length=2)),
                "keypoint_scores": datasets.Sequence(datasets.Value("float64")),
                "boxes": datasets.Sequence(datasets.Value("float64"), length=4),
                "box_scores": datasets.Value("float64"),
            },
            homepage="https://cocodataset.org/#keypoints-eval",
            codebase_urls=["https://github.com/cocodataset/cocoapi"],
            reference_urls=["https://arxiv.org/abs/1405.0312", "https://arxiv.org/abs/1902.09212"],
        )

    def _compute(
        self, image_ids, keypoints, keypoint_scores, boxes, box_scores, oks_nms_threshold=None, visible_threshold=0.2,
        results_file=None, sigmas=None, category_id=None,
    ):  # fmt: skip
        keypoints, keypoint_scores = stacked(keypoints, "keypoints"), stacked(keypoint_scores, "keypoint_scores")
        if keypoint_scores.shape != keypoints.shape[:2]:
            raise ValueError(f"keypoint_scores {keypoint_scores.shape} do not match keypoints {keypoints.shape[:2]}")
        # Only what is given goes on, so that the pure functions' defaults stay the one place for COCO's person set.
        keypoint_set = {} if sigmas is None else {"sigmas": sigmas}
        category = {} if category_id is None else {"category_id": category_id}
        results = coco_keypoint_results(image_ids, keypoints, keypoint_scores, box_scores, visible_threshold, **category)
        if oks_nms_threshold is not None:
            areas = stacked(boxes, "boxes")[:, 2:].prod(-1)
            pose_scores = [result["score"] for result in results]
            keep = oks_nms_per_image(image_ids, keypoints, pose_scores, areas, oks_nms_threshold, **keypoint_set)
            results = [results[index] for index in keep]
        with tempfile.TemporaryDirectory() as folder:
            results_file = results_file or Path(folder) / "keypoint_results.json"
            return coco_keypoint_ap(self.annotation_file, results, results_file, self.image_ids, **keypoint_set)
