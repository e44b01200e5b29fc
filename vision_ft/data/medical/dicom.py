"""DICOM files and series as the kit's images (pydicom).

- A *source* is one DICOM file (single- or multi-frame) or one *series folder* (one file
  per slice). :func:`open_source` reads headers only; pixels are decoded when a frame is read.
- Pixels are decoded through the file's own transfer syntax by pydicom. A compressed syntax
  whose decoder plugin is missing is a :class:`~vision_ft.errors.DataError` that names the
  packages to install (pydicom's own list for that syntax).
- The Modality LUT (Rescale Slope / Intercept, or a Modality LUT Sequence) is applied by
  :func:`pydicom.pixels.apply_modality_lut`, giving Hounsfield units for CT; multi-frame
  files that carry the rescale only in their (shared or per-frame) functional groups get it
  from there.
- The VOI step maps to ``[0, 1]``: the file's VOI LUT table (pydicom's ``apply_voi_lut``) or
  its Window Centre / Width (LINEAR, LINEAR_EXACT or SIGMOID as the file says), or a window
  from config (:mod:`~vision_ft.data.medical.windowing`).
- ``MONOCHROME1`` (bright = low value, common in CR/DX) is inverted after the VOI step, so
  bone is bright in every returned image.
- Metadata: keywords chosen by config are copied into a record per sample. Person names
  (every attribute of VR ``PN``) and private tags are refused, and no DICOM value is ever put
  in a log line or an error message: messages name files and tag keywords only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import ConfigError, DataError
from .windowing import linear_window, minmax_scale, percentile_scale

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: spacing between slices may differ from the median by this fraction before a series is refused
SPACING_TOLERANCE = 0.01


def _pydicom():
    try:
        import pydicom
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("reading DICOM needs pydicom: pip install 'vision_ft[medical]'") from e
    return pydicom


def check_metadata_fields(fields: Sequence[str], key: str = "data.init_args.metadata") -> list[str]:
    """Keywords that may be copied into sample records: known, public, and not a person's name."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    out = []
    for name in fields:
        tag = tag_for_keyword(str(name))
        if tag is None:
            raise ConfigError(f"{key}: {name!r} is not a DICOM keyword (e.g. PatientID, StudyInstanceUID, "
                              f"Modality); private tags are never copied")
        if (tag >> 16) % 2 == 1:
            raise ConfigError(f"{key}: {name!r} is a private tag; private tags are never copied")
        if dictionary_VR(tag) == "PN":
            raise ConfigError(f"{key}: {name!r} is a person name (VR PN); names are never copied into records, "
                              f"logs or run files. Use PatientID to group by patient.")
        out.append(str(name))
    return out


def read_header(path: Path):
    """The file's dataset without pixel data; not DICOM → :class:`DataError` naming the file."""
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except FileNotFoundError as e:
        raise DataError(f"{path}: file does not exist") from e
    except Exception as e:
        raise DataError(f"{path}: not a readable DICOM file ({type(e).__name__})") from e


def _check_decoder(ds, path: Path) -> None:
    from pydicom.pixels import get_decoder

    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None:
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as e:
        raise DataError(f"{path}: pixel data in transfer syntax {uid.name} ({uid}), which pydicom cannot decode") from e
    if not decoder.is_available:
        options = "; ".join(decoder.missing_dependencies) or "a pixel data plugin"
        raise DataError(f"{path}: pixel data is compressed with {uid.name} ({uid}) and no decoder for it is "
                        f"installed. Install one of: {options} (e.g. pip install pylibjpeg pylibjpeg-libjpeg "
                        f"pylibjpeg-openjpeg), or convert the files to an uncompressed transfer syntax.")


def _rescale_items(ds, n_frames: int) -> list | None:
    """Per-frame datasets holding Rescale Slope/Intercept from functional groups, when the top level has none."""
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        return None
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    if shared and "PixelValueTransformationSequence" in shared[0]:
        return [shared[0].PixelValueTransformationSequence[0]] * n_frames
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if per_frame and all("PixelValueTransformationSequence" in f for f in per_frame):
        return [f.PixelValueTransformationSequence[0] for f in per_frame][:n_frames]
    return None


