"""The transfer testbed's images: filled and hollow shapes, drawn by a seeded generator.

Source task: ``circle square triangle cross`` drawn filled. Target task: the same
primitives drawn hollow (``ring frame hollow_triangle``) and the cross turned by
45° (``x_cross``): new classes whose parts (edges, corners, curvature) the source
features already see, with a different label rule (outline vs area).

Each image: one shape of random size (radius 25-40% of the image side), centre,
rotation jitter (±15°), colour and a darker background colour (luminance at least
0.3 below), over faint random stripes, with Gaussian pixel noise; rendered at 2x and
averaged down (anti-aliased). Shapes are always brighter than their background: with
both polarities a small ViT trained from scratch for a minute learns the source task
far less reliably.
Everything follows from the seed, so a split is the same on every machine.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: bump when the drawing changes: cached source checkpoints are keyed by it
GENERATOR_VERSION = 1

SOURCE_CLASSES = ("circle", "square", "triangle", "cross")
TARGET_CLASSES = ("ring", "frame", "hollow_triangle", "x_cross")

_HOLE = 0.55  # inner size of hollow shapes, relative to the outer
STRIPES = 0.05  # amplitude of the background stripes
CONTRAST = 0.3  # minimum luminance of the shape above the background's
RADIUS = (0.25, 0.4)  # shape radius, fraction of the image side
NOISE = 0.03  # pixel noise standard deviation


def _filled(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in local coordinates (radius ~1)."""
    if kind == "circle":
        return u * u + v * v <= 1.0
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if kind == "triangle":  # equilateral, circumradius 1, inradius 0.5
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = math.pi / 2 + 2 * math.pi * k / 3
            inside &= (u * math.cos(a) + v * math.sin(a)) >= -0.5
        return inside
    if kind == "cross":
        arm = 0.3
        return ((np.abs(u) <= arm) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1.0))
    raise KeyError(kind)


_DRAW = {  # class -> (primitive, hollow, extra rotation)
    "circle": ("circle", False, 0.0), "square": ("square", False, 0.0),
    "triangle": ("triangle", False, 0.0), "cross": ("cross", False, 0.0),
    "ring": ("circle", True, 0.0), "frame": ("square", True, 0.0),
    "hollow_triangle": ("triangle", True, 0.0), "x_cross": ("cross", False, math.pi / 4),
}


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def render(classes: tuple[str, ...], n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (float (n,3,size,size) in [0,1]) with balanced labels (index into ``classes``)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(classes)
    rng.shuffle(labels)
    hi = 2 * size
    grid = (np.arange(hi) + 0.5) / hi  # pixel centres in [0, 1]
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    images = np.empty((n, 3, size, size), dtype=np.float32)
    for i, label in enumerate(labels):
        kind, hollow, turn = _DRAW[classes[label]]
        radius = rng.uniform(*RADIUS)
        cx, cy = rng.uniform(radius, 1 - radius, size=2)
        theta = turn + rng.uniform(-math.pi / 12, math.pi / 12)
        fg = rng.uniform(0, 1, 3)
        bg = rng.uniform(0, 1, 3)
        while _luminance(fg) - _luminance(bg) < CONTRAST:  # shapes are brighter than the background
            fg, bg = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        dx, dy = (xs - cx) / radius, (ys - cy) / radius
        c, s = math.cos(theta), math.sin(theta)
        u, v = c * dx + s * dy, -s * dx + c * dy
        mask = _filled(kind, u, v)
        if hollow:
            mask &= ~_filled(kind, u / _HOLE, v / _HOLE)
        stripe_angle, stripe_freq = rng.uniform(0, math.pi), rng.uniform(3, 9)
        stripes = STRIPES * np.sin(2 * math.pi * stripe_freq * (xs * math.cos(stripe_angle) + ys * math.sin(stripe_angle)))
        img = np.where(mask[None], fg[:, None, None], bg[:, None, None] + stripes[None])
        img = img.reshape(3, size, 2, size, 2).mean(axis=(2, 4))
        img = img + rng.normal(0, NOISE, img.shape)
        images[i] = np.clip(img, 0, 1)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def write_samples(path: str, classes: tuple[str, ...], size: int = 32, per_class: int = 4, seed: int = 0) -> str:
    """A PNG grid of examples per class (rows = classes), to see what a task looks like."""
    from ..plots import _save, plt

    images, labels = render(classes, per_class * len(classes) * 3, size, seed)
    fig, axes = plt.subplots(len(classes), per_class, figsize=(1.2 * per_class, 1.2 * len(classes)), squeeze=False)
    for row, name in enumerate(classes):
        picks = (labels == row).nonzero().flatten()[:per_class]
        for col, idx in enumerate(picks.tolist()):
            axes[row][col].imshow(images[idx].permute(1, 2, 0).numpy())
        for col in range(per_class):
            axes[row][col].set_xticks([])
            axes[row][col].set_yticks([])
        axes[row][0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    return str(_save(fig, path))
