"""Top-k classification accuracy from logits, an `evaluate` wrapper of `cmsa_hf.metrics.top_k_accuracy`."""

import datasets
import evaluate
import torch

from cmsa_hf.evaluation import metric_info, stacked
from cmsa_hf.metrics import top_k_accuracy


_DESCRIPTION = """
Top-k accuracy: the fraction of samples whose label is among the k highest logits (top-1 is the usual accuracy,
top-5 the ImageNet one). Computed by `cmsa_hf.metrics.top_k_accuracy`, the function the training scripts report.
"""

_CITATION = """
@article{russakovsky2015imagenet,
  title   = {{ImageNet} Large Scale Visual Recognition Challenge},
  author  = {Russakovsky, Olga and Deng, Jia and Su, Hao and Krause, Jonathan and Satheesh, Sanjeev and Ma, Sean and
             Huang, Zhiheng and Karpathy, Andrej and Khosla, Aditya and Bernstein, Michael and Berg, Alexander C. and
             Fei-Fei, Li},
  journal = {International Journal of Computer Vision},
  volume  = {115},
  number  = {3},
  pages   = {211--252},
  year    = {2015}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, or an array / tensor (N, classes)): the logits (or probabilities) of
        each sample; every sample has the same number of classes. Stored as float32.
    references (`list` of `int`, or an array / tensor (N,)): the label of each sample, in [0, classes).
    top_k (`tuple` of `int`, compute keyword, default (1, 5)): the k to report; k above the class count counts
        every sample as correct.
Returns:
    accuracy (`float`): top-1 accuracy, in [0, 1] (when 1 is in top_k).
    top{k}_accuracy (`float`): top-k accuracy for every other k of top_k, e.g. `top5_accuracy`.
Examples:
    >>> accuracy = cmsa_hf.evaluation.load("cmsa_accuracy")
    >>> accuracy.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], references=[1, 2], top_k=(1, 2))
    {'accuracy': 0.5, 'top2_accuracy': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CmsaAccuracy(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION,
            {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")},
            reference_urls=["https://arxiv.org/abs/1409.0575"],
        )

    def _compute(self, predictions, references, top_k=(1, 5)):
        logits = torch.from_numpy(stacked(predictions, "predictions (logits)", "float32"))
        labels = torch.as_tensor(references, dtype=torch.int64)
        return {("accuracy" if k == 1 else f"top{k}_accuracy"): top_k_accuracy(logits, labels, k) for k in top_k}
