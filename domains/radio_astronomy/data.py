"""Radio astronomy datamodules: MiraBest batches, FITS cutouts + CSV catalogue, PNG folders.

All three apply :class:`~domains.radio_astronomy.preprocess.RadioPreprocess` to the
raw image (float for FITS, 8-bit for MiraBest/PNG) *before* the kit turns it into a
3-channel tensor in [0, 1]: each split's samples are wrapped in
:class:`PreprocessedSamples`, whose ``read`` applies it. Splitting, the corrupt-image
policy, few-shot sampling and the loaders are the kit's (:class:`~vision_ft.data.ClassificationData`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from vision_ft.data import ArraySamples, ClassificationData, CSVManifestData, FileSamples, ImageFolderData, Samples
from vision_ft.errors import DataError

from .mirabest import CONVENTIONS, LABEL_CODES, LABEL_NAMES, META_FILE, TEST_BATCH, TRAIN_BATCHES, map_labels, \
    read_batch, read_meta
from .preprocess import RadioPreprocess

log = logging.getLogger("vision_ft")

Convention = Literal["confident", "uncertain", "fr_all", "hybrid", "all"]


class PreprocessedSamples(Samples):
    """Any :class:`~vision_ft.data.Samples` whose images pass through a :class:`RadioPreprocess` on read.

    Labels, keys, hashes (of the stored bytes) and the corrupt check are the wrapped samples'.
    """

    def __init__(self, inner: Samples, preprocess: RadioPreprocess):
        self.inner, self.preprocess = inner, preprocess
        self.labels, self.keys = inner.labels, inner.keys

    def read(self, i: int) -> np.ndarray:
        try:
            return self.preprocess(self.inner.read(i))
        except DataError as e:
            raise DataError(f"{self.inner.describe(i)}: {e}") from None

    def sha1(self, i: int) -> str:
        return self.inner.sha1(i)

    def describe(self, i: int) -> str:
        return self.inner.describe(i)

    def unreadable(self) -> dict[int, str]:
        return self.inner.unreadable()

    def subset(self, positions: Sequence[int]) -> "PreprocessedSamples":
        return PreprocessedSamples(self.inner.subset(positions), self.preprocess)


def _preprocess(value: RadioPreprocess | dict | None) -> RadioPreprocess:
    if value is None:
        return RadioPreprocess()
    if isinstance(value, dict):
        return RadioPreprocess(**value)
    return value


def _input_transform(self) -> dict:
    """The run's preprocessing, recorded with it so inference applies it (see ``ClassificationData.input_transform``)."""
    from dataclasses import asdict

    return {"class_path": f"{RadioPreprocess.__module__}.{RadioPreprocess.__qualname__}",
            "init_args": asdict(self.preprocess),
            "readers": {suffix: f"{__name__}.read_fits_image" for suffix in FITS_SUFFIXES}}


#: FITS file names predict_images and ``predict --images`` decode with :func:`read_fits_image`
FITS_SUFFIXES = (".fits", ".fit", ".fts")


def images_to_tensor(images: Sequence[np.ndarray], preprocess: RadioPreprocess | dict | None, size: int):
    """Raw images (FITS arrays, MiraBest/PNG ``uint8``) -> the ``(B, 3, size, size)`` float tensor a trained
    run expects, through the same preprocessing as training. Pass the run's ``data.init_args.preprocess``
    (in its ``config.yaml``). A run's ``adapter.json`` records it too (``input_transform``), and
    ``vision_ft.load_adapter(run).predict_images`` and ``python -m vision_ft predict RUN --images ...`` apply it."""
    import torch

    from vision_ft.data import to_tensor

    pre = _preprocess(preprocess)
    return torch.stack([to_tensor(pre(np.asarray(im)), size) for im in images])


