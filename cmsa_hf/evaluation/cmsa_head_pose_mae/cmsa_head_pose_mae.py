"""Head pose mean absolute error per angle, an `evaluate` wrapper of `cmsa_hf.metrics.head_pose_mae`."""

import datasets
import evaluate

from cmsa_hf.evaluation import metric_info, stacked
from cmsa_hf.metrics import head_pose_mae


_DESCRIPTION = """
Head pose MAE: the mean absolute error in degrees of yaw, pitch and roll, each on its own and their mean (the
AFLW2000-3D / BIWI protocol of Hopenet and FSA-Net; no angle wrapping). Computed by `cmsa_hf.metrics.head_pose_mae`.
"""

_CITATION = """
@inproceedings{ruiz2018hopenet,
  title     = {Fine-Grained Head Pose Estimation Without Keypoints},
  author    = {Ruiz, Nataniel and Chong, Eunji and Rehg, James M.},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition Workshops (CVPRW)},
  pages     = {2074--2083},
  year      = {2018}
}
@inproceedings{yang2019fsanet,
  title     = {{FSA-Net}: Learning Fine-Grained Structure Aggregation for Head Pose Estimation from a Single Image},
  author    = {Yang, Tsun-Yi and Chen, Yi-Ting and Lin, Yen-Yu and Chuang, Yung-Yu},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {1087--1096},
  year      = {2019}
}
"""

_KWARGS_DESCRIPTION = """
Args, one row per face:
    predictions (`list` of 3 `float`, or an array (N, 3)): predicted yaw, pitch, roll in degrees.
    references (`list` of 3 `float`, or an array (N, 3)): true yaw, pitch, roll in degrees.
Returns:
    yaw, pitch, roll (`float`): the mean absolute error of each angle (degrees).
    mean (`float`): the mean of the three (the MAE of head pose tables).
Examples:
    >>> mae = cmsa_hf.evaluation.load("cmsa_head_pose_mae")
    >>> mae.compute(predictions=[[12.0, -6.0, 0.0]], references=[[10.0, -5.0, 0.0]])
    {'yaw': 2.0, 'pitch': 1.0, 'roll': 0.0, 'mean': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CmsaHeadPoseMae(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION,
            {
                "predictions": datasets.Sequence(datasets.Value("float64"), length=3),
                "references": datasets.Sequence(datasets.Value("float64"), length=3),
            },
            reference_urls=["https://arxiv.org/abs/1710.00925"],
        )

    def _compute(self, predictions, references):
        return head_pose_mae(stacked(predictions, "predictions"), stacked(references, "references"))
