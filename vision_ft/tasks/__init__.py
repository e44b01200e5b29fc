"""LightningModules, one per kind of problem, on a shared :class:`BaseTask`."""

from .base import BaseTask
from .classification import ImageClassificationTask
from .detection import DetectionTask

__all__ = ["BaseTask", "DetectionTask", "ImageClassificationTask"]
