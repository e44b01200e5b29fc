"""Radio astronomy pack: Fanaroff-Riley classification of radio galaxies.

- Data: :class:`MiraBestData` (MiraBest pickled batches, read with a restricted
  unpickler; label conventions MBFRConfident / MBFRUncertain / MBFRFull / MBHybrid),
  :class:`RadioFITSData` (FITS cutouts + CSV catalogue, astropy),
  :class:`RadioPNGFolderData` (PNG class folders, e.g. the FIRST 4-class set).
- Transforms: :class:`RadioPreprocess` (NaN policy, sigma clipping, zscale/asinh/...
  stretch to [0, 1]; one channel, replicated to three by the kit's loader).
- Metrics: :func:`fr_metrics` (accuracy, per-class recall, AUROC, confusion matrix, as
  the task logs them) and :func:`fr_ratio` (the Fanaroff & Riley 1974 ratio).
- Sample: :func:`write_sample`, a SYNTHETIC FR I / FR II generator writing MiraBest batches.
- :data:`CONFIG`: the pack's default config (``python -m vision_ft fit --config CONFIG``).

Names are imported lazily so ``python -m domains.radio_astronomy.sample`` needs only numpy.
"""

from __future__ import annotations

import importlib
from pathlib import Path

#: the pack's runnable config: ``python -m vision_ft fit --config <CONFIG>``
CONFIG = Path(__file__).resolve().parent.parent / "radio_astronomy.yaml"

_EXPORTS = {
    "MiraBestData": ".data", "RadioFITSData": ".data", "RadioPNGFolderData": ".data",
    "PreprocessedSamples": ".data", "read_fits_image": ".data", "images_to_tensor": ".data",
    "RadioPreprocess": ".preprocess", "background_stats": ".preprocess", "clip_background": ".preprocess",
    "stretch_to_unit": ".preprocess",
    "fr_metrics": ".metrics", "fr_ratio": ".metrics", "REPORTED_METRICS": ".metrics",
    "CONVENTIONS": ".mirabest", "LABEL_CODES": ".mirabest", "load_pickle": ".mirabest", "read_batch": ".mirabest",
    "write_batch": ".mirabest", "write_meta": ".mirabest",
    "CLASS_NAMES": ".sample", "write_sample": ".sample", "write_fits_sample": ".sample",
}
__all__ = sorted([*_EXPORTS, "CONFIG"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
