"""Surgery video pack: surgical phase recognition (Cholec80, HeiCo) with an embedded SYNTHETIC sample.

    python -m vision_ft fit --config domains/surgery_video.yaml      # CONFIG below
    python -m domains.surgery_video.sample OUT_DIR                   # the synthetic sample alone
    python -m vision_ft fit --config domains/surgery_video_generation.yaml   # continue a clip (Wan + TIC-FT)
    python -m vision_ft fit --config domains/surgery_video_captioning.yaml   # caption clips (Qwen2.5-VL + Q-Adapter)

Names are imported lazily: ``import domains.surgery_video`` loads nothing heavy until a name is used.
"""

from __future__ import annotations

import importlib
from pathlib import Path

#: the pack's runnable config
CONFIG = Path(__file__).resolve().parent.parent / "surgery_video.yaml"

_EXPORTS = {
    "Cholec80Data": ".data", "HeiCoData": ".data",
    "CHOLEC80_PHASES": ".phases", "HEICO_PHASES": ".phases",
    "crop_black_margin": ".transforms",
    "phase_metrics": ".metrics", "evaluate_phase_files": ".metrics", "format_report": ".metrics",
    "plot_phase_ribbon": ".metrics",
    "read_cholec80_phases": ".formats", "write_cholec80_phases": ".formats", "read_heico_phase_csv": ".formats",
    "write_heico_phase_csv": ".formats", "read_phase_json": ".formats", "write_phase_json": ".formats",
    "labels_to_ranges": ".formats", "ranges_to_labels": ".formats",
    "write_sample": ".sample", "SAMPLE_SPLITS": ".sample",
    "SurgeryClipPairs": ".generation_data", "write_clip_pairs": ".generation_data",
    "SurgeryCaptionData": ".captioning_data", "write_caption_sample": ".captioning_data",
}
__all__ = sorted([*_EXPORTS, "CONFIG"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
