"""The training tasks of cmsa_hf and their one runner: `run(ImageClassificationTask(), argv)` trains, evaluates
and writes a Hub-ready folder. A new task subclasses `Task` (see `cmsa_hf.tasks.base`)."""

from .base import Task
from .head_pose import HeadPoseTask
from .image_classification import ImageClassificationTask
from .keypoint_detection import KeypointDetectionTask
from .runner import parse_args, run


__all__ = ["Task", "HeadPoseTask", "ImageClassificationTask", "KeypointDetectionTask", "parse_args", "run"]
