"""Backbone wrappers: one module per model family, one uniform surface."""

from .base import ROLES, Backbone, PackedSlice
from .dfine import DFineDetector
from .timm_vit import TINY_PRESETS, TimmViT

__all__ = ["ROLES", "Backbone", "DFineDetector", "PackedSlice", "TimmViT", "TINY_PRESETS"]
