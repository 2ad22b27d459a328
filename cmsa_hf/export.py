"""ONNX export of CMSA models for ONNX Runtime and other inference engines.

    from cmsa_hf.export import export_onnx
    export_onnx(model, "cmsa.onnx")                       # reparameterized copy, dynamic batch
    session = onnxruntime.InferenceSession("cmsa.onnx")
    heatmaps, = session.run(None, {"pixel_values": images})  # float32 (batch, 3, H, W)

Needs the `onnx` extra (onnx, onnxscript; onnxruntime to run the file).
"""

import copy
from pathlib import Path

import torch
from torch import nn

from .modeling_cmsa import (
    CMSAForHeadPoseEstimation,
    CMSAForImageClassification,
    CMSAForKeypointDetection,
    CMSAModel,
)

# The outputs each model class exports, in order (the binned head-pose model also exports its bin logits).
ONNX_OUTPUT_NAMES = {
    CMSAForImageClassification: ("logits",),
    CMSAForKeypointDetection: ("heatmaps",),
    CMSAForHeadPoseEstimation: ("angles", "logits"),
    CMSAModel: ("last_hidden_state", "pooler_output"),
}


def onnx_output_names(model: nn.Module) -> tuple[str, ...]:
    """The names of the tensors `export_onnx` writes for `model`."""
    names = ONNX_OUTPUT_NAMES.get(type(model))
    if names is None:
        supported = ", ".join(cls.__name__ for cls in ONNX_OUTPUT_NAMES)
        raise TypeError(f"export_onnx supports {supported}; got {type(model).__name__}")
    if isinstance(model, CMSAForHeadPoseEstimation) and model.config.head_pose_head != "binned":
        names = names[:1]
    return names


class _NamedOutputs(nn.Module):
    """pixel_values -> the model's output tensors as a tuple, in `onnx_output_names` order."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(pixel_values=pixel_values, return_dict=True)
        return tuple(outputs[name] for name in self.names)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    image_size: tuple[int, int] | None = None,
    reparameterize: bool = True,
    opset_version: int = 18,
) -> Path:
    """Write `model` (a CMSA model) to an ONNX file with input `pixel_values` (batch, channels, H, W), a dynamic
    batch dimension, and the outputs named by `onnx_output_names`. The model is copied (the caller's is left
    as it is), put in eval mode and, by default, reparameterized first (the fast inference form); its attention is
    exported in the explicit softmax form.

    `image_size` must be the config's (the attention windows are built for it); it defaults to it.
    """
    names = onnx_output_names(model)
    config = model.config
    image_size = tuple(image_size) if image_size is not None else tuple(config.image_size)
    if image_size != tuple(config.image_size):
        raise ValueError(
            f"image_size {image_size[0]}x{image_size[1]} differs from the model's config.image_size "
            f"{config.image_size[0]}x{config.image_size[1]}: the attention windows are built for the config's size"
        )
    model = copy.deepcopy(model).float().eval().to(memory_format=torch.contiguous_format)
    # The explicit softmax attention (same function as SDPA) exports as plain MatMul / Add / Softmax nodes, which ONNX
    # Runtime runs faster and in less memory than the masked SDPA decomposition.
    model.config._attn_implementation = "eager"
    if reparameterize:
        model.reparameterize()
    example = torch.randn(2, config.num_channels, *image_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            _NamedOutputs(model, names),
            (example,),
            str(path),
            input_names=["pixel_values"],
            output_names=list(names),
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1)}},
            opset_version=opset_version,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return path


__all__ = ["ONNX_OUTPUT_NAMES", "export_onnx", "onnx_output_names"]
