"""starter pack: image classification on class folders (``root/<split>/<class>/<image>``).

What to replace is listed in ``TODO.md`` beside this file.
"""

from __future__ import annotations

import importlib
from pathlib import Path

#: the pack's runnable config (``python -m vision_ft fit --config <CONFIG>``)
CONFIG = Path(__file__).resolve().parent.parent / "starter.yaml"

_EXPORTS = {"StarterData": ".data", "write_sample": ".sample", "CLASS_NAMES": ".sample"}
__all__ = sorted([*_EXPORTS, "CONFIG"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
