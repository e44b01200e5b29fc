"""Chest X-ray multi-label data in the CheXpert and NIH ChestX-ray14 CSV conventions.

- **CheXpert** (Irvin et al., AAAI 2019, arXiv:1901.07031): ``train.csv`` / ``valid.csv`` with
  ``Path``, ``Frontal/Lateral`` and one column per finding holding ``1.0`` (positive), ``0.0``
  (negative), ``-1.0`` (uncertain) or blank (not mentioned). The patient is the
  ``patientNNNNN`` part of the path. Uncertain labels are mapped by a policy, as in the paper's
  U-Ones / U-Zeros / U-Ignore: ``ones`` → 1, ``zeros`` → 0, ``ignore`` → unknown (NaN: left out
  of the loss and of every metric). The policy may differ per finding (the paper's best model
  used U-Ones for Atelectasis and Edema, U-Zeros for Cardiomegaly, Consolidation and Pleural
  Effusion). Blanks are negatives by default (``blank: zeros``) or unknown (``blank: ignore``).
- **NIH ChestX-ray14** (Wang et al., CVPR 2017, arXiv:1705.02315): ``Data_Entry_2017.csv`` with
  ``Image Index``, ``Finding Labels`` (``|``-separated findings or ``No Finding``), ``Patient ID``
  and ``View Position`` (``PA`` / ``AP``: all frontal). No uncertain labels.

Both have 14 findings (:data:`CHEXPERT_FINDINGS`, :data:`NIH_FINDINGS`). The view filter keeps
``frontal``, ``lateral`` or ``all`` images. Splits are by patient.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from ...errors import ConfigError, DataError
from ..labelled_images import FileSamples
from .patient_data import PatientSplitData, read_csv_rows

log = logging.getLogger("vision_ft")

CHEXPERT_FINDINGS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                     "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                     "Pleural Other", "Fracture", "Support Devices"]
NIH_FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
POLICIES = ("ones", "zeros", "ignore")
_PATIENT = re.compile(r"(patient\d+)")


def map_uncertain(values: np.ndarray, policy: str, blank: str = "zeros") -> np.ndarray:
    """CheXpert codes (1, 0, -1, NaN = blank) → float32 targets 1 / 0 / NaN (unknown) by ``policy`` and ``blank``."""
    if policy not in POLICIES or blank not in ("zeros", "ignore"):
        raise ConfigError(f"uncertain policy must be one of {POLICIES} and blank 'zeros' or 'ignore', got "
                          f"{policy!r} / {blank!r}")
    v = np.asarray(values, dtype=np.float64)
    out = np.where(np.isnan(v), 0.0 if blank == "zeros" else np.nan, v)
    uncertain = out == -1
    out[uncertain] = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}[policy]
    return out.astype(np.float32)


def _code(value: str, file: Path, line: int, column: str) -> float:
    if value == "":
        return np.nan
    try:
        code = float(value)
    except ValueError:
        code = None
    if code not in (1.0, 0.0, -1.0):
        raise DataError(f"{file} line {line}: {column!r} is {value!r}; CheXpert labels are 1, 0, -1 or blank")
    return code


class ChestXrayData(PatientSplitData):
    """Chest X-ray images with 14 findings (CheXpert or NIH ChestX-ray14 CSV), multi-label, split by patient.

    Args:
        csv: ``train.csv`` (CheXpert) or ``Data_Entry_2017.csv`` (NIH).
        root: folder the image paths are relative to (default: the CSV's folder). CheXpert paths
            start with the dataset folder (``CheXpert-v1.0-small/train/...``): set ``root`` to its parent.
        convention: ``chexpert`` or ``nih``.
        uncertain: policy for CheXpert ``-1`` labels: ``ones``, ``zeros`` or ``ignore``, or a mapping
            ``{finding: policy}`` (findings not named use ``ignore``).
        blank: CheXpert blanks (not mentioned): ``zeros`` (the usual reading) or ``ignore``.
        views: ``frontal``, ``lateral`` or ``all``.
        findings: the findings to predict (default all 14, in the convention's order).
        **kwargs: :class:`~vision_ft.data.medical.PatientSplitData` options (``class_names`` is set
            from ``findings``).
    """

    def __init__(self, csv: str, root: str | None = None, convention: Literal["chexpert", "nih"] = "chexpert",
                 uncertain: str | Mapping[str, str] = "ignore", blank: Literal["zeros", "ignore"] = "zeros",
                 views: Literal["frontal", "lateral", "all"] = "frontal", findings: Sequence[str] | None = None,
                 **kwargs):
        if convention not in ("chexpert", "nih"):
            raise ConfigError(f"data.init_args.convention must be 'chexpert' or 'nih', got {convention!r}")
        if views not in ("frontal", "lateral", "all"):
            raise ConfigError(f"data.init_args.views must be 'frontal', 'lateral' or 'all', got {views!r}")
        known = CHEXPERT_FINDINGS if convention == "chexpert" else NIH_FINDINGS
        self.findings = list(findings) if findings is not None else list(known)
        unknown = [f for f in self.findings if f not in known]
        if unknown:
            raise ConfigError(f"data.init_args.findings: {unknown} are not {convention} findings; known: {known}")
        kwargs["class_names"] = self.findings
        super().__init__(**kwargs)
        self.csv = Path(csv).expanduser()
        self.root = Path(root).expanduser() if root is not None else self.csv.parent
        self.convention, self.views = convention, views
        self.policies = self._policies(uncertain, blank)
        self.blank = blank
        if convention == "chexpert":
            self._paths, self._labels, self._patients = self._read_chexpert()
        else:
            self._paths, self._labels, self._patients = self._read_nih()
        if not self._paths:
            raise DataError(f"{self.csv}: no {views} images in the file (data.init_args.views)")
        self._set_classes(len(self.findings), self.findings, multilabel=True)

    def _policies(self, uncertain, blank: str) -> dict[str, str]:
        if blank not in ("zeros", "ignore"):
            raise ConfigError(f"data.init_args.blank must be 'zeros' or 'ignore', got {blank!r}")
        if isinstance(uncertain, str):
            chosen = {f: uncertain for f in self.findings}
        else:
            extra = [f for f in uncertain if f not in self.findings]
            if extra:
                raise ConfigError(f"data.init_args.uncertain names {extra}, which are not among the findings")
            chosen = {f: uncertain.get(f, "ignore") for f in self.findings}
        bad = sorted({p for p in chosen.values() if p not in POLICIES})
        if bad:
            raise ConfigError(f"data.init_args.uncertain: unknown policy {bad}; use one of {POLICIES}")
        return chosen

    def _read_chexpert(self):
        rows = read_csv_rows(self.csv, ["Path", "Frontal/Lateral", *self.findings], "csv",
                             nonempty=["Path", "Frontal/Lateral"])
        paths, labels, patients = [], [], []
        for r in rows:
            view = r["Frontal/Lateral"].lower()
            if self.views != "all" and view != self.views:
                continue
            match = _PATIENT.search(r["Path"])
            if match is None:
                raise DataError(f"{self.csv} line {r['_line']}: no patientNNNNN in the path {r['Path']!r}")
            codes = [_code(r[f], self.csv, r["_line"], f) for f in self.findings]
            labels.append([map_uncertain(np.array([c]), self.policies[f], self.blank)[0]
                           for c, f in zip(codes, self.findings)])
            paths.append(r["Path"])
            patients.append(match.group(1))
        return paths, np.asarray(labels, dtype=np.float32).reshape(-1, len(self.findings)), patients

    def _read_nih(self):
        rows = read_csv_rows(self.csv, ["Image Index", "Finding Labels", "Patient ID"], "csv")
        paths, labels, patients = [], [], []
        allowed = set(NIH_FINDINGS) | {"No Finding"}
        for r in rows:
            view = r.get("View Position", "PA").upper()
            frontal = view in ("PA", "AP", "")
            if self.views == "lateral" and frontal or self.views == "frontal" and not frontal:
                continue
            found = [f.strip() for f in r["Finding Labels"].split("|") if f.strip()]
            odd = [f for f in found if f not in allowed]
            if odd:
                raise DataError(f"{self.csv} line {r['_line']}: unknown finding(s) {odd}; known: {sorted(allowed)}")
            labels.append([float(f in found) for f in self.findings])
            paths.append(r["Image Index"])
            patients.append(r["Patient ID"])
        return paths, np.asarray(labels, dtype=np.float32).reshape(-1, len(self.findings)), patients

    def _all_samples(self) -> tuple[FileSamples, list[str]]:
        return FileSamples(self.root, self._paths, self._labels), list(self._patients)

    def _identity(self) -> dict:
        return {"name": self.csv.stem, "type": f"ChestXrayData[{self.convention}]", "source": str(self.csv.resolve())}