def decode_modality(path: Path) -> tuple[np.ndarray, object]:
    """All frames of one file in modality units (HU for CT): ``(F, H, W)`` float64, or ``(F, H, W, 3)``
    uint8 for colour images; and the dataset (with its pixel data)."""
    pydicom = _pydicom()
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: file does not exist") from e
    except Exception as e:
        raise DataError(f"{path}: not a readable DICOM file ({type(e).__name__})") from e
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise DataError(f"{path}: the DICOM file has no pixel data (a report, a presentation state or a "
                        f"header-only export?); remove it from the manifest/series")
    _check_decoder(ds, path)
    try:
        arr = ds.pixel_array
    except Exception as e:
        raise DataError(f"{path}: pixel data cannot be decoded ({type(e).__name__}: {str(e)[:120]})") from e
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    colour = int(getattr(ds, "SamplesPerPixel", 1)) > 1
    if n_frames == 1:
        arr = arr[None]
    if colour:
        return np.asarray(arr), ds
    items = _rescale_items(ds, n_frames)
    try:
        if items is None:
            out = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        else:
            out = np.stack([np.asarray(apply_modality_lut(a, item), dtype=np.float64) for a, item in zip(arr, items)])
    except Exception as e:  # noqa: BLE001 - malformed rescale / modality LUT attributes
        raise DataError(f"{path}: the Modality LUT (rescale slope/intercept) cannot be applied "
                        f"({type(e).__name__})") from e
    bad = int(np.count_nonzero(~np.isfinite(out)))
    if bad:
        raise DataError(f"{path}: {bad} pixel value(s) are NaN or infinite after the Modality LUT")
    return out, ds


def _first(value) -> float:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def file_voi(frame: np.ndarray, ds) -> np.ndarray:
    """The file's own VOI: its VOI LUT table, else its window (LINEAR / LINEAR_EXACT / SIGMOID), else min-max."""
    from pydicom.pixels import apply_voi_lut

    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return np.clip(np.asarray(apply_voi_lut(frame, ds, prefer_lut=True), np.float64) / (2 ** bits - 1),
                       0, 1).astype(np.float32)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        centre, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        if not (np.isfinite(centre) and np.isfinite(width) and width > 0):
            raise DataError(f"the file's Window Center/Width ({centre}, {width}) is not a usable window; set "
                            f"data.init_args.window to a preset or [centre, width]")
        function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
        if function == "SIGMOID":
            return (1.0 / (1.0 + np.exp(-4.0 * (frame - centre) / width))).astype(np.float32)
        if function == "LINEAR_EXACT":
            return np.clip((frame - centre) / width + 0.5, 0, 1).astype(np.float32)
        return linear_window(frame, centre, width)
    return minmax_scale(frame)


def to_display(frame: np.ndarray, ds, window, percentiles: Sequence[float] = (0.5, 99.5)) -> np.ndarray:
    """One frame in modality units → ``H×W`` float32 in ``[0, 1]`` (``H×W×3`` uint8 for colour), MONOCHROME1 inverted."""
    if frame.ndim == 3:  # colour (RGB / YBR converted to RGB by pydicom): no VOI
        return frame.astype(np.uint8) if frame.dtype != np.uint8 else frame
    if window == "file":
        out = file_voi(frame, ds)
    elif isinstance(window, tuple):
        out = linear_window(frame, *window)
    elif window == "percentile":
        out = percentile_scale(frame, percentiles)
    else:
        out = minmax_scale(frame)
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def read_record(ds, fields: Sequence[str]) -> dict[str, str]:
    """``{keyword: value as text}`` for the chosen (already checked) keywords; absent ones are empty."""
    return {k: (str(ds.data_element(k).value) if k in ds else "") for k in fields}


@dataclass
class DicomSource:
    """One DICOM file (``files`` has one path; ``frames`` its frame count) or a series folder
    (``files`` sorted along the slice normal, one frame each)."""

    path: Path
    files: list[Path]
    n_frames: int
    header: object = field(repr=False)
    series: bool = False

    def frame_location(self, k: int) -> tuple[Path, int]:
        return (self.files[k], 0) if self.series else (self.files[0], k)


