"""Domain generalisation data: ``root/<domain>/<class>/<image>``, leave-one-domain-out.

The DomainBed layout (Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization",
ICLR 2021), used by PEGO (Hu et al., CVPR 2024) for PACS, VLCS, OfficeHome,
TerraIncognita and DomainNet: one folder per domain, an ImageFolder tree inside each.
Training uses the images of the training domains, testing those of the held-out
domain(s); validation is carved from each training domain separately
(DomainBed's "training-domain validation" model selection). Batches carry the domain of
each image so that accuracy can be reported per domain
(:class:`vision_ft.metrics.PerDomainAccuracy`).

``write_domain_sample`` writes a tiny synthetic dataset in this layout (shape classes
rendered in three styles) for tests and offline demos.
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from ..errors import ConfigError, DataError
from .base import ClassificationData
from .labelled_images import FileSamples, ImageDataset

log = logging.getLogger("vision_ft")


class DomainFileSamples(FileSamples):
    """:class:`FileSamples` that also know the domain (an index) of every image."""

    def __init__(self, root: str | Path, paths: Sequence[str], labels: np.ndarray, domains: np.ndarray):
        super().__init__(root, paths, labels)
        self.domains = np.asarray(domains, dtype=np.int64)
        if len(self.domains) != len(self.keys):
            raise ValueError(f"{len(self.domains)} domain indices for {len(self.keys)} images")

    def subset(self, positions: Sequence[int]) -> "DomainFileSamples":
        positions = list(positions)
        return DomainFileSamples(self.root, [self.keys[p] for p in positions], self.labels[positions],
                                 self.domains[positions])


class DomainImageDataset(ImageDataset):
    """:class:`ImageDataset` whose items also hold ``"domain"``: int64 scalar, an index into
    the data module's ``domain_names``."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        item["domain"] = torch.tensor(int(self.samples.domains[i]), dtype=torch.int64)
        return item


