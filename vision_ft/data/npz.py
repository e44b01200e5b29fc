"""MedMNIST-style ``.npz`` arrays: ``{train,val,test}_{images,labels}``.

``__init__`` reads only the array headers and the (small) label arrays, so the
classes are known before ``setup``; image arrays are loaded at setup.
Labels ``(N,)`` or ``(N, 1)`` are single-label; ``(N, L)`` with ``L > 1`` are
multi-label 0/1 (ChestMNIST style).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import SPLITS, ClassificationData
from .labelled_images import ArraySamples


def npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{key: (shape, dtype)}`` of every array in an ``.npz``, without loading the data."""
    fmt = np.lib.format
    readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as fh:
                    version = fmt.read_magic(fh)
                    read = readers.get(version) or (lambda f: fmt._read_array_header(f, version))
                    shape, _, dtype = read(fh)
                out[name[: -len(".npy")]] = (tuple(shape), dtype)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise DataError(f"{path} (data.init_args.path) is not a readable .npz file: {e}") from e
    return out


class MedMNISTData(ClassificationData):
    """A MedMNIST ``.npz`` (or any ``.npz`` with the same keys).

    ``train_images``/``train_labels`` are required; ``val_*`` and ``test_*`` pairs are
    optional (validation is then held out from train, testing uses validation).
    Images are ``(N, H, W)``, ``(N, H, W, 1)`` or ``(N, H, W, 3)`` arrays, uint8 or uint16.
    Other arguments: :class:`ClassificationData`.
    """

    def __init__(self, path: str, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise DataError(f"data.init_args.path: file {self.path} does not exist")
        headers = npz_headers(self.path)
        required = ["train_images", "train_labels"]
        for s in ("val", "test"):
            if f"{s}_images" in headers or f"{s}_labels" in headers:
                required += [f"{s}_images", f"{s}_labels"]
        missing = [k for k in required if k not in headers]
        if missing:
            raise DataError(f"{self.path} (data.init_args.path) lacks key(s) {missing}; it has {sorted(headers)}. "
                            f"Required: train_images, train_labels, and val_/test_ images+labels in pairs.")
        self._splits = [s for s in SPLITS if f"{s}_images" in headers]
        with np.load(self.path) as f:
            labels = {s: np.asarray(f[f"{s}_labels"]) for s in self._splits}
        widths = set()
        for s in self._splits:
            shape, lab = headers[f"{s}_images"][0], labels[s]
            if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3, 4)):
                raise DataError(f"{self.path}: {s}_images has shape {shape}; expected (N,H,W), (N,H,W,1) or (N,H,W,3)")
            if lab.ndim not in (1, 2) or lab.shape[0] != shape[0]:
                raise DataError(f"{self.path}: {s}_labels has shape {lab.shape} but {s}_images has {shape[0]} images")
            if shape[0] == 0:
                raise DataError(f"{self.path}: {s}_images is empty; remove the {s}_ keys or add images")
            widths.add(1 if lab.ndim == 1 else lab.shape[1])
        if len(widths) != 1:
            raise DataError(f"{self.path}: label arrays differ in width across splits: {sorted(widths)}")
        width = widths.pop()
        multilabel = width > 1
        if multilabel:
            num_classes = width
            for s, lab in labels.items():
                if not np.isin(lab, (0, 1)).all():
                    raise DataError(f"{self.path}: {s}_labels is multi-label ({width} columns) but holds values "
                                    f"other than 0/1")
            self._labels = {s: lab.astype(np.float32) for s, lab in labels.items()}
        else:
            self._labels = {s: lab.reshape(-1).astype(np.int64) for s, lab in labels.items()}
            given = self._given_names
            num_classes = len(given) if given is not None else int(max(lab.max() for lab in self._labels.values())) + 1
            for s, lab in self._labels.items():
                if lab.min() < 0 or lab.max() >= num_classes:
                    raise DataError(f"{self.path}: {s}_labels has values in [{lab.min()}, {lab.max()}], outside "
                                    f"[0, {num_classes}) (num_classes from data.init_args.class_names)")
        self._set_classes(num_classes, None, multilabel=multilabel)

    def _raw_split(self, split: str) -> ArraySamples | None:
        if split not in self._splits:
            return None
        with np.load(self.path) as f:
            images = f[f"{split}_images"]
        return ArraySamples(images, self._labels[split], source=f"{self.path}:{split}_images")

    def _identity(self) -> dict:
        return {"name": self.path.stem, "type": type(self).__name__, "source": str(self.path.resolve())}
