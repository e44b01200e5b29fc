"""The embedded SYNTHETIC sample: class folders of generated PNGs (``train/``, ``val/``, ``test/``).

Two classes a small model tells apart in a few epochs: a bright disc or a bright ring on noise.
Replace this generator with one that writes your dataset's real on-disk format (same layout, same
file type, plausible sizes), so the pack runs offline on the format it will read for real.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vision_ft.io import atomic_dir

CLASS_NAMES = ("disc", "ring")
SPLITS = {"train": 48, "val": 12, "test": 12}  # images per class


def _image(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    r = np.hypot(yy - cy, xx - cx) / size
    radius = rng.uniform(0.15, 0.25)
    shape = r < radius if label == 0 else np.abs(r - radius) < 0.04
    image = 0.25 * rng.random((size, size)) + 0.6 * shape
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def is_complete(root: Path) -> bool:
    return all((Path(root) / split / name).is_dir() for split in SPLITS for name in CLASS_NAMES)


def write_sample(root: str | Path, size: int = 32, seed: int = 0) -> Path:
    """Write the sample under ``root`` (once: built in a temporary folder and renamed into place, so
    several processes may call this at the same time)."""
    root = Path(root)
    with atomic_dir(root, complete=is_complete) as tmp:
        rng = np.random.default_rng(seed)
        for split, per_class in SPLITS.items():
            for label, name in enumerate(CLASS_NAMES):
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for i in range(per_class):
                    Image.fromarray(_image(label, rng, size)).save(folder / f"{split}_{i:03d}.png")
    return root
