"""DICOM classification data: a CSV manifest of DICOM files or series folders, split by patient."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from ...errors import ConfigError, DataError
from ..labelled_images import Samples
from .dicom import (
    DicomSource,
    check_metadata_fields,
    open_source,
    pick_frames,
    read_frame,
    read_record,
)
from .patient_data import PatientSplitData, class_labels, read_csv_rows
from .windowing import check_percentiles, resolve_window

log = logging.getLogger("vision_ft")


DICOM_SUFFIXES = (".dcm", ".dicom")


class DicomSamples(Samples):
    """Frames of DICOM sources; ``records`` holds the chosen metadata of each sample (no names, no private tags)."""

    def __init__(self, root: Path, sources: list[DicomSource], items: list[tuple[int, int]], labels: np.ndarray,
                 records: list[dict], window, percentiles: Sequence[float]):
        self.root, self.sources, self.items = root, sources, list(items)
        self.labels, self.records = np.asarray(labels), list(records)
        self.window, self.percentiles = window, tuple(percentiles)
        self.keys = [self._key(s, k) for s, k in self.items]

    def _key(self, s: int, k: int) -> str:
        source = self.sources[s]
        try:
            name = source.path.relative_to(self.root).as_posix()
        except ValueError:
            name = str(source.path)
        return f"{name}#{k}" if source.n_frames > 1 else name

    def describe(self, i: int) -> str:
        s, k = self.items[i]
        file, index = self.sources[s].frame_location(k)
        return f"{file} (frame {index})" if self.sources[s].n_frames > 1 and not self.sources[s].series else str(file)

    def read(self, i: int) -> np.ndarray:
        s, k = self.items[i]
        image = read_frame(self.sources[s], k, self.window, self.percentiles)
        return image[..., None] if image.ndim == 2 else image

    def sha1(self, i: int) -> str:
        s, k = self.items[i]
        file, index = self.sources[s].frame_location(k)
        return hashlib.sha1(file.read_bytes() + f"#{index}".encode()).hexdigest()

    def unreadable(self) -> dict[int, str]:
        bad = {}
        for i in range(len(self.items)):
            try:
                self.read(i)
            except DataError as e:
                bad[i] = str(e)
        return bad

    def subset(self, positions: Sequence[int]) -> DicomSamples:
        positions = list(positions)
        return DicomSamples(self.root, self.sources, [self.items[p] for p in positions], self.labels[positions],
                            [self.records[p] for p in positions], self.window, self.percentiles)


class DicomManifestData(PatientSplitData):
    """DICOM images listed in a CSV manifest (``path,label[,patient_id]``), split by patient.

    Each row's ``path`` (relative to ``root``, default the CSV's folder) is a DICOM file
    (single- or multi-frame) or a series folder (one file per slice; sorted along the slice
    normal, checked for one modality and even spacing). ``frames`` picks the images of a
    source: ``middle`` (one per row), ``all`` (one per frame/slice, all with the row's label
    and patient) or a frame index.

    Args:
        manifest: the CSV.
        root: folder the paths are relative to.
        path_column, label_column: column names.
        patient_column: the patient id column; ``None`` takes each source's DICOM PatientID.
        window: ``file`` (the file's VOI LUT / window, min-max without one), a preset (``lung``,
            ``mediastinum``, ``bone``, ``brain``), ``[centre, width]`` in modality units (HU for
            CT), ``minmax`` or ``percentile``.
        percentiles: ``[low, high]`` for ``window: percentile``.
        frames: ``middle``, ``all`` or a frame index.
        metadata: DICOM keywords copied into each sample's record (``dataset(split).samples.records``);
            person names (VR PN) and private tags are refused.
        **kwargs: :class:`~vision_ft.data.medical.PatientSplitData` and
            :class:`~vision_ft.data.ClassificationData` options.
    """

    def __init__(self, manifest: str, root: str | None = None, path_column: str = "path",
                 label_column: str = "label", patient_column: str | None = "patient_id",
                 window: str | list[float] | None = "file", percentiles: Sequence[float] = (0.5, 99.5),
                 frames: Literal["middle", "all"] | int = "middle",
                 metadata: Sequence[str] = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"),
                 **kwargs):
        super().__init__(**kwargs)
        self.manifest = Path(manifest).expanduser()
        self.root = Path(root).expanduser() if root is not None else self.manifest.parent
        if root is not None and not self.root.is_dir():
            raise DataError(f"data.init_args.root: folder {self.root} does not exist")
        self.window = resolve_window(window, "data.init_args.window")
        self.percentiles = check_percentiles(percentiles)
        if not (frames in ("middle", "all") or (isinstance(frames, int) and not isinstance(frames, bool))):
            raise ConfigError(f"data.init_args.frames must be 'middle', 'all' or a frame index, got {frames!r}")
        self.frames = frames
        self.metadata = check_metadata_fields(metadata)
        self.patient_column = patient_column
        required = [path_column, label_column] + ([patient_column] if patient_column else [])
        self._rows = read_csv_rows(self.manifest, required, "manifest")
        self.path_column = path_column
        names, self._labels = class_labels(self._rows, label_column, self._given_names, self.manifest)
        self._set_classes(len(names), names)

    def _all_samples(self) -> tuple[DicomSamples, list[str]]:
        sources, items, labels, records, patients = [], [], [], [], []
        failed = []
        for row, label in zip(self._rows, self._labels):
            path = Path(row[self.path_column])
            path = path if path.is_absolute() else self.root / path
            try:
                source = open_source(path)
                chosen = pick_frames(source.n_frames, self.frames)
            except DataError as e:
                if self.on_corrupt == "error":
                    raise DataError(f"{e} (listed in {self.manifest} line {row['_line']}; set "
                                    f"data.init_args.on_corrupt=skip to skip it)") from e
                failed.append(str(e))
                continue
            patient = row[self.patient_column] if self.patient_column else str(getattr(source.header, "PatientID", ""))
            if not patient:
                raise DataError(f"{path}: no PatientID in the DICOM header (listed in {self.manifest} line "
                                f"{row['_line']}); add a patient column and set data.init_args.patient_column")
            record = read_record(source.header, self.metadata)
            sources.append(source)
            for k in chosen:
                items.append((len(sources) - 1, k))
                labels.append(label)
                records.append(record)
                patients.append(patient)
        if failed:
            self.skipped.extend(failed)
            log.warning("skipped %d unreadable DICOM source(s) listed in %s (data.init_args.on_corrupt=skip):\n  %s",
                        len(failed), self.manifest, "\n  ".join(failed))
        samples = DicomSamples(self.root, sources, items, np.asarray(labels, dtype=np.int64), records,
                               self.window, self.percentiles)
        return samples, patients

    def input_transform(self) -> dict:
        """Prediction reads ``.dcm`` files (and series folders given by path) as this data does: the same
        window, percentiles and frame (see :class:`~vision_ft.data.medical.dicom.DicomReader`)."""
        window = list(self.window) if isinstance(self.window, tuple) else self.window
        reader = {"class_path": "vision_ft.data.medical.dicom.DicomReader",
                  "init_args": {"window": window, "percentiles": list(self.percentiles), "frame": self.frames}}
        return {"readers": {suffix: reader for suffix in DICOM_SUFFIXES}}

    def _identity(self) -> dict:
        return {"name": self.manifest.stem, "type": type(self).__name__, "source": str(self.manifest.resolve())}