def list_domains(root: str | Path) -> list[str]:
    """The domain folders of ``root``, sorted (DomainBed's environment order); hidden folders are ignored."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _class_folders(directory: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


class DomainFolderData(ClassificationData):
    """Multi-domain ImageFolder tree ``root/<domain>/<class>/<image>`` for domain generalisation.

    Leave-one-domain-out (DomainBed): train on ``train_domains`` (default: every domain
    not in ``test_domains``), test on ``test_domains``. Validation is carved from each
    training domain separately, ``val_fraction`` of its images with a seed that depends
    on ``seed`` and the domain's name only, so a domain's validation images do not change
    with the choice of test domain (DomainBed's ``holdout_fraction`` and per-environment
    ``seed_hash(trial_seed, env)``). Test-domain images never reach training or
    validation. ``shots`` draws k images per class from the pooled training domains.

    Domains are the sub-folders of ``root`` in sorted order (``domain_names``); batches
    carry ``"domain"``, int64 ``(B,)``, an index into ``domain_names``. Classes are the
    sorted union of the class folders of all domains, with the same index everywhere; a
    domain may lack some classes. Folders whose names start with ``.`` are ignored.

    Args:
        root: folder holding one sub-folder per domain (e.g. DomainBed's ``data/PACS``).
        test_domains: held-out domain(s), by folder name.
        train_domains: training domains; ``None`` = all domains not in ``test_domains``.
        val_fraction: share of each training domain held out for validation; default
            0.2, DomainBed's ``holdout_fraction`` (also PEGO's ``train_all.py``).
        (other arguments: :class:`ClassificationData`)
    """

    def __init__(self, root: str, test_domains: list[str], train_domains: list[str] | None = None,
                 val_fraction: float = 0.2, **kwargs):
        super().__init__(val_fraction=val_fraction, **kwargs)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"data.init_args.root: folder {self.root} does not exist (expected "
                            f"{self.root}/<domain>/<class>/<images>)")
        self.domain_names: list[str] = list_domains(self.root)
        if not self.domain_names:
            raise DataError(f"data.init_args.root: {self.root} has no domain folders (expected "
                            f"{self.root}/<domain>/<class>/<images>)")
        self.test_domains = self._check_domains(test_domains, "test_domains")
        if train_domains is None:
            self.train_domains = [d for d in self.domain_names if d not in self.test_domains]
            if not self.train_domains:
                raise ConfigError(f"data.init_args.test_domains holds every domain of {self.root} "
                                  f"({self.domain_names}); leave at least one out for training")
        else:
            self.train_domains = self._check_domains(train_domains, "train_domains")
            both = [d for d in self.train_domains if d in self.test_domains]
            if both:
                raise ConfigError(f"domain(s) {both} are in both data.init_args.train_domains and "
                                  f"data.init_args.test_domains; a test domain must not be trained on")

        classes = sorted({c for d in self.domain_names for c in _class_folders(self.root / d)})
        if not classes:
            raise DataError(f"no class folders in the domains of {self.root}: expected "
                            f"{self.root}/<domain>/<class>/<images> (data.init_args.root)")
        class_to_idx = {c: i for i, c in enumerate(classes)}
        self._lists = {"train": self._list(self.train_domains, class_to_idx, "train_domains"),
                       "test": self._list(self.test_domains, class_to_idx, "test_domains")}
        self._set_classes(len(classes), classes)

    def _check_domains(self, names: Sequence[str] | None, key: str) -> list[str]:
        """Known, de-duplicated, in ``domain_names`` order."""
        if names is None or isinstance(names, str) or len(names) == 0:
            raise ConfigError(f"data.init_args.{key} must be a non-empty list of domain names, got {names!r}; "
                              f"available domains in {self.root}: {self.domain_names}")
        unknown = [n for n in names if n not in self.domain_names]
        if unknown:
            raise ConfigError(f"data.init_args.{key}: unknown domain(s) {unknown}; available domains in "
                              f"{self.root}: {self.domain_names}")
        return [d for d in self.domain_names if d in set(names)]

    def _list(self, domains: list[str], class_to_idx: dict[str, int], key: str) -> DomainFileSamples:
        paths, labels, index = [], [], []
        for name in domains:
            directory = self.root / name
            found = make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
            if not found:
                raise DataError(f"domain {name!r} ({directory}) has no images with extensions {IMG_EXTENSIONS} in "
                                f"<class> sub-folders. Add images, remove the folder, or leave the domain out of "
                                f"data.init_args.{key}" + (" (set data.init_args.train_domains explicitly)"
                                                            if key == "train_domains" else ""))
            present = {c for _, c in found}
            missing = [c for c, i in class_to_idx.items() if i not in present]
            if missing:
                log.info("domain %r has no images of %d class(es): %s", name, len(missing), missing)
            d = self.domain_names.index(name)
            paths += [Path(p).relative_to(self.root).as_posix() for p, _ in found]
            labels += [c for _, c in found]
            index += [d] * len(found)
        return DomainFileSamples(self.root, paths, np.array(labels, dtype=np.int64), np.array(index, dtype=np.int64))

    # ---- ClassificationData hooks --------------------------------------------------------
    def _raw_split(self, split: str) -> DomainFileSamples | None:
        return self._lists.get(split)  # no stored "val": carved per training domain

    def _carve(self, pool: DomainFileSamples) -> tuple[DomainFileSamples, DomainFileSamples]:
        """``val_fraction`` of every training domain, drawn with ``(seed, CRC-32 of the domain name)``:
        stable whatever else is in ``root``."""
        keep, held = [], []
        for name in self.train_domains:
            d = self.domain_names.index(name)
            positions = np.flatnonzero(pool.domains == d)
            n = len(positions)
            n_val = max(1, int(round(n * self.val_fraction)))
            if n - n_val < 1:
                raise DataError(f"training domain {name!r} has {n} readable image(s): too few to hold out a "
                                f"validation share (data.init_args.val_fraction={self.val_fraction})")
            order = np.random.default_rng([self.seed, zlib.crc32(name.encode())]).permutation(n)
            held += positions[order[:n_val]].tolist()
            keep += positions[order[n_val:]].tolist()
            log.info("domain %r: %d training, %d validation images (val_fraction=%s, seed=%d)",
                     name, n - n_val, n_val, self.val_fraction, self.seed)
        return pool.subset(sorted(keep)), pool.subset(sorted(held))

    def _identity(self) -> dict:
        return {"name": f"{self.root.resolve().name}_{'+'.join(self.train_domains)}", "type": "DomainFolderData",
                "source": str(self.root.resolve()), "train_domains": self.train_domains,
                "test_domains": self.test_domains}

    def dataset(self, split: Literal["train", "val", "test"]) -> DomainImageDataset:
        """The torch dataset of a split; items also hold ``"domain"``."""
        return DomainImageDataset(self._split(split), self.image_size, flip=self.augment and split == "train")


# ---- synthetic sample ---------------------------------------------------------------------------
_SUPERSAMPLE = 4
_STYLES = ("photo", "sketch", "cartoon")
_SHAPES = ("circle", "square", "triangle")


def _shape_mask(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean ``n×n`` mask of a circle, square or upright triangle at a random place, size and tilt."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
    cx, cy = rng.uniform(0.38, 0.62, size=2) * n
    r = rng.uniform(0.2, 0.3) * n
    tilt = np.deg2rad(rng.uniform(-12, 12))
    x, y = xx - cx, yy - cy
    u, v = np.cos(tilt) * x + np.sin(tilt) * y, -np.sin(tilt) * x + np.cos(tilt) * y
    if kind == "circle":
        return u * u + v * v <= r * r
    if kind == "square":
        half = 0.85 * r
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if kind == "triangle":  # equilateral, apex up; inside = on the inner side of all three edges
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        px, py = 1.15 * r * np.cos(angles), 1.15 * r * np.sin(angles)
        inside = np.ones_like(u, dtype=bool)
        for i in range(3):
            ax, ay, bx, by = px[i], py[i], px[(i + 1) % 3], py[(i + 1) % 3]
            inside &= (bx - ax) * (v - ay) - (by - ay) * (u - ax) >= 0
        return inside
    raise ValueError(f"unknown shape {kind!r}: the sample draws {list(_SHAPES)}")


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The band of ``mask`` within ``width`` pixels of its border (4-neighbour erosion)."""
    eroded = mask.copy()
    for _ in range(width):
        shrunk = eroded.copy()
        shrunk[1:] &= eroded[:-1]
        shrunk[:-1] &= eroded[1:]
        shrunk[:, 1:] &= eroded[:, :-1]
        shrunk[:, :-1] &= eroded[:, 1:]
        eroded = shrunk
    return mask & ~eroded


