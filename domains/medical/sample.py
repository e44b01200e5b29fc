"""Deterministic generator of a small SYNTHETIC dataset in MedMNIST ``.npz`` format.

This is not medical data. It exists so the medical pack trains offline, end to end,
on a fresh machine. The four classes mimic, loosely, what a histology patch might
show, and differ strongly in low-level statistics so even a randomly initialised
small ViT with a linear head learns them:

- ``normal``: smooth pink tissue-like texture only;
- ``lesion``: one bright round blob (random position, radius, colour);
- ``fibrosis``: dark oriented stripes (random angle, period, phase);
- ``calcification``: many small bright specks.

All with colour jitter and pixel noise. Same arguments → same bytes (the zip is
written with fixed timestamps). Run ``python -m domains.medical.sample OUT.npz``.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np

from vision_ft.io import atomic_write_bytes

CLASS_NAMES = ["normal", "lesion", "fibrosis", "calcification"]


def _tissue(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """Smooth pink background: a base colour modulated by a few low-frequency waves."""
    colour = np.array([0.86, 0.58, 0.70]) + rng.normal(0.0, 0.04, 3)
    field = np.zeros_like(xx)
    for _ in range(3):
        k = rng.uniform(0.5, 1.5, 2) * 2 * np.pi / size * rng.choice([-1, 1], 2)
        field += rng.uniform(0.02, 0.05) * np.sin(k[0] * xx + k[1] * yy + rng.uniform(0, 2 * np.pi))
    return colour[None, None, :] * (1.0 + field[..., None])


def _image(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = _tissue(rng, yy, xx, size)
    scale = size / 28.0
    if label == 1:  # lesion: one bright round blob with a soft edge
        r = rng.uniform(4.0, 7.0) * scale
        cy, cx = rng.uniform(r, size - r, 2)
        mask = np.clip((r - np.hypot(yy - cy, xx - cx)) / (1.5 * scale) + 0.5, 0.0, 1.0)[..., None]
        colour = np.clip(np.array([0.98, 0.92, 0.72]) + rng.normal(0.0, 0.03, 3), 0, 1)
        img = img * (1 - mask) + colour * mask
    elif label == 2:  # fibrosis: oriented dark stripes
        theta, period = rng.uniform(0, np.pi), rng.uniform(4.0, 7.0) * scale
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period
                                  + rng.uniform(0, 2 * np.pi))
        amp = rng.uniform(0.5, 0.8)
        colour = np.array([0.45, 0.22, 0.50]) + rng.normal(0.0, 0.03, 3)
        img = img * (1 - amp * wave[..., None]) + colour * amp * wave[..., None]
    elif label == 3:  # calcification: many small bright specks
        side = max(2, int(round(2 * scale)))
        for y, x in rng.integers(1, size - 1 - side, (rng.integers(15, 30), 2)):
            img[y:y + side, x:x + side] = np.clip(1.0 - rng.uniform(0, 0.06, 3), 0, 1)
    img = img + rng.normal(0.0, 0.03, img.shape)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def make_split(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` balanced, shuffled samples: images ``(n, size, size, 3)`` uint8, labels ``(n, 1)`` uint8."""
    labels = rng.permutation(np.arange(n) % len(CLASS_NAMES)).astype(np.uint8)
    images = np.stack([_image(int(y), rng, size) for y in labels]) if n else np.zeros((0, size, size, 3), np.uint8)
    return images, labels[:, None]


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` (deflated zip of ``.npy``) with fixed timestamps, so identical input → identical bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def write_sample(path: str | Path, n_train: int = 800, n_val: int = 200, n_test: int = 200, size: int = 28,
                 seed: int = 0) -> Path:
    """Write the synthetic sample to ``path`` (atomically: safe if several processes do it at once)."""
    path = Path(path)
    arrays = {}
    for i, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        images, labels = make_split(n, size, np.random.default_rng([seed, i]))
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return atomic_write_bytes(path, _npz_bytes(arrays))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the SYNTHETIC medical sample (MedMNIST .npz format).")
    parser.add_argument("out", help="output .npz path")
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    out = write_sample(a.out, a.n_train, a.n_val, a.n_test, a.size, a.seed)
    print(f"wrote {out}: synthetic, not medical data; classes {CLASS_NAMES}")


if __name__ == "__main__":
    main()
