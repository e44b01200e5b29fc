"""Medical imaging pack: MedMNIST classification, COCO-format detection, DICOM and NIfTI
classification, each with an embedded SYNTHETIC offline sample.

Names are imported lazily so ``python -m domains.medical.sample`` needs only numpy.
"""

from __future__ import annotations

import importlib
from pathlib import Path

#: the pack's runnable config (``python -m vision_ft fit --config <CONFIG>``)
CONFIG = Path(__file__).resolve().parent.parent / "medical.yaml"
#: the detection config (D-FINE on COCO-format polyp / instrument boxes)
DETECTION_CONFIG = Path(__file__).resolve().parent.parent / "medical_detection.yaml"
#: DICOM classification (CT series split by patient) and slice classification from NIfTI volumes
DICOM_CONFIG = Path(__file__).resolve().parent.parent / "medical_dicom.yaml"
NIFTI_CONFIG = Path(__file__).resolve().parent.parent / "medical_nifti.yaml"

_EXPORTS = {"MedicalSampleData": ".data", "CLASS_NAMES": ".sample", "write_sample": ".sample",
            "MedicalDetectionData": ".detection_data", "kvasir_to_coco": ".detection_data",
            "write_detection_sample": ".detection_sample",
            "MedicalDicomData": ".formats_data", "write_dicom_sample": ".dicom_sample",
            "MedicalNiftiData": ".formats_data", "write_nifti_sample": ".nifti_sample"}
__all__ = sorted([*_EXPORTS, "CONFIG", "DETECTION_CONFIG", "DICOM_CONFIG", "NIFTI_CONFIG"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
