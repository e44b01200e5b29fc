"""OOD detection data: an in-distribution classification datamodule plus OOD image folders.

The in-distribution (ID) side is any classification datamodule of the kit
(:class:`~vision_ft.data.ImageFolderData`, :class:`~vision_ft.data.MedMNISTData`,
``domains.medical.MedicalSampleData``...): training (few-shot with ``shots`` + ``seed``, the
CoOp protocol), validation and the ID test split are its own, unchanged. The OOD sets are
image folders, one per name (``ood: {name: folder}``), read recursively at any depth; folder
names and labels inside them are ignored (the curated iNaturalist / SUN / Places / Texture sets
of MOS are ImageFolder trees with one or a few folders). They are read with the kit's image
loading (any mode -> RGB float in [0, 1], resized to the ID data's ``image_size``) and its
corrupt-image policy (the ID data's ``on_corrupt``: unreadable images skipped with count and
paths logged, or an error naming the file).

Test and predict use **one tagged loader**: the ID test split and every OOD set, each item
``{"image", "label" (ID class, -1 for OOD), "ood_set" (0 = ID, k = k-th OOD set), "index"
(position in this test set)}``. The order interleaves the sets in proportion to their sizes, so
every batch (and a run cut short by ``limit_test_batches`` or ``fast_dev_run``) holds ID and OOD
samples; ``index`` lets the task drop the duplicates a distributed sampler pads with. One loader
rather than one per set keeps the ID metrics' names as in classification (no
``/dataloader_idx_k`` suffixes) and lets the task compute all OOD metrics from one gathered pass.

With ``ood`` unset a SYNTHETIC offline sample (:func:`write_ood_sample`) is generated into
``sample_dir`` and used, and the log says so.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import ConfigError, DataError
from ..io import atomic_dir
from .base import ClassificationData, loader_generator
from .labelled_images import FileSamples, ImageDataset

log = logging.getLogger("vision_ft")

#: folder of the synthetic sample inside ``sample_dir`` (bump the suffix when the generator changes)
SAMPLE_NAME = "synthetic_ood_v1"
#: the synthetic OOD sets, as written by :func:`write_ood_sample`
SAMPLE_SETS = ("textures", "noise_shapes")
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")

__all__ = ["OODData", "OODTestSet", "SAMPLE_SETS", "list_images", "write_ood_sample"]


def list_images(folder: str | Path) -> list[str]:
    """Paths (relative to ``folder``, sorted) of the image files under ``folder`` at any depth;
    symlinked folders are followed, hidden files and folders skipped."""
    folder = Path(folder)
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS):
                found.append((Path(dirpath) / name).relative_to(folder).as_posix())
    return sorted(found)


class OODTestSet(Dataset):
    """The ID test split and the OOD sets as one dataset, interleaved (see the module docstring).

    Item ``i`` is sample ``local`` of set ``source`` where ``(source, local)`` is the ``i``-th
    pair in the order of ``(local + 0.5) / len(set)``, then ``source``.
    """

    def __init__(self, parts: list[ImageDataset]):
        self.parts = parts
        keys = [((j + 0.5) / len(part), s, j) for s, part in enumerate(parts) for j in range(len(part))]
        self.order = [(s, j) for _, s, j in sorted(keys)]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        source, local = self.order[i]
        item = self.parts[source][local]
        label = item["label"] if source == 0 else torch.tensor(-1, dtype=torch.int64)
        return {"image": item["image"], "label": label, "ood_set": torch.tensor(source, dtype=torch.int64),
                "index": torch.tensor(i, dtype=torch.int64)}


class OODData(L.LightningDataModule):
    """In-distribution classification data + OOD image folders, for OOD detection.

    Args:
        in_distribution: the ID datamodule (``class_path`` + ``init_args``): its training
            (few-shot) and validation splits are used as they are, its test split is the ID side
            of the OOD test. Batch size, workers, image size, seed and ``on_corrupt`` are its own
            and apply to the OOD sets too.
        ood: OOD sets, name -> image folder (any nesting; labels ignored). Names are used in
            metric keys (``test/mcm/<name>/fpr95``): letters, digits and ``_ . + -``; ``avg`` and
            ``id`` are reserved. ``None`` (default) uses the SYNTHETIC sample (``textures``,
            ``noise_shapes``) generated into ``sample_dir``.
        sample_dir: where the synthetic OOD sample is written (once; reused if present).
        class_names_file: prompt names of the ID classes, overriding the ID data's (e.g. readable
            ImageNet names instead of WordNet ids): one name per line in label order, or lines
            ``<class folder> <name>`` (CoOp's / Local-Prompt's ImageNet ``classnames.txt``),
            matched to the ID data's class names.
    """

    def __init__(self, in_distribution: ClassificationData, ood: dict[str, str] | None = None,
                 sample_dir: str = "data/ood_sample", class_names_file: str | None = None):
        super().__init__()
        if not isinstance(in_distribution, ClassificationData):
            raise ConfigError("data.init_args.in_distribution must be a classification datamodule (class_path of a "
                              f"vision_ft.data.ClassificationData subclass), got {type(in_distribution).__name__}")
        if in_distribution.multilabel:
            raise ConfigError("data.init_args.in_distribution is multi-label; OOD detection needs single-label ID data")
        self.in_distribution = in_distribution
        self.sample_dir = sample_dir
        self.synthetic = ood is None
        if ood is None:
            ood = _ensure_sample(Path(sample_dir))
            log.warning("data: OOD sets are the embedded SYNTHETIC sample %s (%s: generated images, not a real "
                        "OOD benchmark); set data.init_args.ood to your OOD folders (see "
                        "datasets_cards/ood_benchmarks.md)", Path(sample_dir) / SAMPLE_NAME, ", ".join(ood))
        if not isinstance(ood, dict) or not ood:
            raise ConfigError("data.init_args.ood must map at least one OOD set name to an image folder, e.g. "
                              "{SUN: /data/ood/SUN}")
        self.ood = {str(k): str(v) for k, v in ood.items()}
        self.ood_names = list(self.ood)
        self._lists: dict[str, FileSamples] = {}
        for name, folder in self.ood.items():
            key = f"data.init_args.ood.{name}"
            if not _NAME.match(name) or name in ("avg", "id"):
                raise ConfigError(f"{key}: OOD set name {name!r} is not allowed (letters, digits, '_', '.', '+', "
                                  "'-'; not 'avg' or 'id')")
            root = Path(folder).expanduser()
            if not root.is_dir():
                raise DataError(f"{key}: folder {root} does not exist")
            paths = list_images(root)
            if not paths:
                raise DataError(f"{key}: no images with extensions {IMG_EXTENSIONS} under {root}")
            self._lists[name] = FileSamples(root, paths, np.zeros(len(paths), dtype=np.int64))
        self.num_classes = in_distribution.num_classes
        self.multilabel = False
        self.class_names = list(in_distribution.class_names)
        if class_names_file is not None:
            self.class_names = _read_class_names(class_names_file, self.class_names)
        self.class_names_file = class_names_file
        self.skipped: list[str] = []
        self._ood_samples: dict[str, FileSamples] = {}

    # --- the ID side ------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.in_distribution.batch_size

    def prepare_data(self) -> None:
        self.in_distribution.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.in_distribution.trainer = self.trainer  # few-shot split files, rank-aware training loader
        self.in_distribution.setup(stage)
        if stage in (None, "test", "predict"):
            for name in self.ood_names:
                self._checked(name)

    def train_dataloader(self) -> DataLoader:
        return self.in_distribution.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self.in_distribution.val_dataloader()

    # --- the OOD side -----------------------------------------------------------------
    def _checked(self, name: str) -> FileSamples:
        if name in self._ood_samples:
            return self._ood_samples[name]
        samples = self._lists[name]
        bad = samples.unreadable()
        if bad:
            key = f"data.init_args.ood.{name}"
            if self.in_distribution.on_corrupt == "error":
                first = next(iter(bad))
                raise DataError(f"unreadable image {samples.describe(first)} in OOD set {name!r} ({key}): "
                                f"{bad[first]}. Fix or remove it, or set "
                                "data.init_args.in_distribution.init_args.on_corrupt=skip to skip unreadable images.")
            paths = [samples.describe(i) for i in bad]
            self.skipped.extend(paths)
            log.warning("skipped %d unreadable image(s) in OOD set %r (%s; on_corrupt=skip):\n  %s",
                        len(paths), name, key, "\n  ".join(paths))
            samples = samples.subset([i for i in range(len(samples)) if i not in bad])
            if len(samples) == 0:
                raise DataError(f"{key}: every image under {samples.root} is unreadable")
        self._ood_samples[name] = samples
        return samples

    def ood_dataset(self, name: str) -> ImageDataset:
        """The torch dataset of one OOD set (labels are 0 and meaningless)."""
        return ImageDataset(self._checked(name), self.in_distribution.image_size)

    def test_set(self) -> OODTestSet:
        """ID test split + every OOD set, tagged and interleaved (see :class:`OODTestSet`)."""
        parts = [self.in_distribution.dataset("test")] + [self.ood_dataset(n) for n in self.ood_names]
        counts = ", ".join(f"{n}: {len(p)}" for n, p in zip(["ID test", *self.ood_names], parts))
        log.info("OOD test set: %s", counts)
        return OODTestSet(parts)

    def _tagged_loader(self) -> DataLoader:
        dm = self.in_distribution
        return DataLoader(self.test_set(), batch_size=dm.batch_size, num_workers=dm.num_workers,
                          persistent_workers=dm.num_workers > 0, generator=loader_generator(dm.seed))

    def test_dataloader(self) -> DataLoader:
        return self._tagged_loader()

    def predict_dataloader(self) -> DataLoader:
        return self._tagged_loader()


def _read_class_names(path: str, current: list[str]) -> list[str]:
    key = "data.init_args.class_names_file"
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}: file {file} does not exist")
    lines = [ln.strip() for ln in file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    pairs = [ln.split(maxsplit=1) for ln in lines]
    if len(lines) == len(current) and all(len(p) == 2 for p in pairs) and {p[0] for p in pairs} == set(current):
        by_folder = {folder: name.strip() for folder, name in pairs}
        return [by_folder[c] for c in current]
    if len(lines) != len(current):
        raise ConfigError(f"{key}: {file} has {len(lines)} names, the in-distribution data has {len(current)} "
                          "classes (one name per line in label order, or '<class folder> <name>' lines)")
    return lines


# --- the synthetic sample ---------------------------------------------------------------
def _ensure_sample(sample_dir: Path) -> dict[str, str]:
    target = sample_dir / SAMPLE_NAME
    if not target.is_dir():
        # built beside and renamed into place: concurrent writers (DDP ranks) never see half a sample
        with atomic_dir(target, complete=Path.is_dir) as tmp:
            write_ood_sample(tmp)
    return {name: str(target / name) for name in SAMPLE_SETS}


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Woven / checker / plaid patterns in cool, desaturated colours (a texture-like OOD set)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    kind = rng.integers(0, 3)
    period = rng.uniform(3.0, 8.0) * size / 28.0
    if kind == 0:  # checkerboard, random rotation
        a = rng.uniform(0, np.pi)
        u, v = xx * np.cos(a) + yy * np.sin(a), -xx * np.sin(a) + yy * np.cos(a)
        pattern = ((np.floor(u / period) + np.floor(v / period)) % 2)
    elif kind == 1:  # plaid: two crossing sine gratings
        pattern = 0.5 + 0.25 * (np.sin(2 * np.pi * xx / period + rng.uniform(0, 6.3))
                                + np.sin(2 * np.pi * yy / (period * rng.uniform(0.7, 1.4)) + rng.uniform(0, 6.3)))
    else:  # weave: alternating horizontal / vertical stripes per cell
        cell = np.floor(xx / (2 * period)) + np.floor(yy / (2 * period))
        stripes = np.where(cell % 2 == 0, np.sin(2 * np.pi * xx / period), np.sin(2 * np.pi * yy / period))
        pattern = 0.5 + 0.5 * stripes
    dark = np.array([0.10, 0.25, 0.30]) + rng.normal(0, 0.04, 3)
    light = np.array([0.55, 0.75, 0.70]) + rng.normal(0, 0.04, 3)
    img = dark + (light - dark) * pattern[..., None]
    return img + rng.normal(0.0, 0.02, img.shape)


def _noise_shapes(rng: np.random.Generator, size: int) -> np.ndarray:
    """Saturated uniform noise with a few flat-coloured rectangles and discs on top."""
    img = rng.uniform(0.0, 1.0, (size, size, 3)) ** rng.uniform(0.5, 2.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for _ in range(rng.integers(1, 4)):
        colour = rng.choice([0.0, 1.0], 3) * rng.uniform(0.7, 1.0)
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(0.1, 0.3) * size
        if rng.integers(0, 2):
            mask = np.hypot(yy - cy, xx - cx) < r
        else:
            mask = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < 0.6 * r)
        img[mask] = colour
    return img


def write_ood_sample(root: str | Path, per_set: int = 100, size: int = 28, seed: int = 0) -> Path:
    """Write the SYNTHETIC OOD sample (PNG files) under ``root`` and return ``root``.

    Not a real OOD benchmark: generated images whose low-level statistics differ from the
    medical pack's synthetic ID sample (pink tissue-like textures), so that even an untrained
    model can separate some of them:

    - ``textures/<checker|plaid|weave>/<i>.png``: texture-like patterns in cool colours (a stand-in
      for Texture/DTD), nested one level to exercise nested folders;
    - ``noise_shapes/<i>.png``: uniform colour noise with flat rectangles and discs.

    A ``README.txt`` at the root says the data is synthetic (non-image files are ignored by the
    reader). Deterministic: the same arguments give the same pixels.
    """
    if per_set < 1 or size < 8:
        raise ValueError(f"per_set must be >= 1 and size >= 8, got per_set={per_set}, size={size}")
    root = Path(root)
    kinds = ("checker", "plaid", "weave")
    for s, name in enumerate(SAMPLE_SETS):
        for i in range(per_set):
            rng = np.random.default_rng([seed, s, i])
            if name == "textures":
                rgb = _texture(rng, size)
                folder = root / name / kinds[i % 3]
            else:
                rgb = _noise_shapes(rng, size)
                folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    (root / "README.txt").write_text(
        "SYNTHETIC out-of-distribution sample written by vision_ft.data.ood.write_ood_sample: generated "
        "images (textures, noise_shapes), not a real OOD benchmark. See datasets_cards/ood_benchmarks.md.\n")
    return root


if __name__ == "__main__":  # python -m vision_ft.data.ood OUT_DIR [--per-set N] [--size S] [--seed K]
    import argparse

    parser = argparse.ArgumentParser(description=write_ood_sample.__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--per-set", type=int, default=100)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    print(write_ood_sample(a.out, per_set=a.per_set, size=a.size, seed=a.seed))

