"""Slice classification from NIfTI volumes: a CSV manifest or a Medical Segmentation Decathlon
``dataset.json``, slice labels from label volumes or one label per volume, split by patient."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from ...errors import ConfigError, DataError
from ..labelled_images import Samples
from .nifti import (
    PLANE_AXIS,
    canonical_shape,
    load_canonical,
    slice_indices,
    slice_labels,
    slice_stack,
    windowed_volume,
)
from .patient_data import PatientSplitData, class_labels, read_csv_rows
from .windowing import check_percentiles, resolve_window

log = logging.getLogger("vision_ft")


class NiftiSlices(Samples):
    """Slices ``(volume, index)`` of NIfTI volumes, read through the canonical (RAS+) orientation."""

    def __init__(self, root: Path, volumes: list[Path], items: list[tuple[int, int]], labels: np.ndarray,
                 plane: str, context: int, window, percentiles: Sequence[float]):
        self.root, self.volumes, self.items = root, volumes, list(items)
        self.labels = np.asarray(labels)
        self.plane, self.context, self.window, self.percentiles = plane, int(context), window, tuple(percentiles)
        self.keys = [f"{self._name(v)}:{plane}{k}" for v, k in self.items]

    def _name(self, v: int) -> str:
        try:
            return self.volumes[v].relative_to(self.root).as_posix()
        except ValueError:
            return str(self.volumes[v])

    def describe(self, i: int) -> str:
        v, k = self.items[i]
        return f"{self.volumes[v]} ({self.plane} slice {k})"

    def read(self, i: int) -> np.ndarray:
        v, k = self.items[i]
        return slice_stack(windowed_volume(self.volumes[v], self.window, self.percentiles), self.plane, k, self.context)

    def sha1(self, i: int) -> str:
        v, k = self.items[i]
        return hashlib.sha1(self.volumes[v].read_bytes() + f":{self.plane}{k}".encode()).hexdigest()

    def unreadable(self) -> dict[int, str]:
        reasons: dict[int, str | None] = {}
        for v in sorted({v for v, _ in self.items}):
            try:
                windowed_volume(self.volumes[v], self.window, self.percentiles)
                reasons[v] = None
            except DataError as e:
                reasons[v] = str(e)
        return {i: reasons[v] for i, (v, _) in enumerate(self.items) if reasons[v] is not None}

    def subset(self, positions: Sequence[int]) -> NiftiSlices:
        positions = list(positions)
        return NiftiSlices(self.root, self.volumes, [self.items[p] for p in positions], self.labels[positions],
                           self.plane, self.context, self.window, self.percentiles)


def _decathlon_rows(path: Path) -> list[dict]:
    """Rows of a Medical Segmentation Decathlon ``dataset.json`` (its ``training`` list; patient = image stem)."""
    try:
        data = json.loads(path.read_text())
        entries = data["training"]
        rows = [{"image": e["image"], "mask": e["label"], "_line": n} for n, e in enumerate(entries)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} (data.init_args.manifest): not a Decathlon dataset.json with a 'training' list of "
                        f"{{'image', 'label'}} entries ({type(e).__name__}: {e})") from e
    for r in rows:
        r["patient_id"] = Path(r["image"]).name.split(".")[0]
    if not rows:
        raise DataError(f"{path}: the 'training' list is empty")
    return rows


class NiftiSliceData(PatientSplitData):
    """2-D (or 2.5-D) slices of NIfTI volumes for classification, split by patient.

    The manifest is a CSV (columns ``image`` and ``patient_id``, plus ``mask`` for a label
    volume or ``label`` for one class per volume) or a Decathlon ``dataset.json`` (image +
    label volume per case; the case name is the patient). Paths are relative to ``root``
    (default: the manifest's folder).

    Args:
        manifest: the CSV or ``dataset.json``.
        root: folder the paths are relative to.
        image_column, mask_column, label_column, patient_column: CSV column names; with a mask
            column, slice labels come from the label volumes (classes ``[negative, positive]``
            unless ``class_names`` says otherwise), else from ``label_column``.
        plane: ``axial``, ``coronal`` or ``sagittal`` (in patient space, from the affine).
        slice_range: ``[start, stop]`` slice indices along the plane's axis (canonical order:
            axial counts from inferior to superior); ``None`` = all.
        step: every ``step``-th slice.
        context: 0 for single slices, 1 for 2.5-D stacks (slices i-1, i, i+1 as channels).
        window: a preset, ``[centre, width]`` (CT, HU), ``percentile`` or ``minmax`` (per volume).
        percentiles: ``[low, high]`` for ``window: percentile``.
        min_voxels: a slice is positive when at least this many of its mask voxels are positive.
        positive_labels: label values that count as positive (e.g. ``[2]`` = tumour in the
            Decathlon liver task); ``None`` = any non-zero value.
        **kwargs: :class:`~vision_ft.data.medical.PatientSplitData` options.
    """

    def __init__(self, manifest: str, root: str | None = None, image_column: str = "image",
                 mask_column: str | None = "mask", label_column: str | None = None,
                 patient_column: str = "patient_id", plane: Literal["axial", "coronal", "sagittal"] = "axial",
                 slice_range: Sequence[int] | None = None, step: int = 1, context: int = 0,
                 window: str | list[float] | None = "percentile", percentiles: Sequence[float] = (0.5, 99.5),
                 min_voxels: int = 1, positive_labels: Sequence[int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.manifest = Path(manifest).expanduser()
        self.root = Path(root).expanduser() if root is not None else self.manifest.parent
        if plane not in PLANE_AXIS:
            raise ConfigError(f"data.init_args.plane must be one of {sorted(PLANE_AXIS)}, got {plane!r}")
        if context not in (0, 1):
            raise ConfigError(f"data.init_args.context must be 0 (2-D slices) or 1 (2.5-D: three slices as the three "
                              f"channels), got {context}")
        if int(step) < 1 or int(min_voxels) < 1:
            raise ConfigError(f"data.init_args.step and min_voxels must be >= 1, got {step} and {min_voxels}")
        if slice_range is not None and len(slice_range) != 2:
            raise ConfigError(f"data.init_args.slice_range must be [start, stop] or null, got {slice_range!r}")
        self.plane, self.context, self.step, self.slice_range = plane, int(context), int(step), slice_range
        self.window = resolve_window(window, "data.init_args.window", allowed_modes=("percentile", "minmax"))
        self.percentiles = check_percentiles(percentiles)
        self.min_voxels = int(min_voxels)
        self.positive_labels = None if positive_labels is None else [int(v) for v in positive_labels]
        if self.manifest.suffix == ".json":
            if not self.manifest.is_file():
                raise DataError(f"data.init_args.manifest: file {self.manifest} does not exist")
            self._rows, self.image_column, self.mask_column, self.patient_column = (
                _decathlon_rows(self.manifest), "image", "mask", "patient_id")
            label_column = None
        else:
            self.image_column, self.patient_column = image_column, patient_column
            header = read_csv_rows(self.manifest, [image_column, patient_column], "manifest")
            self.mask_column = mask_column if mask_column and mask_column in header[0] else None
            if self.mask_column is None and (label_column is None or label_column not in header[0]):
                raise DataError(f"{self.manifest} (data.init_args.manifest) needs a {mask_column!r} column of label "
                                f"volumes or a label column (data.init_args.label_column={label_column!r})")
            self._rows = read_csv_rows(self.manifest, [image_column, patient_column,
                                                       self.mask_column or label_column], "manifest")
        if self.mask_column:
            names, self._volume_labels = ["negative", "positive"], None
            self._set_classes(2, names)
        else:
            names, self._volume_labels = class_labels(self._rows, label_column, self._given_names, self.manifest)
            self._set_classes(len(names), names)

    def _path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.root / p

    def _volume(self, row: dict, v: int) -> tuple[Path, list[int], np.ndarray]:
        image = self._path(row[self.image_column])
        shape = canonical_shape(image)
        chosen = slice_indices(shape[PLANE_AXIS[self.plane]], self.slice_range, self.step)
        if not chosen:
            raise DataError(f"{image}: data.init_args.slice_range={self.slice_range} selects no {self.plane} slice "
                            f"of the {shape[PLANE_AXIS[self.plane]]}")
        if self.mask_column is None:
            return image, chosen, np.full(len(chosen), self._volume_labels[v], dtype=np.int64)
        mask_path = self._path(row[self.mask_column])
        mask = load_canonical(mask_path)
        if mask.shape != shape:
            raise DataError(f"{mask_path}: label volume shape {mask.shape} (RAS+) differs from its image {image} "
                            f"{shape}")
        labels = slice_labels(mask, self.plane, self.min_voxels, self.positive_labels)
        return image, chosen, labels[chosen]

    def _all_samples(self) -> tuple[NiftiSlices, list[str]]:
        volumes, items, labels, patients, failed = [], [], [], [], []
        for v, row in enumerate(self._rows):
            try:
                image, chosen, slice_y = self._volume(row, v)
            except DataError as e:
                if self.on_corrupt == "error":
                    raise DataError(f"{e} (listed in {self.manifest}, entry {row['_line']}; set "
                                    f"data.init_args.on_corrupt=skip to skip it)") from e
                failed.append(str(e))
                continue
            volumes.append(image)
            for k, y in zip(chosen, slice_y):
                items.append((len(volumes) - 1, k))
                labels.append(int(y))
                patients.append(row[self.patient_column])
        if failed:
            self.skipped.extend(failed)
            log.warning("skipped %d unreadable volume(s) listed in %s (data.init_args.on_corrupt=skip):\n  %s",
                        len(failed), self.manifest, "\n  ".join(failed))
        samples = NiftiSlices(self.root, volumes, items, np.asarray(labels, dtype=np.int64), self.plane,
                              self.context, self.window, self.percentiles)
        return samples, patients

    def _identity(self) -> dict:
        return {"name": self.manifest.stem, "type": type(self).__name__, "source": str(self.manifest.resolve())}
