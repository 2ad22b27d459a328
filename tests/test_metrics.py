import pytest
import torch

from cmsa_hf.metrics import top_k_accuracy


def test_top_k_accuracy():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    assert top_k_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(logits, labels, 5) == 1.0  # k larger than the class count: every label is in
    with pytest.raises(ValueError):
        top_k_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
