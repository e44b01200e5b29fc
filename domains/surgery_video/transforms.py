"""Frame transforms for endoscopic video."""

from __future__ import annotations

import numpy as np


def crop_black_margin(frame: np.ndarray, threshold: int = 15, min_fraction: float = 0.5) -> np.ndarray:
    """Crop the black border an endoscope leaves around the image.

    Keeps the bounding box of the rows and columns that hold at least one pixel brighter
    than ``threshold`` (on the 0-255 scale) in any channel, the usual Cholec80 preprocessing
    ("cut margin") before resizing. A crop that would keep less than ``min_fraction`` of the
    height or width (a dark or black frame) is not applied: the frame is returned whole.
    """
    arr = np.asarray(frame)
    if arr.ndim == 2:
        arr = arr[..., None]
    scale = 255.0 if arr.dtype == np.uint8 else (65535.0 if arr.dtype == np.uint16 else 1.0)
    bright = (arr.max(-1).astype(np.float64) * (255.0 / scale)) > threshold
    rows, cols = np.flatnonzero(bright.any(1)), np.flatnonzero(bright.any(0))
    if rows.size == 0 or cols.size == 0:
        return frame
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    h, w = bright.shape
    if bottom - top < min_fraction * h or right - left < min_fraction * w:
        return frame
    return np.asarray(frame)[top:bottom, left:right]
