"""Backbone wrappers: one module per model family, one uniform surface."""

from .base import ROLES, Backbone, PackedSlice
from .dfine import DFineDetector
from .hf_clip import HFCLIP
from .open_clip import AttentionWeight, OpenCLIP
from .timm_vit import TINY_PRESETS, TimmViT

__all__ = ["ROLES", "AttentionWeight", "Backbone", "DFineDetector", "HFCLIP", "OpenCLIP", "PackedSlice",
           "TimmViT", "TINY_PRESETS"]
