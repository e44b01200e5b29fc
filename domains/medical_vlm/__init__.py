"""Medical VLM pack: point / detect / count conversations for a vision-language model (tiny Qwen2.5-VL by
default), generated from COCO boxes in the model's own coordinate frame, with grounding metrics.

    python -m vision_ft fit --config domains/medical_vlm.yaml      # CONFIG below

Names are imported lazily: ``import domains.medical_vlm`` loads nothing heavy until a name is used.
"""

from __future__ import annotations

import importlib
from pathlib import Path

#: the pack's runnable config
CONFIG = Path(__file__).resolve().parent.parent / "medical_vlm.yaml"

_EXPORTS = {"MedicalVLMData": ".data", "conversations": ".data", "read_coco": ".data", "TEMPLATES": ".data"}
__all__ = sorted([*_EXPORTS, "CONFIG"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
