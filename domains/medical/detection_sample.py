"""Deterministic generator of a small SYNTHETIC endoscopy-like detection dataset in COCO format.

This is not medical data. It exists so the medical detection config trains offline, end
to end, on a fresh machine, and it writes exactly what the real datasets ship after
conversion (Kvasir-SEG / Kvasir-Instrument boxes, see ``datasets_cards/``): PNG images
plus COCO ``instances_{train,val}.json`` files.

What the images show, loosely: a reddish mucosa-like background inside the round field
of view of an endoscope, with

- ``polyp`` (category id **3**): one or two raised, shaded, pinkish ellipses;
- ``instrument`` (category id **7**): a grey metallic bar entering from the border.

The category ids are deliberately non-contiguous (3 and 7) so every run exercises the
id → contiguous index → id remapping that custom COCO data needs. About one image in
eight has no object at all (an image entry without annotations, which COCO allows).
Boxes are the tight pixel extents of the drawn shapes (a polyp may cover part of an
instrument; the instrument's box keeps its full drawn extent); ``area`` is the shape's pixel
count, as COCO records the mask area rather than the box area.

Same arguments → same bytes. Run ``python -m domains.medical.detection_sample OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from vision_ft.io import atomic_dir

#: COCO categories of the sample: ids 3 and 7 on purpose (non-contiguous).
CATEGORIES = [
    {"id": 3, "name": "polyp", "supercategory": "lesion"},
    {"id": 7, "name": "instrument", "supercategory": "tool"},
]
CLASS_NAMES = [c["name"] for c in CATEGORIES]
SPLITS = ("train", "val")


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """Reddish mucosa with low-frequency folds, vignetted inside a round field of view."""
    base = np.array([0.72, 0.30, 0.26]) + rng.normal(0.0, 0.03, 3)
    field = np.zeros_like(xx)
    for _ in range(3):
        k = rng.uniform(0.6, 2.0, 2) * 2 * np.pi / size * rng.choice([-1, 1], 2)
        field += rng.uniform(0.04, 0.08) * np.sin(k[0] * xx + k[1] * yy + rng.uniform(0, 2 * np.pi))
    img = base[None, None, :] * (1.0 + field[..., None])
    c = (size - 1) / 2.0
    r = np.hypot(yy - c, xx - c) / (0.72 * size)
    img *= np.clip(1.15 - 0.9 * r ** 2, 0.25, 1.0)[..., None]
    return img


def _polyp(img: np.ndarray, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
           size: int) -> tuple[list[float], int] | None:
    """A shaded ellipse; returns its tight box [x, y, w, h] and pixel area."""
    ry, rx = rng.uniform(0.07, 0.16, 2) * size
    cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
    d = u ** 2 + v ** 2
    mask = d <= 1.0
    if mask.sum() < 9:
        return None
    colour = np.clip(np.array([0.95, 0.55, 0.55]) + rng.normal(0.0, 0.04, 3), 0, 1)
    shade = (1.05 - 0.35 * d)[..., None] * (1.0 + 0.25 * np.clip(-u - v, -1, 1))[..., None] * 0.8
    img[mask] = (colour[None, None, :] * shade)[mask]
    spot = (u + 0.35) ** 2 + (v + 0.35) ** 2 < 0.03  # specular highlight
    img[spot & mask] = 0.97
    return _box_of(mask)


def _instrument(img: np.ndarray, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
                size: int) -> tuple[list[float], int] | None:
    """A grey bar from the image border towards the centre, with a darker tip."""
    angle = rng.uniform(0, 2 * np.pi)
    ex, ey = (size - 1) / 2 * (1 + np.cos(angle) * 1.1), (size - 1) / 2 * (1 + np.sin(angle) * 1.1)
    length = rng.uniform(0.35, 0.6) * size
    half_width = rng.uniform(0.035, 0.06) * size
    direction = np.array([np.cos(angle + np.pi), np.sin(angle + np.pi)]) + rng.normal(0, 0.15, 2)
    direction /= np.linalg.norm(direction)
    px, py = xx - ex, yy - ey
    along = px * direction[0] + py * direction[1]
    across = -px * direction[1] + py * direction[0]
    mask = (along >= 0) & (along <= length) & (np.abs(across) <= half_width)
    if mask.sum() < 9:
        return None
    metal = 0.55 + 0.35 * np.cos(across / half_width * np.pi / 2)  # cylindrical shading
    grey = np.stack([metal * 0.92, metal * 0.95, metal], -1) * rng.uniform(0.85, 1.05)
    img[mask] = grey[mask]
    tip = mask & (along > length - 2.5 * half_width)
    img[tip] *= 0.45
    return _box_of(mask)


def _box_of(mask: np.ndarray) -> tuple[list[float], int]:
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], int(mask.sum())


def make_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[int, list[float], int]]]:
    """One image (uint8 ``size×size×3``) and its objects as ``(category_id, bbox_xywh, area)``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = _background(rng, yy, xx, size)
    objects: list[tuple[int, list[float], int]] = []
    kind = rng.random()
    if kind >= 0.125:  # 1 in 8 images stays empty
        n_polyps = int(rng.choice([0, 1, 1, 2]))
        with_instrument = kind < 0.55 or n_polyps == 0
        if with_instrument:
            drawn = _instrument(img, rng, yy, xx, size)
            if drawn:
                objects.append((7, *drawn))
        for _ in range(n_polyps):  # polyps drawn last: an instrument may pass behind them
            drawn = _polyp(img, rng, yy, xx, size)
            if drawn:
                objects.append((3, *drawn))
    img = img + rng.normal(0.0, 0.02, img.shape)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), objects


def write_split(root: Path, split: str, n: int, size: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        pixels, objects = make_image(rng, size)
        name = f"{split}_{i:04d}.png"
        Image.fromarray(pixels).save(image_dir / name, optimize=False)
        image_id = 1000 + i  # ids need not start at 0 or 1 in COCO files
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        for category_id, bbox, area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": [round(v, 2) for v in bbox], "area": area, "iscrowd": 0})
    return {
        "info": {"description": "SYNTHETIC endoscopy-like detection sample (not medical data)", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def write_detection_sample(out_dir: str | Path, n_train: int = 128, n_val: int = 32, size: int = 128,
                           seed: int = 0) -> Path:
    """Write ``images/{train,val}/*.png`` and ``annotations/instances_{train,val}.json`` under ``out_dir``.

    Written into a temporary folder and renamed into place, so concurrent callers never see a
    half-written sample. An existing complete ``out_dir`` is left as it is.
    """
    out_dir = Path(out_dir)
    if (out_dir / "annotations" / "instances_val.json").is_file():
        return out_dir
    # a finished out_dir (another process was first) is kept; a non-empty unfinished one is an error
    with atomic_dir(out_dir, complete=lambda d: (d / "annotations" / "instances_val.json").is_file()) as tmp:
        for split, n in (("train", n_train), ("val", n_val)):
            dataset = write_split(tmp, split, n, size, seed)
            (tmp / "annotations").mkdir(exist_ok=True)
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(dataset, indent=1) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the SYNTHETIC medical detection sample (COCO format).")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    out = write_detection_sample(a.out, a.n_train, a.n_val, a.size, a.seed)
    print(f"wrote {out}: synthetic, not medical data; categories "
          f"{[(c['id'], c['name']) for c in CATEGORIES]} (non-contiguous ids on purpose)")


if __name__ == "__main__":
    main()