# ---- MiraBest ------------------------------------------------------------------------------------
class MiraBestData(ClassificationData):
    """MiraBest pickled batches (``data_batch_1..7``, ``test_batch``, ``batches.meta``).

    Args:
        root: the folder holding the batch files, or its parent (the released tarball
            extracts to ``<root>/batches``). ``None``: the embedded SYNTHETIC sample,
            generated on first use in ``sample_dir``.
        convention: how the ten label codes become classes (the public dataset classes'
            conventions): ``confident`` (MBFRConfident: FRI {0,1,2} vs FRII {5,6}),
            ``uncertain`` (MBFRUncertain: {3,4} vs {7}), ``fr_all`` (MBFRFull: {0..4} vs
            {5,6,7}), ``hybrid`` (MBHybrid: {8} vs {9}), ``all`` (the ten codes).
            Images with other codes are dropped, and the count is logged.
        sample_dir: where the synthetic sample lives (written once, reused).
        train_batches: training batch file names (default ``data_batch_1`` ... ``data_batch_7``).
        test_batch: test batch file name; ``None``: no test split (tests use validation).
        preprocess: :class:`RadioPreprocess` settings (applied to the 8-bit images).
        **kwargs: :class:`~vision_ft.data.ClassificationData` options. MiraBest has no
            validation batch: ``val_fraction`` of the training images is held out.

    Batch files are Python pickles; they are read with a restricted unpickler that
    refuses anything but numpy arrays and plain values (see :mod:`~domains.radio_astronomy.mirabest`).
    """

    input_transform = _input_transform

    def __init__(self, root: str | None = None, convention: Convention = "confident",
                 sample_dir: str = "data/radio_astronomy_sample", train_batches: list[str] | None = None,
                 test_batch: str | None = TEST_BATCH, preprocess: RadioPreprocess | None = None, **kwargs):
        super().__init__(**kwargs)
        if convention not in CONVENTIONS:
            from vision_ft.errors import ConfigError

            raise ConfigError(f"data.init_args.convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")
        self.convention, self.preprocess = convention, _preprocess(preprocess)
        self.synthetic = root is None
        if root is None:
            from .sample import is_complete, write_sample

            folder = Path(sample_dir) / "batches"
            if not is_complete(folder):
                write_sample(sample_dir)
            log.warning("data: using the embedded SYNTHETIC radio-galaxy sample %s (generated images, not sky data); "
                        "set data.init_args.root to the real MiraBest batches (see datasets_cards/mirabest.md)",
                        folder)
        else:
            folder = _batch_folder(Path(root).expanduser())
        self.folder = folder
        meta_path = folder / META_FILE
        if meta_path.is_file():
            names = read_meta(meta_path).get("label_names") or LABEL_NAMES
        else:
            log.warning("data: %s has no %s; using MiraBest's default label names", folder, META_FILE)
            names = LABEL_NAMES
        if len(names) != len(LABEL_CODES):
            raise DataError(f"{meta_path}: {len(names)} label names; MiraBest has {len(LABEL_CODES)} label codes")
        self.label_names = list(names)
        files = {"train": list(train_batches) if train_batches is not None else list(TRAIN_BATCHES)}
        if not files["train"]:
            raise DataError("data.init_args.train_batches is empty")
        if test_batch:
            files["test"] = [test_batch]
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.code_counts: dict[str, dict[int, int]] = {}
        for split, names_ in files.items():
            images, codes = [], []
            for name in names_:
                path = folder / name
                if not path.is_file():
                    key = "train_batches" if split == "train" else "test_batch"
                    raise DataError(f"MiraBest batch {path} does not exist (data.init_args.root / {key}); "
                                    f"found {sorted(p.name for p in folder.iterdir())}")
                batch = read_batch(path)
                images.append(batch.images)
                codes.append(batch.codes)
            images, codes = np.concatenate(images), np.concatenate(codes)
            keep, labels = map_labels(codes, convention)
            self.code_counts[split] = {int(c): int((codes == c).sum()) for c in np.unique(codes)}
            if keep.size == 0:
                raise DataError(f"no {split} image of {folder} has a label code that convention {convention!r} "
                                f"uses ({sorted(CONVENTIONS[convention][1])}); codes present: "
                                f"{self.code_counts[split]}")
            self._arrays[split] = (images[keep], labels)
            dropped = {c: n for c, n in self.code_counts[split].items() if c not in CONVENTIONS[convention][1]}
            class_names = self._names()
            per_class = {class_names[k]: int((labels == k).sum()) for k in range(len(class_names))}
            log.info("data: MiraBest %s split, convention %r: %d of %d images kept %s; dropped label codes %s",
                     split, convention, keep.size, codes.size, per_class, dropped or "none")
        self._set_classes(len(self._names()), self._names())

    def _names(self) -> list[str]:
        return list(self.label_names) if self.convention == "all" else list(CONVENTIONS[self.convention][0])

    def _raw_split(self, split: str) -> Samples | None:
        if split not in self._arrays:
            return None
        images, labels = self._arrays[split]
        return PreprocessedSamples(ArraySamples(images, labels, source=f"{self.folder}:{split}"), self.preprocess)

    def _identity(self) -> dict:
        return {"name": f"mirabest_{self.convention}", "type": type(self).__name__,
                "source": str(self.folder.resolve()), "synthetic": self.synthetic}


def _batch_folder(root: Path) -> Path:
    """``root`` if it holds the batch files, else ``root/batches``."""
    for folder in (root, root / "batches"):
        if (folder / TRAIN_BATCHES[0]).is_file() or (folder / META_FILE).is_file():
            return folder
    if not root.is_dir():
        raise DataError(f"data.init_args.root: folder {root} does not exist")
    raise DataError(f"data.init_args.root: {root} holds no MiraBest batches (expected {TRAIN_BATCHES[0]} ... "
                    f"{TRAIN_BATCHES[-1]}, {TEST_BATCH}, {META_FILE} in it or in {root / 'batches'})")


