"""Backbone wrappers: one module per model family, one uniform surface."""

from .base import ROLES, Backbone, PackedSlice
from .dfine import DFineDetector
from .open_clip import AttentionWeight, OpenCLIP
from .timm_vit import TINY_PRESETS, TimmViT

__all__ = ["ROLES", "AttentionWeight", "Backbone", "DFineDetector", "OpenCLIP", "PackedSlice", "TimmViT",
           "TINY_PRESETS"]
