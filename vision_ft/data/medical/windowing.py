"""Intensity windowing shared by the DICOM and NIfTI readers.

A window maps stored intensities (Hounsfield units for CT after the Modality LUT) to
``[0, 1]``. It is one of:

- a named preset (:data:`WINDOW_PRESETS`: ``lung``, ``mediastinum``, ``bone``, ``brain``),
  given as ``(centre, width)`` in HU;
- explicit numbers ``[centre, width]``;
- ``"file"`` (DICOM only): the file's own VOI LUT or Window Centre/Width, min-max when it has none;
- ``"minmax"``: the image's own minimum and maximum;
- ``"percentile"`` with ``percentiles=(low, high)``: the image's percentiles (robust min-max,
  the usual choice for MR, whose intensities have no physical unit).

The linear window follows the DICOM standard's VOI LUT function LINEAR (PS3.3 C.11.2.1.2.1)::

    x <= c - 0.5 - (w - 1) / 2          -> 0
    x >  c - 0.5 + (w - 1) / 2          -> 1
    otherwise  ((x - (c - 0.5)) / (w - 1) + 0.5)

which is what a PACS viewer shows for the same centre and width.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...errors import ConfigError

#: ``name -> (centre, width)`` in Hounsfield units (the usual radiology reading windows).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}

#: windows that are not numbers
NAMED_MODES = ("file", "minmax", "percentile")


def resolve_window(window: WindowSpec, key: str = "data.init_args.window",
                   allowed_modes: Sequence[str] = NAMED_MODES) -> str | tuple[float, float]:
    """A config value → a mode name from ``allowed_modes`` or ``(centre, width)``; bad values are a :class:`ConfigError` naming ``key``."""
    if window is None:
        window = allowed_modes[0]
    if isinstance(window, str):
        name = window.strip().lower()
        if name in WINDOW_PRESETS:
            return WINDOW_PRESETS[name]
        if name in allowed_modes:
            return name
        raise ConfigError(f"{key}: unknown window {window!r}; use a preset {sorted(WINDOW_PRESETS)}, one of "
                          f"{list(allowed_modes)}, or [centre, width] numbers")
    try:
        centre, width = (float(v) for v in window)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: a window is a preset name or two numbers [centre, width], got {window!r}") from e
    if not np.isfinite(centre) or not np.isfinite(width) or width < 1:
        raise ConfigError(f"{key}: window width must be a finite number >= 1 and the centre finite, got "
                          f"[{centre}, {width}]")
    return centre, width


def linear_window(x: np.ndarray, centre: float, width: float) -> np.ndarray:
    """The DICOM LINEAR VOI function (see the module docstring), as float32 in ``[0, 1]``."""
    x = np.asarray(x, dtype=np.float64)
    if width <= 1:  # the standard's limit for width 1: a threshold at c - 0.5
        return (x > centre - 0.5).astype(np.float32)
    y = (x - (centre - 0.5)) / (width - 1.0) + 0.5
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def minmax_scale(x: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Scale ``[low, high]`` (default: the array's min and max) to ``[0, 1]``; a constant array gives zeros."""
    x = np.asarray(x, dtype=np.float64)
    low = float(np.min(x)) if low is None else float(low)
    high = float(np.max(x)) if high is None else float(high)
    if high <= low:
        return np.zeros(x.shape, dtype=np.float32)
    return np.clip((x - low) / (high - low), 0.0, 1.0).astype(np.float32)


def percentile_scale(x: np.ndarray, percentiles: Sequence[float] = (0.5, 99.5)) -> np.ndarray:
    """Robust min-max: the ``percentiles`` of ``x`` map to 0 and 1 (clipped outside)."""
    low, high = np.percentile(np.asarray(x, dtype=np.float64), [float(percentiles[0]), float(percentiles[1])])
    return minmax_scale(x, low, high)


def check_percentiles(percentiles: Sequence[float], key: str = "data.init_args.percentiles") -> tuple[float, float]:
    try:
        low, high = (float(v) for v in percentiles)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: two numbers [low, high] expected, got {percentiles!r}") from e
    if not 0.0 <= low < high <= 100.0:
        raise ConfigError(f"{key}: need 0 <= low < high <= 100, got [{low}, {high}]")
    return low, high


def apply_window(x: np.ndarray, window: str | tuple[float, float],
                 percentiles: Sequence[float] = (0.5, 99.5)) -> np.ndarray:
    """Apply a resolved window (not ``"file"``: the DICOM reader handles that one) → float32 in ``[0, 1]``."""
    if isinstance(window, tuple):
        return linear_window(x, *window)
    if window == "minmax":
        return minmax_scale(x)
    if window == "percentile":
        return percentile_scale(x, percentiles)
    raise ValueError(f"window {window!r} cannot be applied without the file's own values")
