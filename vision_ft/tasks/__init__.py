"""LightningModules, one per kind of problem, on a shared :class:`BaseTask`."""

from .base import BaseTask
from .classification import ImageClassificationTask

__all__ = ["BaseTask", "ImageClassificationTask"]