def _smooth_noise(n: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random ``cells×cells`` grid, bilinearly upsampled."""
    grid = rng.random((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((n, n), Image.BILINEAR), dtype=np.float32)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    rgb = Image.new("HSV", (1, 1), (int(h * 255) % 256, int(s * 255), int(v * 255))).convert("RGB")
    return np.asarray(rgb, dtype=np.float32)[0, 0] / 255.0


def _render(style: str, kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``size×size×3`` uint8 image of shape ``kind`` drawn in ``style``."""
    n = size * _SUPERSAMPLE
    mask = _shape_mask(kind, n, rng)
    m = mask[..., None].astype(np.float32)
    if style == "photo":  # natural-ish: textured, shaded background and object
        value = rng.uniform(0.35, 0.65)
        base = _hsv(rng.uniform(0.05, 0.35), rng.uniform(0.2, 0.5), value)
        background = base * (0.75 + 0.5 * _smooth_noise(n, 6, rng)[..., None])
        contrast = rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.35)  # object lighter or darker than the ground
        fill = _hsv(rng.random(), rng.uniform(0.3, 0.7), float(np.clip(value + contrast, 0.05, 1.0)))
        light = np.linspace(1.15, 0.75, n, dtype=np.float32)[:, None, None]  # lit from above
        light = light * (0.85 + 0.3 * _smooth_noise(n, 3, rng)[..., None])
        image = background * (1 - m) + fill * light * m
    elif style == "sketch":  # dark pencil outline on white paper
        line = _outline(mask, width=rng.integers(1, 3) * _SUPERSAMPLE // 2 + 2)[..., None].astype(np.float32)
        ink = rng.uniform(0.0, 0.3)
        paper = rng.uniform(0.92, 1.0)
        image = np.full((n, n, 3), paper, dtype=np.float32) * (1 - line) + ink * line
    elif style == "cartoon":  # flat saturated colours with a thick black outline
        hue = rng.random()
        background = _hsv(hue, rng.uniform(0.8, 1.0), rng.uniform(0.85, 1.0))
        fill = _hsv(hue + rng.uniform(0.3, 0.7), rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0))
        line = _outline(mask, width=3 * _SUPERSAMPLE // 2)[..., None].astype(np.float32)
        image = (background * (1 - m) + fill * m) * (1 - line)
    else:
        raise ValueError(f"unknown style {style!r}: the sample draws {list(_STYLES)}")
    small = Image.fromarray(np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)).resize(
        (size, size), Image.BOX)
    out = np.asarray(small, dtype=np.float32)
    noise = {"photo": 10.0, "sketch": 4.0, "cartoon": 2.0}[style]
    out = out + rng.normal(0.0, noise, out.shape)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def write_domain_sample(root: str | Path, domains: Sequence[str] = ("photo", "sketch", "cartoon"),
                        classes: Sequence[str] = ("circle", "square", "triangle"), per_class: int = 20,
                        size: int = 32, seed: int = 0) -> Path:
    """Write a tiny SYNTHETIC domain-generalisation dataset ``root/<domain>/<class>/<i>.png``.

    The class is the shape (``classes`` is a subset of ``circle``, ``square``, ``triangle``;
    random place, size and tilt); the domain is the rendering style: ``photo`` (shaded
    object on a textured background, sensor noise), ``sketch`` (thin dark outline on
    white), ``cartoon`` (flat saturated colours, thick black outline). The shapes are shared, so the task is
    learnable across domains, while the image statistics differ strongly between domains
    (a real domain shift). A domain name that is not one of the three styles is drawn in
    style ``_STYLES[i % 3]`` for the i-th domain. Deterministic: the same arguments
    give the same bytes. Returns ``root``.
    """
    if per_class < 1 or size < 8:
        raise ValueError(f"per_class must be >= 1 and size >= 8, got per_class={per_class}, size={size}")
    unknown = [c for c in classes if c not in _SHAPES]
    if unknown:
        raise ValueError(f"unknown shape class(es) {unknown}: the sample draws {list(_SHAPES)}")
    root = Path(root)
    for d, domain in enumerate(domains):
        style = domain if domain in _STYLES else _STYLES[d % len(_STYLES)]
        for c, name in enumerate(classes):
            folder = root / domain / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([seed, d, c, i])
                Image.fromarray(_render(style, name, size, rng)).save(folder / f"{i:04d}.png")
    return root


if __name__ == "__main__":  # python -m vision_ft.data.domain_generalisation OUT [--per-class N] [--size S] [--seed K]
    import argparse

    parser = argparse.ArgumentParser(description=write_domain_sample.__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    print(write_domain_sample(a.out, per_class=a.per_class, size=a.size, seed=a.seed))
