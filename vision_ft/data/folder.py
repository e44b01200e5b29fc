"""Image files on disk: a torchvision ImageFolder tree or a CSV manifest (``path,label``).

Only the file listing / CSV is read in ``__init__`` (cheap, gives the classes);
images are decoded at setup, where unreadable ones are skipped or fail fast.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from ..errors import DataError
from .base import ClassificationData
from .labelled_images import FileSamples

log = logging.getLogger("vision_ft")


class ImageFolderData(ClassificationData):
    """``root/<split>/<class>/<image>`` (torchvision ImageFolder layout).

    Class names are the sorted folder names of the training split. A validation or
    test folder that does not exist counts as absent (validation is then held out
    from train, testing uses validation); set ``val_dir``/``test_dir`` to null to
    say so explicitly. Other arguments: :class:`ClassificationData`.
    """

    def __init__(self, root: str, train_dir: str = "train", val_dir: str | None = "val",
                 test_dir: str | None = "test", **kwargs):
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"data.init_args.root: folder {self.root} does not exist")
        train = self.root / train_dir
        if not train.is_dir():
            raise DataError(f"data.init_args.train_dir: folder {train} does not exist (expected "
                            f"{train}/<class name>/<images>)")
        try:
            names, class_to_idx = find_classes(str(train))
        except FileNotFoundError as e:
            raise DataError(f"no class folders in {train}: expected {train}/<class name>/<images> "
                            f"(data.init_args.root / train_dir)") from e
        self._lists = {"train": self._list(train, class_to_idx, "train_dir", allow_empty=False)}
        for split, sub, key in (("val", val_dir, "val_dir"), ("test", test_dir, "test_dir")):
            if sub is None:
                continue
            if not (self.root / sub).is_dir():
                log.info("no %s folder %s (data.init_args.%s); treating the %s split as absent",
                         split, self.root / sub, key, split)
                continue
            self._lists[split] = self._list(self.root / sub, class_to_idx, key, allow_empty=True)
        self._set_classes(len(names), names)

    @staticmethod
    def _list(directory: Path, class_to_idx: dict[str, int], key: str, allow_empty: bool) -> FileSamples:
        extra = sorted(d.name for d in directory.iterdir() if d.is_dir() and d.name not in class_to_idx)
        if extra:
            raise DataError(f"{directory} has class folder(s) {extra} that the training split lacks "
                            f"(data.init_args.{key}); every class must have training images")
        try:
            found = make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=allow_empty)
        except FileNotFoundError as e:
            raise DataError(f"{directory}: empty class folder(s): {e} Add images or remove the folders "
                            f"(data.init_args.{key}).") from e
        if not found:
            raise DataError(f"{directory} has no images with extensions {IMG_EXTENSIONS} (data.init_args.{key})")
        rel = [Path(p).relative_to(directory).as_posix() for p, _ in found]
        return FileSamples(directory, rel, np.array([c for _, c in found], dtype=np.int64))

    def _raw_split(self, split: str) -> FileSamples | None:
        return self._lists.get(split)

    def _identity(self) -> dict:
        return {"name": self.root.resolve().name, "type": "ImageFolderData", "source": str(self.root.resolve())}


def _read_manifest(path: str, key: str) -> list[tuple[str, str, int]]:
    """Rows ``(path, label, line number)`` of a ``path,label`` CSV."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data.init_args.{key}: file {file} does not exist")
    with file.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if "path" not in header or "label" not in header:
            raise DataError(f"{file} (data.init_args.{key}) needs a header row with columns path,label; "
                            f"found {header}")
        reader.fieldnames = header
        rows = [((r["path"] or "").strip(), (r["label"] or "").strip(), n) for n, r in enumerate(reader, start=2)]
    for p, label, n in rows:
        if not p or not label:
            raise DataError(f"{file} line {n}: empty path or label (data.init_args.{key})")
    if not rows:
        raise DataError(f"{file} (data.init_args.{key}) has no rows")
    return rows


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


class CSVManifestData(ClassificationData):
    """CSV manifests with header ``path,label``; one file per split.

    ``path`` is relative to ``root`` (default: the folder of each CSV) or absolute.
    ``label`` is a class name or an integer index. Names: classes are the sorted
    unique training names, unless ``class_names`` fixes names and order. Integers:
    ``num_classes`` is ``len(class_names)`` if given, else the largest index + 1.
    Missing image files count as unreadable (``on_corrupt``). Other arguments:
    :class:`ClassificationData`.
    """

    def __init__(self, train_csv: str, val_csv: str | None = None, test_csv: str | None = None,
                 root: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.train_csv = Path(train_csv)
        if root is not None and not Path(root).expanduser().is_dir():
            raise DataError(f"data.init_args.root: folder {root} does not exist")
        manifests = {s: (c, k) for s, c, k in (("train", train_csv, "train_csv"), ("val", val_csv, "val_csv"),
                                                ("test", test_csv, "test_csv")) if c is not None}
        rows = {s: _read_manifest(c, k) for s, (c, k) in manifests.items()}
        given = self._given_names
        all_labels = [label for r in rows.values() for _, label, _ in r]
        if given is not None:
            names = list(given)
        elif all(_is_int(s) for s in all_labels):
            names = [str(i) for i in range(max(int(s) for s in all_labels) + 1)]
        else:
            names = sorted({label for _, label, _ in rows["train"]})
        index = {n: i for i, n in enumerate(names)}
        self._lists = {}
        for split, r in rows.items():
            csv_path, key = Path(manifests[split][0]), manifests[split][1]
            labels = []
            for _, label, line in r:
                if label in index:
                    labels.append(index[label])
                elif _is_int(label) and 0 <= int(label) < len(names):
                    labels.append(int(label))
                elif _is_int(label):
                    raise DataError(f"{csv_path} line {line}: label {label} is out of range [0, {len(names)}) "
                                    f"(data.init_args.{key}; data.init_args.class_names has the class list)")
                else:
                    raise DataError(f"{csv_path} line {line}: unknown label {label!r}; known classes: {names} "
                                    f"(fix data.init_args.{key} or data.init_args.class_names)")
            base = Path(root).expanduser() if root is not None else csv_path.parent
            self._lists[split] = FileSamples(base, [p for p, _, _ in r], np.array(labels, dtype=np.int64))
        self._set_classes(len(names), names)

    def _raw_split(self, split: str) -> FileSamples | None:
        return self._lists.get(split)

    def _identity(self) -> dict:
        return {"name": self.train_csv.stem, "type": "CSVManifestData", "source": str(self.train_csv.resolve())}
