"""Backbone wrappers: one module per model family, one uniform surface."""

from .base import ROLES, Backbone, WeightRef
from .causal_lm import CausalLM
from .cogvideox import CogVideoX
from .dfine import DFineDetector
from .hf_clip import HFCLIP
from .open_clip import OpenCLIP
from .stable_diffusion import StableDiffusion
from .timm_vit import TINY_PRESETS, TimmViT
from .video_diffusion import WanVideo
from .vlm import VisionLanguageModel

__all__ = ["ROLES", "Backbone", "CausalLM", "CogVideoX", "DFineDetector", "HFCLIP", "OpenCLIP", "StableDiffusion", "TimmViT", "TINY_PRESETS", "VisionLanguageModel", "WanVideo", "WeightRef"]