# ---- FITS cutouts ----------------------------------------------------------------------------------
def read_fits_image(path: str | Path) -> np.ndarray:
    """The first image HDU of a FITS file as float64 ``(H, W)``, north up (row 0 = top).

    Degenerate axes of length 1 (Stokes, frequency: radio images are often 4-D) are
    dropped; BSCALE/BZERO are applied by astropy; NaN blanks are kept (the preprocessing's
    ``nan_policy`` decides). FITS stores the first row at the bottom, so rows are flipped
    to the top-left origin of every other image format.
    """
    from astropy.io import fits

    path = Path(path)
    try:
        with fits.open(path, memmap=False) as hdul:
            data = next((h.data for h in hdul if h.is_image and h.data is not None and h.data.ndim >= 2), None)
            if data is None:
                raise DataError(f"{path}: no image HDU with 2-D data")
            arr = np.asarray(data, dtype=np.float64)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - astropy raises OSError/ValueError/VerifyError/TypeError
        raise DataError(f"{path}: not a readable FITS file ({type(e).__name__}: {e})") from None
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise DataError(f"{path}: image HDU has shape {data.shape}; expected 2-D (length-1 axes are dropped)")
    return arr[::-1].copy()


class FITSSamples(FileSamples):
    """FITS cutouts listed in a catalogue; ``read`` gives the raw float image (NaNs included).

    With ``require_finite`` (``nan_policy=error``) an image with NaN/inf pixels counts as
    unreadable, so ``on_corrupt`` decides: skip it (counted, listed) or stop.
    """

    def __init__(self, root, paths, labels, require_finite: bool = False):
        super().__init__(root, paths, labels)
        self.require_finite = require_finite

    def read(self, i: int) -> np.ndarray:
        return read_fits_image(self.path(i))

    def _check(self, i: int) -> str | None:
        try:
            arr = read_fits_image(self.path(i))
        except DataError as e:
            return str(e).split(": ", 1)[-1]
        if self.require_finite and not np.isfinite(arr).all():
            return (f"{int((~np.isfinite(arr)).sum())} NaN/inf pixel(s) and data.init_args.preprocess.nan_policy="
                    f"error")
        return None

    def subset(self, positions: Sequence[int]) -> "FITSSamples":
        positions = list(positions)
        return FITSSamples(self.root, [self.keys[p] for p in positions], self.labels[positions], self.require_finite)


class RadioFITSData(CSVManifestData):
    """FITS cutouts (``.fits`` / ``.fits.gz``) with a CSV catalogue per split.

    Each catalogue has a header with at least ``path`` (relative to ``root``, default the
    CSV's folder, or absolute) and ``label`` (a class name such as ``FRI``/``FRII``, or an
    index); other columns (RA, Dec, flux...) are ignored. Catalogue handling, class names
    and errors are :class:`~vision_ft.data.CSVManifestData`'s; each image is read with
    astropy (:func:`read_fits_image`) and preprocessed (NaN policy, sigma clip, stretch).

    Args:
        train_csv, val_csv, test_csv, root: as :class:`~vision_ft.data.CSVManifestData`.
        preprocess: :class:`RadioPreprocess` settings.
        **kwargs: :class:`~vision_ft.data.ClassificationData` options.
    """

    input_transform = _input_transform

    def __init__(self, train_csv: str, val_csv: str | None = None, test_csv: str | None = None,
                 root: str | None = None, preprocess: RadioPreprocess | None = None, **kwargs):
        self.preprocess = _preprocess(preprocess)
        super().__init__(train_csv=train_csv, val_csv=val_csv, test_csv=test_csv, root=root, **kwargs)

    def _raw_split(self, split: str) -> Samples | None:
        files = self._lists.get(split)
        if files is None:
            return None
        fits_samples = FITSSamples(files.root, files.keys, files.labels,
                                   require_finite=self.preprocess.nan_policy == "error")
        return PreprocessedSamples(fits_samples, self.preprocess)

    def _identity(self) -> dict:
        return {**super()._identity(), "type": type(self).__name__}


# ---- PNG folders ------------------------------------------------------------------------------------
class RadioPNGFolderData(ImageFolderData):
    """``root/<split>/<class>/<image>.png`` (e.g. the FIRST 4-class set: ``val_dir: valid``), preprocessed.

    Args:
        root, train_dir, val_dir, test_dir: as :class:`~vision_ft.data.ImageFolderData`.
        preprocess: :class:`RadioPreprocess` settings (applied to the 8/16-bit images;
            colour PNGs are averaged to one channel).
        **kwargs: :class:`~vision_ft.data.ClassificationData` options.
    """

    input_transform = _input_transform

    def __init__(self, root: str, train_dir: str = "train", val_dir: str | None = "val",
                 test_dir: str | None = "test", preprocess: RadioPreprocess | None = None, **kwargs):
        self.preprocess = _preprocess(preprocess)
        super().__init__(root=root, train_dir=train_dir, val_dir=val_dir, test_dir=test_dir, **kwargs)

    def _raw_split(self, split: str) -> Samples | None:
        files = super()._raw_split(split)
        return None if files is None else PreprocessedSamples(files, self.preprocess)

    def _identity(self) -> dict:
        return {**super()._identity(), "type": type(self).__name__}
