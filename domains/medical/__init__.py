"""Medical imaging pack: MedMNIST datamodule with an embedded SYNTHETIC offline sample.

Names are imported lazily so ``python -m domains.medical.sample`` needs only numpy.
"""

from __future__ import annotations

import importlib
from pathlib import Path

#: the pack's runnable config (``python -m vision_ft fit --config <CONFIG>``)
CONFIG = Path(__file__).resolve().parent.parent / "medical.yaml"

_EXPORTS = {"MedicalSampleData": ".data", "CLASS_NAMES": ".sample", "write_sample": ".sample"}
__all__ = sorted([*_EXPORTS, "CONFIG"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
