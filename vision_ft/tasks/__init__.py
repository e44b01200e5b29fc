"""LightningModules, one per kind of problem, on a shared :class:`BaseTask`."""

from .base import BaseTask
from .classification import ImageClassificationTask
from .detection import DetectionTask
from .video import VideoPhaseTask

__all__ = ["BaseTask", "DetectionTask", "ImageClassificationTask", "VideoPhaseTask"]
