import copy

import numpy as np
import pytest
import torch
from conftest import tiny_config

from cmsa_hf import (
    CMSAForHeadPoseEstimation,
    CMSAForImageClassification,
    CMSAForKeypointDetection,
    CMSAModel,
)
from cmsa_hf.export import export_onnx, onnx_output_names

onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra: pip install cmsa_hf[onnx]")
pytest.importorskip("onnxscript", reason="ONNX export needs the onnx extra: pip install cmsa_hf[onnx]")


def calibrated(model: torch.nn.Module) -> torch.nn.Module:
    """Set every BatchNorm's running statistics from a few batches, as training does: an untrained network with unit
    statistics blows activations up to ~1e6, where float32 rounding alone differs by more than any tolerance."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(pixel_values=torch.randn(8, model.config.num_channels, *model.config.image_size))
    return model.eval()


TASK_MODELS = [
    (CMSAForImageClassification, {}),
    (CMSAForKeypointDetection, {"image_size": (32, 24)}),
    (CMSAForHeadPoseEstimation, {}),
    (CMSAForHeadPoseEstimation, {"head_pose_head": "ssr"}),
]


@pytest.mark.parametrize("model_class, overrides", TASK_MODELS, ids=["classification", "keypoints", "head-pose", "head-pose-ssr"])
def test_onnx_runtime_matches_pytorch(tmp_path, model_class, overrides):
    model = calibrated(model_class(tiny_config(**overrides)))
    path = export_onnx(model, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = onnx_output_names(model)
    assert [output.name for output in session.get_outputs()] == list(names)

    reparameterized = copy.deepcopy(model).reparameterize()
    for batch_size in (1, 5):  # the batch dimension is dynamic
        pixels = torch.randn(batch_size, 3, *model.config.image_size)
        outputs = session.run(None, {"pixel_values": pixels.numpy()})
        with torch.no_grad():
            expected = reparameterized(pixel_values=pixels)
            multi_branch = model(pixel_values=pixels)
        for name, output in zip(names, outputs):
            assert output.shape == tuple(expected[name].shape)
            assert np.abs(output - expected[name].numpy()).max() <= 1e-4, name
            assert np.abs(output - multi_branch[name].numpy()).max() <= 1e-4, name

    # The caller's model is left as it was: multi-branch, trainable.
    assert not model.config.reparameterized
    model.train()(pixel_values=torch.randn(2, 3, *model.config.image_size))


def test_backbone_exports_its_fused_map(tmp_path):
    model = calibrated(CMSAModel(tiny_config()))
    session = onnxruntime.InferenceSession(str(export_onnx(model, tmp_path / "backbone.onnx")))
    pixels = torch.randn(2, 3, 16, 16)
    fused, pooled = session.run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        expected = model(pixel_values=pixels)
    assert np.abs(fused - expected.last_hidden_state.numpy()).max() <= 1e-4
    assert np.abs(pooled - expected.pooler_output.numpy()).max() <= 1e-4


def test_bad_exports_are_clear_errors(tmp_path):
    model = CMSAForImageClassification(tiny_config())
    with pytest.raises(ValueError, match="differs from the model's config.image_size 16x16"):
        export_onnx(model, tmp_path / "model.onnx", image_size=(32, 32))
    with pytest.raises(TypeError, match="export_onnx supports"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "linear.onnx")
