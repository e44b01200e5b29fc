"""Deterministic generator of a small SYNTHETIC CT dataset written as real DICOM files (pydicom).

This is not medical data: no patient, no scanner. It exists so ``domains/medical_dicom.yaml``
runs offline, end to end, through the same DICOM reader a PACS export goes through.

Layout (``ROOT/``)::

    manifest.csv                        path,label,patient_id  (one row per slice file)
    SYN0000/CT1/IM0000.dcm ...           one series folder per patient, one file per slice

Each patient has one axial CT series of ``n_slices`` slices, 5 mm apart, 64×64 pixels of 5.5 mm.
Stored values are unsigned 12-bit with Rescale Intercept −1024 (so stored 0 = −1024 HU), as
many scanners write them. A synthetic chest: air −1000 HU, subcutaneous fat about −100 HU, soft
tissue about 40 HU, two lungs about −850 HU, a vertebra about 700 HU, Gaussian noise. Two
quarters of the patients have a round soft-tissue nodule (about 30 HU, radius 4–6 pixels at its
centre) in one lung across 5 neighbouring slices; a slice is ``nodule`` when it cuts the nodule, else ``normal``.

Tags are realistic (SOP class CT Image Storage, UIDs, patient/study/series, geometry, window
centre/width 40/400), the descriptions say SYNTHETIC, and every file carries a made-up
``PatientName`` and a private tag, so tests can show neither reaches logs or run files.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
from pathlib import Path

import numpy as np

from vision_ft.io import atomic_write_bytes, atomic_write_text

CLASS_NAMES = ["normal", "nodule"]
SIZE, PIXEL_MM, SLICE_MM = 64, 5.5, 5.0
PRIVATE_CREATOR = "VISIONFT SYNTHETIC"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _uid(*parts: int) -> str:
    """A stable UID under a made-up root (2.25 = UUID-derived arc, here fixed digits)."""
    return "2.25.1234567890." + ".".join(str(int(p)) for p in parts)


def write_dicom(path: str | Path, stored: np.ndarray, *, modality: str = "CT", photometric: str = "MONOCHROME2",
                slope: float | None = 1.0, intercept: float | None = -1024.0, window: tuple[float, float] | None = None,
                signed: bool = False, bits_stored: int = 12, position: tuple[float, float, float] = (0.0, 0.0, 0.0),
                patient_id: str = "SYN0000", patient_name: str = "Synthetic^Patient", study: int = 0, series: int = 0,
                instance: int = 1, pixel_data: bool = True, private_value: str | None = None,
                transfer_syntax: str | None = None, extra: dict | None = None) -> Path:
    """Write one DICOM file with stored values ``stored`` (``(H, W)`` or ``(F, H, W)`` multi-frame).

    ``transfer_syntax`` other than the uncompressed default only labels the file (the bytes stay
    raw): for tests of the decoder check. Returns ``path``; the write is atomic.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    stored = np.asarray(stored)
    frames = stored.shape[0] if stored.ndim == 3 else 1
    rows, cols = stored.shape[-2:]
    sop_uid = _uid(study, series, instance)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = UID(transfer_syntax) if transfer_syntax else ExplicitVRLittleEndian
    meta.ImplementationClassUID = _uid(9, 9, 9)
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
    ds.Modality, ds.Manufacturer = modality, "SYNTHETIC (vision_ft sample generator)"
    ds.StudyDescription = "SYNTHETIC SAMPLE - NOT MEDICAL DATA"
    ds.SeriesDescription = f"SYNTHETIC {modality}"
    ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientAge = patient_name, patient_id, "O", "050Y"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(study), _uid(study, series)
    ds.StudyDate = ds.SeriesDate = "20000101"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = str(study), series + 1, instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [PIXEL_MM, PIXEL_MM], SLICE_MM
    if modality == "CT":
        ds.KVP = 120
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU" if modality == "CT" else "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if private_value is not None:
        block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
        block.add_new(0x01, "LO", private_value)
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    if pixel_data:
        raw = stored.astype(np.int16 if signed else np.uint16)
        if meta.TransferSyntaxUID.is_compressed:  # a label only: the raw bytes are wrapped, not compressed
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([f.tobytes() for f in raw.reshape(frames, rows, cols)])
        else:
            ds.PixelData = raw.tobytes()
    ds.ContentDate = datetime.date(2000, 1, 1).strftime("%Y%m%d")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return atomic_write_bytes(path, buf.getvalue())


