"""Percentage of correct keypoints, an `evaluate` wrapper of `cmsa_hf.metrics.pck`."""

import datasets
import evaluate

from cmsa_hf.evaluation import metric_info, stacked
from cmsa_hf.metrics import pck


_DESCRIPTION = """
PCK (percentage of correct keypoints): the share of labelled keypoints whose predicted position lies within
`threshold * normalizer` pixels of the true one, the normalizer being a per-person length such as the box diagonal
(PCK@0.05 of the box diagonal in the keypoint training script). Computed by `cmsa_hf.metrics.pck`.
"""

_CITATION = """
@article{yang2013pck,
  title   = {Articulated Human Detection with Flexible Mixtures of Parts},
  author  = {Yang, Yi and Ramanan, Deva},
  journal = {IEEE Transactions on Pattern Analysis and Machine Intelligence},
  volume  = {35},
  number  = {12},
  pages   = {2878--2890},
  year    = {2013}
}
"""

_KWARGS_DESCRIPTION = """
Args, one row per person (every person with the same number K of keypoints):
    predictions (`list` (K) of [x, y], or an array (N, K, 2)): the predicted keypoints.
    references (`list` (K) of [x, y], or an array (N, K, 2)): the true keypoints.
    visible (`list` (K) of `float`, or an array (N, K)): a keypoint counts when its value is above 0 (COCO
        visibility flags 1 and 2).
    normalizer (`float`): the person's length the threshold scales, e.g. the box diagonal (pixels).
    threshold (`float`, compute keyword, default 0.05): the distance threshold as a fraction of the normalizer.
Returns:
    pck (`float`): the share of labelled keypoints within the threshold, in [0, 1].
Examples:
    >>> pck = cmsa_hf.evaluation.load("cmsa_pck")
    >>> pck.compute(predictions=[[[1, 0], [6, 0]]], references=[[[0, 0], [0, 0]]], visible=[[2, 2]],
    ...             normalizer=[100.0])
    {'pck': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CmsaPck(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION,
            {
                "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float64"), length=2)),
                "references": datasets.Sequence(datasets.Sequence(datasets.Value("float64"), length=2)),
                "visible": datasets.Sequence(datasets.Value("float64")),
                "normalizer": datasets.Value("float64"),
            },
            reference_urls=["https://doi.org/10.1109/TPAMI.2012.261"],
        )

    def _compute(self, predictions, references, visible, normalizer, threshold=0.05):
        predictions, references = stacked(predictions, "predictions"), stacked(references, "references")
        return {"pck": pck(predictions, references, stacked(visible, "visible"), normalizer, threshold)}
