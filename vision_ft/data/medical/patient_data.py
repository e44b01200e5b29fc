"""Base datamodule for data with a patient per sample, split by patient, and its CSV manifest reader.

A subclass reads its manifest in ``__init__`` (classes known before ``setup``) and implements
:meth:`PatientSplitData._all_samples` (every sample with its patient). This base draws or reuses
the patient split (:mod:`~vision_ft.data.medical.patients`) and serves the three splits through
:class:`~vision_ft.data.ClassificationData` (corrupt policy, few-shot, loaders).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..base import SPLITS, ClassificationData
from ..labelled_images import FileSamples, Samples
from .patients import check_fractions, check_no_leakage, resolve_patient_split

log = logging.getLogger("vision_ft")


def read_csv_rows(path: str | Path, required: Sequence[str], key: str,
                  nonempty: Sequence[str] | None = None) -> list[dict]:
    """Rows of a CSV with a header as dicts (values stripped), plus ``_line``; missing columns name the file.
    Values of ``nonempty`` (default: all ``required``) must not be blank."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data.init_args.{key}: file {file} does not exist")
    with file.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{file} (data.init_args.{key}) lacks column(s) {missing}; found {header}")
        rows = []
        for n, r in enumerate(reader, start=2):
            row = {k: (v or "").strip() for k, v in r.items() if k is not None}
            row["_line"] = n
            rows.append(row)
    if not rows:
        raise DataError(f"{file} (data.init_args.{key}) has no rows")
    for r in rows:
        empty = [c for c in (required if nonempty is None else nonempty) if not r.get(c)]
        if empty:
            raise DataError(f"{file} line {r['_line']}: empty {empty} (data.init_args.{key})")
    return rows


def class_labels(rows: list[dict], column: str, given: list[str] | None, file: Path) -> tuple[list[str], np.ndarray]:
    """Class names and int64 labels of a single-label column: names (sorted, or the given order) or integers."""
    values = [r[column] for r in rows]
    is_int = all(v.lstrip("-").isdigit() for v in values)
    if given is not None:
        names = list(given)
    elif is_int:
        names = [str(i) for i in range(max(int(v) for v in values) + 1)]
    else:
        names = sorted(set(values))
    index = {n: i for i, n in enumerate(names)}
    out = []
    for r, v in zip(rows, values):
        if v in index:
            out.append(index[v])
        elif v.lstrip("-").isdigit() and 0 <= int(v) < len(names):
            out.append(int(v))
        else:
            raise DataError(f"{file} line {r['_line']}: label {v!r} is not one of {names} (column {column!r}; "
                            f"data.init_args.class_names fixes the class list)")
    return names, np.asarray(out, dtype=np.int64)


class PatientSplitData(ClassificationData):
    """Samples with patients, split by patient (see :mod:`vision_ft.data.medical.patients`).

    Args:
        split_file: JSON patient split, reused when it exists, written when it does not.
            Default: ``patient_split.json`` in ``split_dir`` (the run's log dir when training).
        split_fractions: ``[train, val, test]`` shares of patients (test may be 0: testing
            then uses validation).
        stratify: stratify the draw by a label per patient where every stratum has enough patients.
        **kwargs: :class:`~vision_ft.data.ClassificationData` options.
    """

    def __init__(self, split_file: str | None = None, split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
                 stratify: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.split_file = split_file
        self.split_fractions = check_fractions(split_fractions)
        self.stratify = bool(stratify)
        self.split_patients: dict[str, list[str]] = {}
        self.patient_split_file: Path | None = None
        self._by_split: dict[str, Samples] | None = None

    def _all_samples(self) -> tuple[Samples, list[str]]:
        """Every sample and its patient id (same order)."""
        raise NotImplementedError

    def _resolve(self) -> dict[str, Samples]:
        samples, patients = self._all_samples()
        if len(samples) == 0:
            raise DataError("the manifest has no readable samples")
        file = Path(self.split_file).expanduser() if self.split_file else self._split_directory() / "patient_split.json"
        write = self.trainer.is_global_zero if self.trainer is not None else True
        splits = resolve_patient_split(file, patients, samples.labels, fractions=self.split_fractions,
                                       seed=self.seed, stratify=self.stratify, identity=self._identity(), write=write)
        check_no_leakage(splits, str(file))
        where = {p: s for s, ids in splits.items() for p in ids}
        present = set(patients)
        self.split_patients = {s: [p for p in splits[s] if p in present] for s in SPLITS}
        self.patient_split_file = file
        out = {}
        for s in SPLITS:
            positions = [i for i, p in enumerate(patients) if where[p] == s]
            out[s] = samples.subset(positions)
        if len(out["train"]) == 0 or len(out["val"]) == 0:
            raise DataError(f"{file}: the patient split leaves the train or val split empty; change it or "
                            f"data.init_args.split_fractions")
        return out

    def _raw_split(self, split: str) -> Samples | None:
        if self._by_split is None:
            self._by_split = self._resolve()
        samples = self._by_split[split]
        return samples if len(samples) or split == "train" else None


class PatientCSVData(PatientSplitData):
    """Image files (PNG, JPEG, TIFF...) listed in one CSV with a patient column, split by patient.

    Columns ``path`` (relative to ``root``, default the CSV's folder), ``label`` (a class name or
    index) and ``patient_id``; names configurable. Missing or unreadable images follow
    ``on_corrupt``. For DICOM use :class:`~vision_ft.data.medical.DicomManifestData`, for chest
    X-ray label files :class:`~vision_ft.data.medical.ChestXrayData`.

    Args:
        manifest: the CSV.
        root: folder the paths are relative to.
        path_column, label_column, patient_column: column names.
        **kwargs: :class:`PatientSplitData` options.
    """

    def __init__(self, manifest: str, root: str | None = None, path_column: str = "path",
                 label_column: str = "label", patient_column: str = "patient_id", **kwargs):
        super().__init__(**kwargs)
        self.manifest = Path(manifest).expanduser()
        self.root = Path(root).expanduser() if root is not None else self.manifest.parent
        if root is not None and not self.root.is_dir():
            raise DataError(f"data.init_args.root: folder {self.root} does not exist")
        rows = read_csv_rows(self.manifest, [path_column, label_column, patient_column], "manifest")
        names, labels = class_labels(rows, label_column, self._given_names, self.manifest)
        self._samples = FileSamples(self.root, [r[path_column] for r in rows], labels)
        self._patients = [r[patient_column] for r in rows]
        self._set_classes(len(names), names)

    def _all_samples(self) -> tuple[FileSamples, list[str]]:
        return self._samples, list(self._patients)

    def _identity(self) -> dict:
        return {"name": self.manifest.stem, "type": type(self).__name__, "source": str(self.manifest.resolve())}