def _series_order(headers: list, files: list[Path], folder: Path) -> list[int]:
    """Slice order along the normal of the image plane; checks one modality, one series, even spacing."""
    modalities = sorted({str(getattr(h, "Modality", "")) for h in headers})
    if len(modalities) > 1:
        raise DataError(f"{folder}: a series folder mixes modalities {modalities}; put each series in its own folder")
    series = {str(getattr(h, "SeriesInstanceUID", "")) for h in headers}
    if len(series) > 1:
        raise DataError(f"{folder}: the folder holds {len(series)} different series (SeriesInstanceUID); one "
                        f"series per folder")
    if not all("ImagePositionPatient" in h and "ImageOrientationPatient" in h for h in headers):
        if all("InstanceNumber" in h for h in headers):
            return sorted(range(len(headers)), key=lambda i: int(headers[i].InstanceNumber))
        raise DataError(f"{folder}: slices lack ImagePositionPatient/ImageOrientationPatient and InstanceNumber; "
                        f"their order cannot be known")
    orient = np.array([float(v) for v in headers[0].ImageOrientationPatient]).reshape(2, 3)
    normal = np.cross(orient[0], orient[1])
    where = np.array([float(np.dot(normal, [float(v) for v in h.ImagePositionPatient])) for h in headers])
    order = np.argsort(where, kind="stable")
    if len(order) > 2:
        gaps = np.diff(where[order])
        median = float(np.median(gaps))
        if median <= 0 or np.any(np.abs(gaps - median) > SPACING_TOLERANCE * median + 1e-3):
            shown = ", ".join(f"{g:.3g}" for g in gaps[:12])
            raise DataError(f"{folder}: inconsistent slice spacing along the slice normal (mm: {shown}); missing "
                            f"or duplicated slices? Fix the series or remove it from the data.")
    return order.tolist()


def open_source(path: Path) -> DicomSource:
    """A DICOM file or a series folder, from headers only (pixels are read per frame later)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.name.upper() != "DICOMDIR")
        if not files:
            raise DataError(f"{path}: the series folder has no files")
        headers = [read_header(p) for p in files]
        order = _series_order(headers, files, path)
        files, headers = [files[i] for i in order], [headers[i] for i in order]
        for f, h in zip(files, headers):
            if int(getattr(h, "NumberOfFrames", 1) or 1) != 1:
                raise DataError(f"{f}: a multi-frame file inside a series folder {path}; list it on its own")
        return DicomSource(path, files, len(files), headers[0], series=True)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    header = read_header(path)
    return DicomSource(path, [path], int(getattr(header, "NumberOfFrames", 1) or 1), header)


def pick_frames(n: int, frames: str | int) -> list[int]:
    """``"all"`` → every frame; ``"middle"`` → the middle one; an int → that frame (negative from the end)."""
    if frames == "all":
        return list(range(n))
    if frames == "middle":
        return [n // 2]
    k = int(frames)
    if not -n <= k < n:
        raise DataError(f"frame {k} requested (data.init_args.frames) but the source has {n} frame(s)")
    return [k % n]


def read_frame(source: DicomSource, k: int, window, percentiles: Sequence[float] = (0.5, 99.5)) -> np.ndarray:
    """Frame ``k`` of a source, displayed: ``H×W`` float32 in ``[0, 1]`` (``H×W×3`` uint8 for colour)."""
    file, index = source.frame_location(k)
    frames, ds = decode_modality(file)
    if index >= len(frames):
        raise DataError(f"{file}: frame {index} requested but the pixel data holds {len(frames)} frame(s)")
    if source.series and frames.shape[1:3] != (int(source.header.Rows), int(source.header.Columns)):
        raise DataError(f"{file}: slice size {frames.shape[1:3]} differs from the rest of series {source.path}")
    try:
        return to_display(frames[index], ds, window, percentiles)
    except DataError as e:
        raise DataError(f"{file}: {e}") from e


class DicomReader:
    """A DICOM file (or series folder) -> the displayed frame a :class:`~vision_ft.data.medical.DicomManifestData`
    run trained on: same window, percentiles and frame choice (``middle`` or an index; ``all`` reads the
    middle frame). Recorded with the run, so ``predict --images *.dcm`` and ``load_adapter(run).predict_images``
    feed the model what training did."""

    def __init__(self, window: str | list[float] = "file", percentiles: Sequence[float] = (0.5, 99.5),
                 frame: str | int = "middle") -> None:
        from .windowing import resolve_window

        self.window = resolve_window(window if isinstance(window, str) else list(window))
        self.percentiles = tuple(percentiles)
        self.frame = "middle" if frame == "all" else frame

    def __call__(self, path: Path) -> np.ndarray:
        source = open_source(Path(path))
        image = read_frame(source, pick_frames(source.n_frames, self.frame)[0], self.window, self.percentiles)
        return image[..., None] if image.ndim == 2 else image