def chest_slice_hu(rng: np.random.Generator, nodule: tuple[float, float, float] | None) -> np.ndarray:
    """One synthetic axial chest slice in HU; ``nodule`` = (row, col, radius) in pixels, or None."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    c = SIZE / 2
    hu = np.full((SIZE, SIZE), -1000.0)
    body = ((xx - c) / 28) ** 2 + ((yy - c) / 21) ** 2 <= 1
    inner = ((xx - c) / 26) ** 2 + ((yy - c) / 19) ** 2 <= 1
    hu[body] = -100.0 + rng.normal(0, 10)
    hu[inner] = 40.0 + rng.normal(0, 5)
    for side in (-1, 1):
        lung = ((xx - c - side * 11) / 8.5) ** 2 + ((yy - c + 1) / 13) ** 2 <= 1
        hu[lung] = -850.0 + rng.normal(0, 15)
    hu[np.hypot(xx - c, yy - c - 14) <= 3.5] = 700.0
    if nodule is not None:
        r0, c0, rad = nodule
        hu[np.hypot(yy - r0, xx - c0) <= rad] = 30.0
    return hu + rng.normal(0, 20, hu.shape)


def write_dicom_sample(root: str | Path, n_patients: int = 30, n_slices: int = 8, seed: int = 0) -> Path:
    """Write the synthetic CT sample under ``root`` (skipped if its manifest exists) and return ``root``."""
    root = Path(root)
    manifest = root / "manifest.csv"
    if manifest.is_file():
        return root
    rows = []
    for p in range(n_patients):
        rng = np.random.default_rng([seed, p])
        pid = f"SYN{p:04d}"
        nodule = None
        if p % 4 != 0:
            side = rng.choice([-1, 1])
            lo = min(2, (n_slices - 1) // 2)
            centre = int(rng.integers(lo, max(lo + 1, n_slices - 2)))
            nodule = (centre, SIZE / 2 - 1 + rng.uniform(-5, 5), SIZE / 2 + side * 11 + rng.uniform(-2, 2),
                      rng.uniform(4.0, 6.0))
        for s in range(n_slices):
            on = nodule is not None and abs(s - nodule[0]) <= 2
            hu = chest_slice_hu(rng, (nodule[1], nodule[2], nodule[3] * (1.0 - 0.15 * abs(s - nodule[0]))) if on else None)
            stored = np.clip(np.round(hu + 1024.0), 0, 4095)
            rel = f"{pid}/CT1/IM{s:04d}.dcm"
            write_dicom(root / rel, stored, window=(40.0, 400.0), position=(-SIZE * PIXEL_MM / 2, -SIZE * PIXEL_MM / 2,
                        -s * SLICE_MM), patient_id=pid, patient_name=f"Synthetic^Patient{p:04d}", study=p, series=1,
                        instance=s + 1, private_value=f"SYNTHETIC-PRIVATE-{pid}")
            rows.append((rel, CLASS_NAMES[int(on)], pid))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "label", "patient_id"])
    writer.writerows(rows)
    atomic_write_text(manifest, text.getvalue())
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the SYNTHETIC CT sample as DICOM series + manifest.csv.")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--n-patients", type=int, default=30)
    parser.add_argument("--n-slices", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    out = write_dicom_sample(a.out, a.n_patients, a.n_slices, a.seed)
    print(f"wrote {out}: synthetic DICOM, not medical data; classes {CLASS_NAMES}")


if __name__ == "__main__":
    main()
