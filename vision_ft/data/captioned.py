"""Captioned images for text-to-image fine-tuning, in the layouts diffusers and kohya users already have.

A split folder holds images and their captions either in ``metadata.jsonl`` (one JSON object per line with
``file_name`` and ``text``: the Hugging Face ``imagefolder`` convention the diffusers training scripts read)
or as a ``.txt`` file beside each image (``0001.png`` + ``0001.txt``). ``root`` is one such folder (the
validation images are then carved out of it), or holds ``train/`` and optionally ``val/`` and ``test/``.

Images are resized so the shorter side is ``image_size`` and centre-cropped to a square (the diffusers
scripts' ``--center_crop``); ``flip`` mirrors training images at random. Batches:
``{"image": float32 (B, 3, S, S) in [0, 1], "caption": list[str]}``.

Bad input is handled like the classification data (``on_corrupt``): an unreadable image, a missing caption,
an empty caption file, a metadata line that is not JSON or lacks a key, or a listed file that does not
exist are skipped with a count and the paths in the log (``skip``), or stop the run with an error naming the
file (``error``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .base import SplitLoaders
from .labelled_images import pil_to_array, to_tensor

log = logging.getLogger("vision_ft")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
METADATA = "metadata.jsonl"


@dataclass
class Captioned:
    """One image file and its caption."""

    path: Path
    caption: str


def read_folder(folder: Path) -> tuple[list[Captioned], list[str]]:
    """The captioned images of one split folder, and what is wrong with the others (one line each)."""
    problems: list[str] = []
    items: list[Captioned] = []
    meta = folder / METADATA
    if meta.is_file():
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{meta}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: not JSON ({e.msg})")
                continue
            if not isinstance(row, dict) or "file_name" not in row:
                problems.append(f"{where}: no 'file_name'")
                continue
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                problems.append(f"{where}: missing or empty 'text' for {row['file_name']}")
                continue
            path = folder / str(row["file_name"])
            if not path.is_file():
                problems.append(f"{where}: {path} does not exist")
                continue
            items.append(Captioned(path, text.strip()))
        return items, problems
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            problems.append(f"{path}: no caption ({txt.name} missing and no {METADATA} in {folder})")
            continue
        text = txt.read_text(encoding="utf-8", errors="replace").strip()
        if not text:
            problems.append(f"{txt}: empty caption file")
            continue
        items.append(Captioned(path, text))
    return items, problems


def load_square(path: Path, size: int) -> torch.Tensor:
    """An image file -> float32 (3, size, size) in [0, 1]: shorter side resized to ``size``, centre crop."""
    with Image.open(path) as img:
        arr = pil_to_array(img)
    h, w = arr.shape[:2]
    x = _as_tensor(arr)
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top:top + size, left:left + size].clamp(0.0, 1.0).contiguous()


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    """``H x W x C`` array -> (3, H, W) float in [0, 1] at its own size (gray expanded, alpha dropped)."""
    h, w = arr.shape[:2]
    if h == w:
        return to_tensor(arr, h)
    x = torch.from_numpy(arr.astype(np.float32))
    x = x / (255.0 if arr.dtype == np.uint8 else 65535.0 if arr.dtype == np.uint16 else 1.0)
    x = x.permute(2, 0, 1)
    return x[:1].expand(3, -1, -1) if x.shape[0] in (1, 2) else x[:3]


class CaptionedImageDataset(Dataset):
    def __init__(self, items: list[Captioned], image_size: int, flip: bool = False):
        self.items, self.image_size, self.flip = items, int(image_size), flip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image = load_square(self.items[i].path, self.image_size)
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"image": image, "caption": self.items[i].caption}


class CaptionedImageData(SplitLoaders, L.LightningDataModule):
    """Captioned image folders (``metadata.jsonl`` or ``.txt`` captions) for text-to-image tasks.

    Args:
        root: a split folder, or a folder with ``train/`` (and optionally ``val/``, ``test/``).
        image_size: square training resolution (shorter side resized, centre crop).
        batch_size: images per batch (per device).
        flip: random horizontal flip of training images.
        on_corrupt: ``skip`` bad samples (counted, paths logged, kept in ``self.skipped``) or ``error``.
        val_fraction: share of the training images held out for validation when there is no ``val/``.
        num_workers: dataloader worker processes.
        seed: seed of the validation carve and the training shuffle.
    """

    def __init__(self, root: str, image_size: int = 512, batch_size: int = 4, flip: bool = False,
                 on_corrupt: Literal["skip", "error"] = "skip", val_fraction: float = 0.1, num_workers: int = 0,
                 seed: int = 0) -> None:
        super().__init__()
        if on_corrupt not in ("skip", "error"):
            raise ConfigError(f"data.init_args.on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
        for key, value, low in (("batch_size", batch_size, 1), ("image_size", image_size, 8),
                                ("num_workers", num_workers, 0)):
            if int(value) < low:
                raise ConfigError(f"data.init_args.{key} must be >= {low}, got {value}")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.init_args.val_fraction must be in (0, 1), got {val_fraction}")
        self.root = Path(root).expanduser()
        self.image_size, self.batch_size, self.flip = int(image_size), int(batch_size), bool(flip)
        self.on_corrupt, self.val_fraction = on_corrupt, float(val_fraction)
        self.num_workers, self.seed = int(num_workers), int(seed)
        self.skipped: list[str] = []
        self._splits: dict[str, list[Captioned]] = {}

    def _folder(self, split: str) -> Path | None:
        if not self.root.is_dir():
            raise DataError(f"data.init_args.root={str(self.root)!r} is not a folder")
        sub = self.root / split
        if sub.is_dir():
            return sub
        if split == "train" and not (self.root / "val").is_dir():
            return self.root
        return None

    def _read(self, split: str) -> list[Captioned] | None:
        folder = self._folder(split)
        if folder is None:
            return None
        items, problems = read_folder(folder)
        bad = [it for it in items if _unreadable(it.path)]
        problems += [f"{it.path}: unreadable image ({_unreadable(it.path)})" for it in bad]
        if problems and self.on_corrupt == "error":
            raise DataError(f"{problems[0]}. Fix or remove it, or set data.init_args.on_corrupt=skip to skip such "
                            f"samples ({len(problems)} problem(s) in {folder})")
        if problems:
            self.skipped.extend(problems)
            log.warning("skipped %d bad sample(s) in %s (data.init_args.on_corrupt=skip):\n  %s", len(problems),
                        folder, "\n  ".join(problems))
        bad_paths = {it.path for it in bad}
        return [it for it in items if it.path not in bad_paths]

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        train = self._read("train")
        if not train:
            raise DataError(f"no captioned images in {self.root} (expected images with {METADATA} or .txt captions)")
        val = self._read("val")
        if val is None:
            n_val = max(1, round(len(train) * self.val_fraction))
            if len(train) - n_val < 1:
                raise DataError(f"cannot hold out a validation split from {len(train)} image(s); add a val/ folder")
            order = np.random.default_rng(self.seed).permutation(len(train))
            val = [train[i] for i in sorted(order[:n_val])]
            train = [train[i] for i in sorted(order[n_val:])]
        test = self._read("test")
        self._splits = {"train": train, "val": val, "test": test if test is not None else val}

    def captions(self, split: str = "train") -> list[str]:
        self.setup()
        return [it.caption for it in self._splits[split]]

    def dataset(self, split: str) -> CaptionedImageDataset:
        self.setup()
        return CaptionedImageDataset(self._splits[split], self.image_size, flip=self.flip and split == "train")


def _unreadable(path: Path) -> str | None:
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as e:  # noqa: BLE001 - any decode failure means unreadable
        return f"{type(e).__name__}: {e}"
    return None
