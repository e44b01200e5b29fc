"""Labelled images: an indexable list of images with their labels (:class:`Samples`), as files on
disk (:class:`FileSamples`) or as an array (:class:`ArraySamples`), and their decoding to tensors.

(The file is named for what it holds: elsewhere "sample" means the synthetic data a pack's
``sample.py`` generates, or an example drawn by few-shot sampling.)

Both kinds expose one small surface (``labels``, ``keys``, ``read``, ``sha1``,
``unreadable``, ``subset``) so splitting, corrupt checks, few-shot sampling and
hashing are written once in :mod:`vision_ft.data.base`. Every image, whatever its
mode (grayscale, RGBA, palette, 16-bit), becomes a float32 ``(3, S, S)`` tensor in
``[0, 1]``; normalisation is the model's job.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def pil_to_array(img: Image.Image) -> np.ndarray:
    """Decode a PIL image of any mode to an ``H×W×C`` array (C = 1 or 3) in its own dtype.

    16-bit grayscale stays ``uint16`` (scaled by :func:`to_tensor`), alpha is dropped,
    palette and CMYK images are converted to RGB.
    """
    if img.mode in _SIXTEEN_BIT:
        return np.clip(np.asarray(img, dtype=np.int64), 0, 65535).astype(np.uint16)[..., None]
    if img.mode == "F":
        return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)[..., None]
    if img.mode == "L":
        return np.asarray(img)[..., None]
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"))


def to_tensor(arr: np.ndarray, size: int) -> torch.Tensor:
    """``H×W`` or ``H×W×C`` array (uint8, uint16, bool or float in [0, 1]) → float32 ``(3, size, size)``."""
    if arr.ndim == 2:
        arr = arr[..., None]
    x = torch.from_numpy(arr.astype(np.float32))  # a copy: PIL/npz arrays may be read-only
    if arr.dtype == np.uint8:
        x = x.div_(255.0)
    elif arr.dtype == np.uint16:
        x = x.div_(65535.0)
    else:
        x = x.clamp_(0.0, 1.0)
    x = x.permute(2, 0, 1)
    channels = x.shape[0]
    if channels in (1, 2):  # gray, gray + alpha
        x = x[:1].expand(3, -1, -1)
    elif channels > 3:  # RGBA: drop alpha
        x = x[:3]
    if tuple(x.shape[1:]) != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        x = x.clamp_(0.0, 1.0)
    return x.contiguous()


class Samples:
    """Base: ``labels`` is ``(N,)`` int64 (single-label) or ``(N, L)`` float32 of 0/1 (multi-label);
    ``keys`` identify each sample in split files (relative path or array index)."""

    labels: np.ndarray
    keys: list

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def sha1(self, i: int) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self, i: int) -> str:
        return str(self.keys[i])

    def unreadable(self) -> dict[int, str]:
        """Positions of samples that cannot be decoded, with the reason."""
        return {}

    def subset(self, positions: Sequence[int]) -> "Samples":  # pragma: no cover - interface
        raise NotImplementedError


class FileSamples(Samples):
    """Image files under ``root``; ``keys`` are the paths as given (relative to ``root`` or absolute)."""

    def __init__(self, root: str | Path, paths: Sequence[str], labels: np.ndarray):
        self.root = Path(root)
        self.keys = list(paths)
        self.labels = np.asarray(labels)

    def path(self, i: int) -> Path:
        return self.root / self.keys[i]

    def describe(self, i: int) -> str:
        return str(self.path(i))

    def read(self, i: int) -> np.ndarray:
        with Image.open(self.path(i)) as img:
            return pil_to_array(img)

    def sha1(self, i: int) -> str:
        return hashlib.sha1(self.path(i).read_bytes()).hexdigest()

    def _check(self, i: int) -> str | None:
        try:
            with Image.open(self.path(i)) as img:
                img.load()
        except Exception as e:  # noqa: BLE001 - any decode failure means unreadable
            return f"{type(e).__name__}: {e}"
        return None

    def unreadable(self) -> dict[int, str]:
        """Open and fully decode every file (threads: PIL releases the GIL while decoding)."""
        n = len(self.keys)
        if n > 64:
            with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
                reasons = list(pool.map(self._check, range(n), chunksize=32))
        else:
            reasons = [self._check(i) for i in range(n)]
        return {i: r for i, r in enumerate(reasons) if r is not None}

    def subset(self, positions: Sequence[int]) -> "FileSamples":
        positions = list(positions)
        return FileSamples(self.root, [self.keys[p] for p in positions], self.labels[positions])


class ArraySamples(Samples):
    """Images in an ``(N, H, W[, C])`` array; ``keys`` are indices into the original split."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, keys: Sequence[int] | None = None, source: str = ""):
        self.images = images
        self.labels = np.asarray(labels)
        self.keys = list(range(len(images))) if keys is None else [int(k) for k in keys]
        self.source = source

    def _row(self, i: int) -> np.ndarray:
        return self.images[self.keys[i]]

    def describe(self, i: int) -> str:
        return f"{self.source}[{self.keys[i]}]"

    def read(self, i: int) -> np.ndarray:
        return self._row(i)

    def sha1(self, i: int) -> str:
        return hashlib.sha1(np.ascontiguousarray(self._row(i)).tobytes()).hexdigest()

    def subset(self, positions: Sequence[int]) -> "ArraySamples":
        positions = list(positions)
        return ArraySamples(self.images, self.labels[positions], [self.keys[p] for p in positions], self.source)


class ImageDataset(Dataset):
    """Torch dataset over :class:`Samples` yielding ``{"image": (3,S,S) float32, "label": ...}``."""

    def __init__(self, samples: Samples, image_size: int, flip: bool = False):
        self.samples = samples
        self.image_size = image_size
        self.flip = flip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = to_tensor(self.samples.read(i), self.image_size)
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        label = self.samples.labels[i]
        if np.ndim(label):
            target = torch.as_tensor(np.asarray(label, dtype=np.float32))
        else:
            target = torch.tensor(int(label), dtype=torch.int64)
        return {"image": image, "label": target}
