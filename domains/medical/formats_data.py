"""Medical pack datamodules for DICOM and NIfTI data, each with an embedded SYNTHETIC default.

With the manifest unset, the pack writes its synthetic sample (real DICOM files / real NIfTI
volumes, see :mod:`domains.medical.dicom_sample` and :mod:`domains.medical.nifti_sample`) on first
use and says so in the log. A given manifest must exist: nothing is generated at a user path.
The patient split of the sample is written beside it and reused.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vision_ft.data.medical import DicomManifestData, NiftiSliceData

from .dicom_sample import CLASS_NAMES as DICOM_CLASSES
from .dicom_sample import write_dicom_sample
from .nifti_sample import CLASS_NAMES as NIFTI_CLASSES
from .nifti_sample import write_nifti_sample

log = logging.getLogger("vision_ft")

DICOM_SAMPLE = "synthetic_ct_dicom_v1"
NIFTI_SAMPLE = "synthetic_ct_nifti_v1"


def _sample(kwargs: dict, sample_dir: str, name: str, write, classes: list[str], card: str,
            manifest: str = "manifest.csv") -> str:
    root = write(Path(sample_dir) / name)
    log.warning("data: using the embedded SYNTHETIC sample %s (generated images written in the real file format, "
                "not medical data); set data.init_args.manifest to your own (see %s)", root, card)
    if kwargs.get("class_names") is None:
        kwargs["class_names"] = list(classes)
    if kwargs.get("split_file") is None:
        kwargs["split_file"] = str(root / "patient_split.json")
    return str(root / manifest)


class MedicalDicomData(DicomManifestData):
    """:class:`~vision_ft.data.medical.DicomManifestData` with an offline default.

    Args:
        manifest: CSV of DICOM files / series folders (see datasets_cards/dicom_pacs_export.md);
            ``None`` uses the embedded synthetic CT sample.
        sample_dir: where the synthetic sample is written (once; reused if present).
        **kwargs: :class:`~vision_ft.data.medical.DicomManifestData` options.
    """

    def __init__(self, manifest: str | None = None, sample_dir: str = "data/medical_dicom_sample", **kwargs):
        self.synthetic = manifest is None
        if manifest is None:
            manifest = _sample(kwargs, sample_dir, DICOM_SAMPLE, write_dicom_sample, DICOM_CLASSES,
                               "datasets_cards/dicom_pacs_export.md")
        super().__init__(manifest=manifest, **kwargs)


class MedicalNiftiData(NiftiSliceData):
    """:class:`~vision_ft.data.medical.NiftiSliceData` with an offline default.

    Args:
        manifest: a Decathlon ``dataset.json`` or a CSV (see datasets_cards/nifti_decathlon.md);
            ``None`` uses the embedded synthetic CT volumes (Decathlon layout).
        sample_dir: where the synthetic sample is written (once; reused if present).
        **kwargs: :class:`~vision_ft.data.medical.NiftiSliceData` options.
    """

    def __init__(self, manifest: str | None = None, sample_dir: str = "data/medical_nifti_sample", **kwargs):
        self.synthetic = manifest is None
        if manifest is None:
            manifest = _sample(kwargs, sample_dir, NIFTI_SAMPLE, write_nifti_sample, NIFTI_CLASSES,
                               "datasets_cards/nifti_decathlon.md", manifest="dataset.json")
        super().__init__(manifest=manifest, **kwargs)
