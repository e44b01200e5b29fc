"""Reading and validating COCO ``instances_*.json``: what is dropped or fixed, and the report of it."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from PIL import Image
from pycocotools.coco import COCO

from ...errors import DataError
from ._values import as_int, entry_ids, is_finite, is_positive
from .categories import CategoryMap

log = logging.getLogger("vision_ft")


@dataclass
class AnnotationReport:
    """What validation dropped or changed in one annotation file."""

    source: str
    skipped: Counter = field(default_factory=Counter)  # annotations, by reason
    skipped_image_reasons: Counter = field(default_factory=Counter)  # images, by reason
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    clipped: int = 0
    dropped_with_images: int = 0  # annotations of skipped images (not counted as bad themselves)
    reassigned_ids: bool = False

    def add(self, reason: str, example: str, image: bool = False) -> None:
        (self.skipped_image_reasons if image else self.skipped)[reason] += 1
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(example)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def skipped_images(self) -> int:
        return sum(self.skipped_image_reasons.values())

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "skipped_annotations": dict(self.skipped),
                "skipped_images": dict(self.skipped_image_reasons),
                "annotations_of_skipped_images": self.dropped_with_images, "clipped_boxes": self.clipped,
                "reassigned_annotation_ids": self.reassigned_ids}

    def log(self, split: str) -> None:
        if self.total_skipped or self.skipped_images:
            reasons = {**self.skipped, **self.skipped_image_reasons}
            parts = [f"{n} {reason} (e.g. {'; '.join(self.examples[reason])})" for reason, n in reasons.items()]
            log.warning("data: %s split: skipped %d annotation(s) and %d image(s) (with their %d annotation(s)) "
                        "from %s (data.init_args.on_bad_annotation=skip):\n  %s", split, self.total_skipped,
                        self.skipped_images, self.dropped_with_images, self.source, "\n  ".join(parts))
        if self.clipped:
            log.info("data: %s split: clipped %d box(es) overshooting the image by at most the "
                     "clip_tolerance", split, self.clipped)
        if self.reassigned_ids:
            log.warning("data: %s split: annotation ids in %s were missing or duplicated; renumbered 1..N",
                        split, self.source)


def load_coco_json(path: str | Path) -> dict:
    """Read a COCO annotation file; clear errors for a missing file, bad JSON or missing keys."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"COCO annotation file {str(path)!r} not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a COCO file is a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "categories"):
        if not isinstance(raw.get(key), list):
            raise DataError(f"{path}: missing or malformed '{key}' list (COCO instances format)")
    if not isinstance(raw.get("annotations", []), list):
        raise DataError(f"{path}: 'annotations' must be a list")
    return raw


def validate_coco(raw: dict, categories: CategoryMap, *, image_dir: Path | None, source: str,
                  on_bad: Literal["skip", "error"] = "skip", clip_tolerance: float = 1.0,
                  min_box_size: float = 1.0) -> tuple[dict, AnnotationReport]:
    """A cleaned COCO dataset dict (safe for ``pycocotools``) and the report of what was dropped.

    Structural problems (duplicate image ids, image entries without an id) always raise;
    per-annotation problems and missing image files follow ``on_bad``.
    """
    report = AnnotationReport(source)

    def bad(reason: str, example: str, image: bool = False) -> None:
        if on_bad == "error":
            raise DataError(f"{source}: {reason}: {example}. Fix the file, or set "
                            "data.init_args.on_bad_annotation=skip to skip such entries (counted and logged).")
        report.add(reason, example, image=image)

    images: dict[int, dict] = {}
    for entry in raw["images"]:
        image_id = as_int(entry.get("id")) if isinstance(entry, dict) else None
        if image_id is None:
            raise DataError(f"{source}: image entry without an integer 'id': {str(entry)[:120]}")
        if image_id in images:
            raise DataError(f"{source}: image id {image_id} appears twice in 'images'")
        name = entry.get("file_name")
        if not isinstance(name, str) or not name:
            bad("image without file_name", f"image id {image_id}", image=True)
            continue
        width, height = entry.get("width"), entry.get("height")
        path = (image_dir / name) if image_dir is not None else None
        if path is not None and not path.is_file():
            bad("image file missing", f"image id {image_id}: {path}", image=True)
            continue
        if not (is_positive(width) and is_positive(height)):
            if path is None:
                bad("image without width/height", f"image id {image_id}", image=True)
                continue
            with Image.open(path) as im:  # header only
                width, height = im.size
        images[image_id] = {**entry, "id": image_id, "file_name": name, "width": int(width), "height": int(height)}

    known = set(categories.ids)
    listed_images = entry_ids(raw["images"])  # includes images skipped above
    annotations = []
    for a in raw.get("annotations", []):
        ref = f"annotation id {a.get('id')!r}" if isinstance(a, dict) else repr(a)[:60]
        if not isinstance(a, dict):
            bad("malformed annotation", ref)
            continue
        image_id, category_id = as_int(a.get("image_id")), as_int(a.get("category_id"))
        if image_id is None or image_id not in images:
            if image_id is not None and image_id in listed_images:
                report.dropped_with_images += 1  # its image was skipped (and counted)
                continue
            bad("unknown image id", f"{ref}: image_id {a.get('image_id')!r}")
            continue
        if category_id is None or category_id not in known:
            bad("unknown category id", f"{ref}: category_id {a.get('category_id')!r} not in {sorted(known)}")
            continue
        box = a.get("bbox")
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(is_finite(v) for v in box)):
            bad("malformed bbox", f"{ref}: bbox {box!r}")
            continue
        x, y, w, h = (float(v) for v in box)
        W, H = images[image_id]["width"], images[image_id]["height"]
        if w <= 0 or h <= 0:
            bad("box with non-positive width/height", f"{ref}: bbox {box}")
            continue
        tol = clip_tolerance
        if x < -tol or y < -tol or x + w > W + tol or y + h > H + tol:
            bad("box outside the image", f"{ref}: bbox {box} on a {W}x{H} image")
            continue
        x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(W), x + w), min(float(H), y + h)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            report.clipped += 1
        if x1 - x0 < min_box_size or y1 - y0 < min_box_size:
            bad("box smaller than min_box_size", f"{ref}: bbox {box}")
            continue
        clean = {**a, "image_id": image_id, "category_id": category_id, "bbox": [x0, y0, x1 - x0, y1 - y0],
                 "iscrowd": int(bool(a.get("iscrowd", 0)))}
        if not is_finite(clean.get("area")) or float(clean["area"]) <= 0:
            clean["area"] = (x1 - x0) * (y1 - y0)  # COCOeval needs an area for APs/APm/APl
        annotations.append(clean)

    ids = [as_int(a.get("id")) for a in annotations]
    if any(i is None for i in ids) or len(set(ids)) != len(ids):
        report.reassigned_ids = True
        for n, a in enumerate(annotations, start=1):
            a["id"] = n
    dataset = {"info": raw.get("info", {}), "licenses": raw.get("licenses", []),
               "images": list(images.values()), "annotations": annotations,
               "categories": [{"id": cid, "name": name} for cid, name in zip(categories.ids, categories.names)]}
    return dataset, report


def build_coco(dataset: dict) -> COCO:
    """A pycocotools ``COCO`` index over an in-memory dataset dict (no file, no console noise)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def subset_dataset(dataset: dict, image_ids: Sequence[int]) -> dict:
    keep = set(int(i) for i in image_ids)
    return {**dataset, "images": [im for im in dataset["images"] if im["id"] in keep],
            "annotations": [a for a in dataset["annotations"] if a["image_id"] in keep]}
