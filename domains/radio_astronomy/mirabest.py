"""The MiraBest on-disk format: CIFAR-style pickled batches of 150x150 FIRST cutouts.

Facts (MiraBest batched dataset, Porter & Scaife, RAS Techniques and Instruments 2023,
"MiraBest: a dataset of morphologically classified radio galaxies for machine
learning", labels from Miraghaei & Best 2017; the layout as written by the dataset's
builder script and read by its public PyTorch dataset classes):

- a folder (``batches/`` in the released tarball) holding ``data_batch_1`` ...
  ``data_batch_7`` (training), ``test_batch`` and ``batches.meta``;
- each batch file is a Python pickle of a dict with keys ``batch_label`` (str),
  ``labels`` (list of int codes 0-9), ``data`` (one 150x150 ``uint8`` array per image,
  single channel; a ``(N, 22500)`` array is accepted too) and ``filenames``;
- ``batches.meta`` is a pickled dict with ``label_names`` (the ten three-digit codes
  below), ``num_cases_per_batch`` and ``num_vis`` (22500 = 150 x 150 x 1).

The three-digit code reads: first digit FRI (1) / FRII (2) / hybrid (3); second digit
confidently (0) / uncertainly (1) classified; third digit standard morphology (0),
double-double (1), wide-angle tail (2), head-tail (4). The dataset classes map the ten
label indices into two-class problems by *conventions* (:data:`CONVENTIONS`):
``MBFRConfident`` keeps FRI {0,1,2} vs FRII {5,6}; ``MBFRUncertain`` FRI {3,4} vs
FRII {7}; ``MBFRFull`` FRI {0..4} vs FRII {5,6,7}; ``MBHybrid`` confident {8} vs
uncertain {9} hybrids.

**Why a restricted unpickler.** ``pickle.load`` runs whatever callables a file names,
so opening a tampered batch file would execute arbitrary code. :func:`load_pickle`
resolves only the few globals numpy needs to rebuild arrays and scalars (plus
``_codecs.encode`` for old-protocol byte strings) and raises
:class:`~vision_ft.errors.DataError` for anything else, before calling it. Writing
batches (:func:`write_batch`) uses the standard pickler: the files must be readable
by the dataset's own loaders.

This module needs numpy only (the sample generator imports it).
"""

from __future__ import annotations

import importlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

try:  # numpy is the only dependency of this module; DataError when the kit is there
    from vision_ft.errors import DataError
except ImportError:  # pragma: no cover - the pack is always installed with the kit
    class DataError(ValueError):  # type: ignore[no-redef]
        """Data on disk is missing, malformed or unsafe."""

IMAGE_SIZE = 150
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 8))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"


@dataclass(frozen=True)
class LabelCode:
    """One of MiraBest's ten label indices."""

    index: int
    code: str  # the three-digit code, as in batches.meta["label_names"]
    family: str  # FRI, FRII or hybrid
    confident: bool
    morphology: str


LABEL_CODES: tuple[LabelCode, ...] = (
    LabelCode(0, "100", "FRI", True, "standard"),
    LabelCode(1, "102", "FRI", True, "wide-angle tail"),
    LabelCode(2, "104", "FRI", True, "head-tail"),
    LabelCode(3, "110", "FRI", False, "standard"),
    LabelCode(4, "112", "FRI", False, "wide-angle tail"),
    LabelCode(5, "200", "FRII", True, "standard"),
    LabelCode(6, "201", "FRII", True, "double-double"),
    LabelCode(7, "210", "FRII", False, "standard"),
    LabelCode(8, "300", "hybrid", True, "standard"),
    LabelCode(9, "310", "hybrid", False, "standard"),
)
LABEL_NAMES = [c.code for c in LABEL_CODES]

#: convention -> (class names, {label index: class}); indices absent from the map are dropped.
CONVENTIONS: dict[str, tuple[list[str], dict[int, int]]] = {
    "confident": (["FRI", "FRII"], {0: 0, 1: 0, 2: 0, 5: 1, 6: 1}),  # MBFRConfident
    "uncertain": (["FRI", "FRII"], {3: 0, 4: 0, 7: 1}),  # MBFRUncertain
    "fr_all": (["FRI", "FRII"], {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 1, 7: 1}),  # MBFRFull
    "hybrid": (["hybrid_confident", "hybrid_uncertain"], {8: 0, 9: 1}),  # MBHybrid
    "all": (list(LABEL_NAMES), {i: i for i in range(10)}),  # the ten codes as they are
}


def map_labels(codes: Sequence[int] | np.ndarray, convention: str) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, labels)``: positions of ``codes`` that the convention uses, and their class indices."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown MiraBest convention {convention!r}; choose one of {sorted(CONVENTIONS)}")
    mapping = CONVENTIONS[convention][1]
    codes = np.asarray(codes, dtype=np.int64).reshape(-1)
    keep = np.flatnonzero(np.isin(codes, list(mapping)))
    return keep, np.array([mapping[int(c)] for c in codes[keep]], dtype=np.int64)


# ---- safe reading -------------------------------------------------------------------------------
def _numpy_core(name: str):
    """``numpy._core.<name>`` (numpy >= 2) or ``numpy.core.<name>`` (numpy 1): where pickles point either way."""
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:  # pragma: no cover - numpy 1.x
        return importlib.import_module(f"numpy.core.{name}")


