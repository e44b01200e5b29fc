"""Medical formats: DICOM files and series, NIfTI volumes, patient-level splits, chest X-ray label conventions.

Needs the ``medical`` extra (``pip install 'vision_ft[medical]'``: pydicom, nibabel); the
modules import them only when a file is read.
"""

from .chest_xray import CHEXPERT_FINDINGS, NIH_FINDINGS, ChestXrayData, map_uncertain
from .dicom_data import DicomManifestData, DicomSamples
from .nifti_data import NiftiSliceData, NiftiSlices
from .patient_data import PatientCSVData, PatientSplitData
from .patients import (
    check_no_leakage,
    draw_patient_split,
    read_split_file,
    resolve_patient_split,
)
from .windowing import WINDOW_PRESETS, apply_window, linear_window, resolve_window

__all__ = [
    "CHEXPERT_FINDINGS",
    "NIH_FINDINGS",
    "WINDOW_PRESETS",
    "ChestXrayData",
    "DicomManifestData",
    "DicomSamples",
    "NiftiSliceData",
    "NiftiSlices",
    "PatientCSVData",
    "PatientSplitData",
    "apply_window",
    "check_no_leakage",
    "draw_patient_split",
    "linear_window",
    "map_uncertain",
    "read_split_file",
    "resolve_patient_split",
    "resolve_window",
]
