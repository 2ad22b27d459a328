"""Evaluation metrics as pure functions."""

import torch


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose label is among the k highest logits. logits (N, classes), labels (N,)."""
    if logits.shape[0] == 0:
        raise ValueError("top_k_accuracy needs at least one sample")
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == labels.unsqueeze(-1)).any(dim=-1).float().mean().item()