def _allowed() -> dict[tuple[str, str], Any]:
    import _codecs

    multiarray, numeric = _numpy_core("multiarray"), _numpy_core("numeric")
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): _codecs.encode}
    for core in ("numpy.core", "numpy._core"):  # pickles from numpy 1 and numpy 2
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays, numpy scalars and builtin containers only.

    Any other global (``os.system``, ``builtins.open``, ``subprocess.Popen``...) is refused
    with :class:`~vision_ft.errors.DataError` *before* it is called, so a malicious file
    cannot run code. Dicts, lists, tuples, str, bytes, int, float are pickle opcodes, not
    globals, and need no permission.
    """

    def __init__(self, file, *, source: str = "<pickle>"):
        super().__init__(file, encoding="latin1")  # batches written by Python 2 hold str as bytes
        self.source = source
        self._allowed = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(f"{self.source}: refusing to load the pickled global {module}.{name}: only numpy "
                            f"arrays and plain Python values are allowed in MiraBest batch files (is the file "
                            f"tampered with or not a MiraBest batch?)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.source}: persistent references are not allowed in MiraBest batch files")


def load_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (see the module docstring for why)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=str(path)).load()
    except DataError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise DataError(f"{path} is not a readable pickle ({type(e).__name__}: {e})") from None


@dataclass
class Batch:
    """One MiraBest batch: ``images`` (N, 150, 150) uint8, ``codes`` (N,) label indices 0-9."""

    images: np.ndarray
    codes: np.ndarray
    filenames: list[str]
    batch_label: str


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def read_batch(path: str | Path, image_size: int = IMAGE_SIZE) -> Batch:
    """Read and validate one batch file (``data_batch_N`` / ``test_batch``)."""
    path = Path(path)
    entry = load_pickle(path)
    if not isinstance(entry, dict):
        raise DataError(f"{path}: expected a pickled dict with keys data, labels, filenames; "
                        f"got {type(entry).__name__}")
    entry = {_text(k): v for k, v in entry.items()}
    key = "fine_labels" if "labels" not in entry and "fine_labels" in entry else "labels"
    missing = [k for k in ("data", key) if k not in entry]
    if missing:
        hint = (" Unlabelled batches (e.g. Radio Galaxy Zoo's RGZ108k) cannot train a classifier; see "
                "datasets_cards/radio_galaxy_zoo.md." if key in missing else "")
        raise DataError(f"{path}: batch lacks key(s) {missing}; it has {sorted(entry)}.{hint}")
    rows = entry["data"]
    try:
        if isinstance(rows, np.ndarray):
            images = np.asarray(rows)
        else:
            images = np.stack([np.asarray(r) for r in rows]) if len(rows) else np.zeros((0, image_size, image_size))
    except ValueError as e:
        raise DataError(f"{path}: the images in 'data' differ in shape ({e})") from None
    if images.dtype.kind not in "ui":
        raise DataError(f"{path}: 'data' holds {images.dtype} values; expected uint8 pixels")
    n = images.shape[0]
    pixels = int(np.prod(images.shape[1:])) if images.ndim > 1 else 0
    if pixels != image_size * image_size:
        raise DataError(f"{path}: each image has {pixels} pixels ({images.shape[1:]}); expected "
                        f"{image_size}x{image_size} single-channel")
    images = images.reshape(n, image_size, image_size)
    if images.dtype != np.uint8:
        if images.min(initial=0) < 0 or images.max(initial=0) > 255:
            raise DataError(f"{path}: pixel values outside 0-255 in a {images.dtype} array")
        images = images.astype(np.uint8)
    codes = np.asarray([int(c) for c in entry[key]], dtype=np.int64)
    if codes.shape[0] != n:
        raise DataError(f"{path}: {codes.shape[0]} labels for {n} images")
    if n and (codes.min() < 0 or codes.max() > 9):
        bad = sorted(set(codes.tolist()) - set(range(10)))
        raise DataError(f"{path}: label codes must be 0-9 (MiraBest), found {bad}")
    names = [_text(f) for f in entry.get("filenames", [])] or [f"{path.name}[{i}]" for i in range(n)]
    if len(names) != n:
        raise DataError(f"{path}: {len(names)} filenames for {n} images")
    return Batch(images, codes, names, _text(entry.get("batch_label", "")))


def read_meta(path: str | Path) -> dict[str, Any]:
    """``batches.meta`` as a dict (``label_names`` as str)."""
    meta = load_pickle(path)
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a pickled dict with 'label_names'")
    meta = {_text(k): v for k, v in meta.items()}
    if "label_names" in meta:
        meta["label_names"] = [_text(n) for n in meta["label_names"]]
    return meta


# ---- writing ------------------------------------------------------------------------------------
def write_batch(path: str | Path, images: np.ndarray, codes: Sequence[int], filenames: Sequence[str],
                batch_label: str) -> Path:
    """Write one batch exactly as the MiraBest builder does: a pickled dict holding a list of
    150x150 ``uint8`` arrays, a list of int codes, the filenames and a batch label."""
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W) uint8, got {images.shape} {images.dtype}")
    if not len(images) == len(codes) == len(filenames):
        raise ValueError("images, codes and filenames differ in length")
    entry = {"batch_label": str(batch_label), "labels": [int(c) for c in codes],
             "data": [np.ascontiguousarray(im) for im in images], "filenames": [str(f) for f in filenames]}
    from vision_ft.io import atomic_write_bytes  # writing uses the kit; reading needs numpy only

    return atomic_write_bytes(path, pickle.dumps(entry, protocol=4))


def write_meta(folder: str | Path, num_cases_per_batch: int, image_size: int = IMAGE_SIZE) -> Path:
    """Write ``batches.meta`` with MiraBest's ten label names."""
    meta = {"num_cases_per_batch": int(num_cases_per_batch), "label_names": list(LABEL_NAMES),
            "num_vis": int(image_size * image_size)}
    from vision_ft.io import atomic_write_bytes

    return atomic_write_bytes(Path(folder) / META_FILE, pickle.dumps(meta, protocol=4))
