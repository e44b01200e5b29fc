"""Telecom text pack: causal-LM instruction tuning (LoRA / QLoRA) and TeleQnA-style multiple-choice tests.

    python -m vision_ft fit --config domains/telecom.yaml          # CONFIG below
    python -m domains.telecom.sample OUT_DIR                       # the synthetic sample alone

Names are imported lazily: ``import domains.telecom`` loads nothing heavy until a name is used.
"""

from __future__ import annotations

import importlib
from pathlib import Path

#: the pack's runnable config
CONFIG = Path(__file__).resolve().parent.parent / "telecom.yaml"

_EXPORTS = {"TelecomData": ".data", "write_sample": ".sample", "build": ".sample", "FACTS": ".sample",
            "SAMPLE_FILES": ".sample"}
__all__ = sorted([*_EXPORTS, "CONFIG"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
