"""LightningModules, one per kind of problem, on a shared :class:`BaseTask`."""

from .base import BaseTask
from .causal_lm import CausalLMSFTTask
from .classification import ImageClassificationTask
from .clip_classification import CLIPClassificationTask
from .clip_ood import CLIPOODTask
from .detection import DetectionTask
from .text_to_image import TextToImageTask
from .video import VideoPhaseTask
from .video_diffusion import VideoDiffusionTask
from .vlm import VisionLanguageSFTTask

__all__ = ["BaseTask", "CausalLMSFTTask", "CLIPClassificationTask", "CLIPOODTask", "DetectionTask", "ImageClassificationTask",
           "TextToImageTask", "VideoDiffusionTask", "VideoPhaseTask", "VisionLanguageSFTTask"]
