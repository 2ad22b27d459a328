"""Shared fixtures. Nothing in the suite may reach the network: the Hub is switched off for every test."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from cmsa_hf import CMSAConfig  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CMSA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def tiny_config(**overrides) -> CMSAConfig:
    """A CMSA with every architectural feature (3 groups, cascade, pooling, reparam branches) but few weights."""
    fields = {
        "image_size": (16, 16),
        "hidden_sizes": [16, 24, 32],
        "depths": [1, 1, 1],
        "num_heads": [[1, 1, 1], [1, 1], [1, 1]],
        "key_dim": 8,
        "drop_path_rate": 0.0,
        **overrides,
    }
    if "id2label" not in fields:
        fields.setdefault("num_labels", 3)
    return CMSAConfig.from_variant("cmsa-s", **fields)


def randomise_batch_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm random running statistics and affine parameters (as a trained model would have)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.5, 0.5, generator=generator)
    return model


@pytest.fixture
def tiny():
    return tiny_config()
