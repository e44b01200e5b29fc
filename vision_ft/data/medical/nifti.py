"""NIfTI volumes as 2-D slices or 2.5-D stacks (nibabel).

Orientation comes from the affine, never from the array order: every volume is brought to the
closest canonical orientation (RAS+: array axes point to the patient's Right, Anterior,
Superior) with :func:`nibabel.as_closest_canonical`, so ``axial`` always cuts along the
superior axis, whatever order and flips the file stores. Slices are then shown as in radiology:

- ``axial``: anterior at the top, the patient's right on the image's left;
- ``coronal``: superior at the top, the patient's right on the image's left;
- ``sagittal``: superior at the top, anterior on the image's left.

A 2.5-D stack (``context=1``) puts slices ``i-1, i, i+1`` in the three channels (edge slices
repeat). Intensities are windowed (a preset or ``[centre, width]`` for CT in HU) or scaled by
percentiles of the whole volume (MR). A label volume gives slice labels: a slice is positive when
at least ``min_voxels`` of its voxels carry one of the positive label values.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from ...errors import ConfigError, DataError
from .windowing import apply_window

#: axis of the canonical (RAS+) array that each plane cuts along
PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}


def _nibabel():
    try:
        import nibabel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("reading NIfTI needs nibabel: pip install 'vision_ft[medical]'") from e
    return nibabel


def _load(path: Path):
    nib = _nibabel()
    if not Path(path).is_file():
        raise DataError(f"{path}: file does not exist")
    try:
        return nib.load(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {str(e)[:120]})") from e


def canonical_shape(path: Path) -> tuple[int, int, int]:
    """The volume's shape after reorientation to RAS+, from the header only."""
    from nibabel.orientations import io_orientation

    img = _load(path)
    shape = img.shape[:3] if len(img.shape) == 3 or (len(img.shape) == 4 and img.shape[3] == 1) else None
    if shape is None:
        raise DataError(f"{path}: a 3-D volume expected, the file has shape {img.shape}")
    ornt = io_orientation(img.affine)
    out = [0, 0, 0]
    for i, (axis, _) in enumerate(ornt):
        out[int(axis)] = int(shape[i])
    return tuple(out)


def load_canonical(path: Path) -> np.ndarray:
    """The volume reoriented to RAS+ as float32 ``(X, Y, Z)``; NaN/inf voxels are a :class:`DataError`."""
    nib = _nibabel()
    img = _load(path)
    try:
        data = np.asarray(nib.as_closest_canonical(img).get_fdata(dtype=np.float32))
    except Exception as e:
        raise DataError(f"{path}: voxel data cannot be read ({type(e).__name__}: {str(e)[:120]})") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: a 3-D volume expected, the file has shape {data.shape}")
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise DataError(f"{path}: {bad} voxel(s) are NaN or infinite; fix the volume (or set "
                        f"data.init_args.on_corrupt=skip to skip it)")
    return data


@lru_cache(maxsize=4)
def _windowed(path: str, stamp: tuple, window, percentiles: tuple[float, float]) -> np.ndarray:
    return apply_window(load_canonical(Path(path)), window, percentiles)


def windowed_volume(path: Path, window, percentiles: Sequence[float] = (0.5, 99.5)) -> np.ndarray:
    """The canonical volume mapped to ``[0, 1]`` (window or volume percentiles); the last few are cached
    (keyed by path, size and modification time, so a rewritten file is read again)."""
    try:
        st = Path(path).stat()
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = None
    return _windowed(str(path), stamp, window, tuple(float(p) for p in percentiles))


def plane_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """Slice ``index`` of a canonical (RAS+) volume in ``plane``, in radiological display order."""
    if plane == "axial":  # (X, Y) -> rows: Y descending (anterior top); cols: X descending (right on the left)
        return volume[::-1, ::-1, index].T
    if plane == "coronal":  # (X, Z) -> rows: Z descending (superior top); cols: X descending
        return volume[::-1, index, ::-1].T
    if plane == "sagittal":  # (Y, Z) -> rows: Z descending; cols: Y descending (anterior on the left)
        return volume[index, ::-1, ::-1].T
    raise ConfigError(f"data.init_args.plane must be one of {sorted(PLANE_AXIS)}, got {plane!r}")


def slice_stack(volume: np.ndarray, plane: str, index: int, context: int = 0) -> np.ndarray:
    """``H×W×C``: the slice (``context=0``, C = 1) or slices ``index-context … index+context`` (edges repeated)."""
    n = volume.shape[PLANE_AXIS[plane]]
    picks = [min(max(index + d, 0), n - 1) for d in range(-context, context + 1)]
    return np.stack([plane_slice(volume, plane, k) for k in picks], axis=-1)


def slice_indices(n: int, slice_range: Sequence[int] | None = None, step: int = 1) -> list[int]:
    """Indices ``range(start, stop, step)`` of ``n`` slices (``slice_range`` python-style, negatives from the end)."""
    start, stop = (0, n) if slice_range is None else (int(slice_range[0]), int(slice_range[1]))
    return list(range(n))[slice(start, stop, int(step))]


def slice_labels(mask: np.ndarray, plane: str, min_voxels: int, positive: Sequence[int] | None) -> np.ndarray:
    """Per slice of a canonical label volume: 1 when at least ``min_voxels`` voxels hold a positive value
    (any non-zero value, or one of ``positive``), else 0."""
    hit = mask > 0 if positive is None else np.isin(np.rint(mask).astype(np.int64), list(positive))
    axis = PLANE_AXIS[plane]
    counts = hit.sum(axis=tuple(a for a in range(3) if a != axis))
    return (counts >= int(min_voxels)).astype(np.int64)
