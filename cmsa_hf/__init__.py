"""cmsa_hf: CMSA (cascaded multi-scale attention) for low-resolution images, as a transformers model.

Importing the package registers the CMSA classes with the transformers Auto classes and pipelines, and marks them
for `trust_remote_code` export: every `save_pretrained` folder carries the code files and an `auto_map`, so it
also loads where `cmsa_hf` is not installed.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForKeypointDetection,
    AutoModelForPoseEstimation,
)
from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING
from transformers.pipelines import PIPELINE_REGISTRY

from .codecs import AngleBinCodec, HeatmapCodec
from .configuration_cmsa import VARIANTS, CMSAConfig
from .export import export_onnx
from .image_processing_cmsa import CMSAImageProcessor, CMSAKeypointImageProcessor
from .modeling_cmsa import (
    CMSAForHeadPoseEstimation,
    CMSAForImageClassification,
    CMSAForKeypointDetection,
    CMSAModel,
    CMSAPreTrainedModel,
    reparameterize_model,
)
from .pipelines import HeadPoseEstimationPipeline, KeypointDetectionPipeline


__version__ = "0.1.0"

AutoConfig.register(CMSAConfig.model_type, CMSAConfig, exist_ok=True)
AutoModel.register(CMSAConfig, CMSAModel, exist_ok=True)
AutoModelForImageClassification.register(CMSAConfig, CMSAForImageClassification, exist_ok=True)
AutoModelForKeypointDetection.register(CMSAConfig, CMSAForKeypointDetection, exist_ok=True)
AutoModelForPoseEstimation.register(CMSAConfig, CMSAForKeypointDetection, exist_ok=True)
AutoImageProcessor.register(CMSAConfig, image_processor_classes={"pil": CMSAImageProcessor}, exist_ok=True)
# CMSA has no video processor. Saying so stops pipelines from guessing a remote "CMSAVideoProcessor" from the
# image processor's auto_map, which otherwise prompts for trust_remote_code on every pipeline() call.
VIDEO_PROCESSOR_MAPPING.register(CMSAConfig, {}, exist_ok=True)

CMSAConfig.register_for_auto_class()
CMSAModel.register_for_auto_class("AutoModel")
CMSAForImageClassification.register_for_auto_class("AutoModelForImageClassification")
CMSAForKeypointDetection.register_for_auto_class("AutoModelForKeypointDetection")
CMSAForHeadPoseEstimation.register_for_auto_class("AutoModel")
CMSAImageProcessor.register_for_auto_class("AutoImageProcessor")

PIPELINE_REGISTRY.register_pipeline(
    "keypoint-detection",
    pipeline_class=KeypointDetectionPipeline,
    pt_model=AutoModelForKeypointDetection,
    type="image",
)
PIPELINE_REGISTRY.register_pipeline(
    "head-pose-estimation",
    pipeline_class=HeadPoseEstimationPipeline,
    pt_model=CMSAForHeadPoseEstimation,
    type="image",
)

__all__ = [
    "VARIANTS",
    "CMSAConfig",
    "CMSAImageProcessor",
    "CMSAKeypointImageProcessor",
    "CMSAModel",
    "CMSAPreTrainedModel",
    "CMSAForImageClassification",
    "CMSAForKeypointDetection",
    "CMSAForHeadPoseEstimation",
    "AngleBinCodec",
    "HeatmapCodec",
    "HeadPoseEstimationPipeline",
    "KeypointDetectionPipeline",
    "reparameterize_model",
    "export_onnx",
]
