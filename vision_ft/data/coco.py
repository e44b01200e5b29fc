"""COCO-format object detection data: any ``instances_*.json`` + image folder.

What custom COCO data most often gets wrong, handled here once:

- **category ids**: COCO ids are arbitrary (COCO itself uses 1..90 with gaps; custom exports
  often start at 1 or skip ids). The model needs contiguous indices ``0..K-1``:
  :class:`CategoryMap` maps ids (sorted) to indices and back, and predictions are written
  with the file's own ids.
- **box formats**: COCO stores ``[x, y, w, h]`` in pixels; DETR-family losses want
  ``[cx, cy, w, h]`` normalised by the image size. :func:`coco_to_cxcywh` and
  :func:`cxcywh_to_coco` are the only two places that convert.
- **augmentations that forget the boxes**: images and boxes go through
  ``torchvision.transforms.v2`` together (``tv_tensors.BoundingBoxes``), so a flip,
  zoom-out or crop moves the boxes with the pixels.
- **bad annotations**: unknown image or category ids, malformed, negative or
  out-of-image boxes, missing image files: counted and skipped with a logged report, or
  a :class:`~vision_ft.errors.DataError` naming the file and annotation, by
  ``on_bad_annotation``. Boxes that overshoot the image by at most ``clip_tolerance``
  pixels (common in real exports) are clipped and counted.

Images without annotations are kept (they teach the model what "nothing" looks like).
Crowd annotations (``iscrowd=1``) stay in the ground truth used for evaluation (COCOeval
ignores detections matched to them) but are not training targets, as in the D-FINE and
RT-DETR data pipelines.

Batches are ``{"pixel_values": float (B,3,S,S) in [0,1], "labels": [{"class_labels": int64 (n,),
"boxes": float (n,4) cxcywh in [0,1]}, ...], "image_ids": int64 (B,), "orig_sizes": int64 (B,2) (h, w)}``
— ``labels`` exactly as transformers' DETR-family models take them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2

from ..errors import ConfigError, DataError
from .base import SplitLoaders
from .samples import pil_to_array

log = logging.getLogger("vision_ft")

DETECTION_SPLITS = ("train", "val", "test")


# --- box formats ------------------------------------------------------------------------------
def coco_to_cxcywh(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """COCO ``[x, y, w, h]`` in pixels → ``[cx, cy, w, h]`` normalised by the image size."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    scale = boxes.new_tensor([width, height, width, height])
    return box_convert(boxes, in_fmt="xywh", out_fmt="cxcywh") / scale


def cxcywh_to_coco(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """``[cx, cy, w, h]`` normalised → COCO ``[x, y, w, h]`` in pixels (inverse of :func:`coco_to_cxcywh`)."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    scale = boxes.new_tensor([width, height, width, height])
    return box_convert(boxes * scale, in_fmt="cxcywh", out_fmt="xywh")


def xyxy_to_coco(boxes: torch.Tensor) -> torch.Tensor:
    """``[x0, y0, x1, y1]`` → COCO ``[x, y, w, h]`` (same units)."""
    return box_convert(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4), in_fmt="xyxy", out_fmt="xywh")


# --- categories -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CategoryMap:
    """COCO category ids (sorted) ↔ contiguous indices ``0..K-1``, with names."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_categories(cls, categories: Sequence[dict], source: str = "") -> "CategoryMap":
        if not categories:
            raise DataError(f"{source}: 'categories' is empty; a detection dataset needs at least one category")
        seen: dict[int, str] = {}
        for c in categories:
            if not isinstance(c, dict) or "id" not in c:
                raise DataError(f"{source}: every category needs an 'id' (got {c!r})")
            cid = _as_int(c["id"])
            if cid is None:
                raise DataError(f"{source}: category id {c['id']!r} is not an integer")
            if cid in seen:
                raise DataError(f"{source}: category id {cid} appears twice in 'categories'")
            seen[cid] = str(c.get("name", cid))
        ids = tuple(sorted(seen))
        return cls(ids, tuple(seen[i] for i in ids))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def index(self) -> dict[int, int]:
        return {cid: i for i, cid in enumerate(self.ids)}

    def to_index(self, category_ids: Sequence[int]) -> list[int]:
        index = self.index
        return [index[int(c)] for c in category_ids]

    def to_category_id(self, indices: Sequence[int]) -> list[int]:
        return [self.ids[int(i)] for i in indices]


# --- validation ----------------------------------------------------------------------------
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
        image_id = _as_int(entry.get("id")) if isinstance(entry, dict) else None
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
        if not (_positive(width) and _positive(height)):
            if path is None:
                bad("image without width/height", f"image id {image_id}", image=True)
                continue
            with Image.open(path) as im:  # header only
                width, height = im.size
        images[image_id] = {**entry, "id": image_id, "file_name": name, "width": int(width), "height": int(height)}

    known = set(categories.ids)
    listed_images = _ids(raw["images"])  # includes images skipped above
    annotations = []
    for a in raw.get("annotations", []):
        ref = f"annotation id {a.get('id')!r}" if isinstance(a, dict) else repr(a)[:60]
        if not isinstance(a, dict):
            bad("malformed annotation", ref)
            continue
        image_id, category_id = _as_int(a.get("image_id")), _as_int(a.get("category_id"))
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
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_finite(v) for v in box)):
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
        if not _finite(clean.get("area")) or float(clean["area"]) <= 0:
            clean["area"] = (x1 - x0) * (y1 - y0)  # COCOeval needs an area for APs/APm/APl
        annotations.append(clean)

    ids = [_as_int(a.get("id")) for a in annotations]
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


# --- dataset ---------------------------------------------------------------------------------
def build_transforms(train: bool, image_size: int, hflip_prob: float = 0.5, zoom_out: bool = False,
                     iou_crop: bool = False, photometric: bool = False, min_box_size: float = 1.0) -> v2.Compose:
    """Box-safe augmentation: every op moves ``tv_tensors.BoundingBoxes`` with the pixels.

    Training order follows D-FINE's pipeline (photometric distort, zoom-out, IoU crop, flip,
    resize, with boxes sanitised after the geometric ops); evaluation only resizes. The
    resize is to a square ``image_size`` without keeping the aspect ratio, as D-FINE does.
    """
    ops: list[Any] = []
    if train:
        if photometric:
            ops.append(v2.RandomPhotometricDistort(p=0.5))
        if zoom_out:
            ops.append(v2.RandomZoomOut(fill=0.0, side_range=(1.0, 2.0), p=0.5))
        if iou_crop:
            ops += [v2.RandomApply([v2.RandomIoUCrop()], p=0.8), v2.SanitizeBoundingBoxes(min_size=min_box_size)]
        if hflip_prob > 0:
            ops.append(v2.RandomHorizontalFlip(p=hflip_prob))
    ops.append(v2.Resize((image_size, image_size), antialias=True))
    if train:
        ops.append(v2.SanitizeBoundingBoxes(min_size=min(min_box_size, 1.0)))
    return v2.Compose(ops)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image of any mode (gray, RGBA, 16-bit, palette) → float32 ``(3, H, W)`` in [0, 1]."""
    arr = pil_to_array(image)
    x = torch.from_numpy(arr.astype(np.float32))
    if arr.dtype == np.uint8:
        x = x / 255.0
    elif arr.dtype == np.uint16:
        x = x / 65535.0
    x = x.clamp_(0.0, 1.0).permute(2, 0, 1)
    if x.shape[0] in (1, 2):
        x = x[:1].expand(3, -1, -1)
    return x[:3].contiguous()


class CocoDetectionDataset(Dataset):
    """Images of one split with their training targets (crowd boxes excluded)."""

    def __init__(self, coco: COCO, image_dir: Path, categories: CategoryMap, transform: v2.Compose,
                 source: str = ""):
        self.coco, self.image_dir, self.categories, self.transform = coco, Path(image_dir), categories, transform
        self.image_ids = sorted(coco.imgs)
        self.source = source

    def __len__(self) -> int:
        return len(self.image_ids)

    def path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def targets(self, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-crowd boxes (COCO xywh pixels) and contiguous labels of one image."""
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(self.categories.to_index([a["category_id"] for a in anns]), dtype=torch.int64)
        return boxes, labels

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id = self.image_ids[i]
        info = self.coco.imgs[image_id]
        path = self.path(image_id)
        try:
            with Image.open(path) as im:
                im.load()
                pixels = image_to_tensor(im)
        except OSError as e:
            raise DataError(f"cannot read image {path} (image id {image_id} in {self.source}): {e}") from None
        height, width = pixels.shape[-2:]
        if (width, height) != (info["width"], info["height"]):
            raise DataError(f"image {path} is {width}x{height} but {self.source} says "
                            f"{info['width']}x{info['height']} (image id {image_id}); boxes would be misplaced. "
                            "Fix width/height in the annotation file.")
        boxes, labels = self.targets(image_id)
        sample = {"image": tv_tensors.Image(pixels),
                  "boxes": tv_tensors.BoundingBoxes(boxes, format="XYWH", canvas_size=(height, width)),
                  "labels": labels}
        out = self.transform(sample)
        size_h, size_w = out["image"].shape[-2:]
        return {
            "pixel_values": out["image"].as_subclass(torch.Tensor).clamp(0.0, 1.0),
            "labels": {"class_labels": out["labels"],
                       "boxes": coco_to_cxcywh(out["boxes"].as_subclass(torch.Tensor), size_w, size_h)},
            "image_id": image_id,
            "orig_size": (height, width),
        }


def detection_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "labels": [it["labels"] for it in items],
        "image_ids": torch.tensor([it["image_id"] for it in items], dtype=torch.int64),
        "orig_sizes": torch.tensor([it["orig_size"] for it in items], dtype=torch.int64),
    }


# --- data module --------------------------------------------------------------------------------
class COCODetectionData(SplitLoaders, L.LightningDataModule):
    """COCO-format detection data for any ``instances_*.json`` + image folder.

    Paths are relative to ``root`` unless absolute; the defaults match a layout
    ``root/annotations/instances_{train,val}.json`` + ``root/images/{train,val}/``. For COCO 2017
    set ``train_ann=annotations/instances_train2017.json``, ``train_images=train2017`` (and
    the same for val).

    Args:
        root: base folder of the paths below.
        train_ann, train_images: training annotation file and image folder.
        val_ann, val_images: validation split; ``val_ann: null`` holds out ``val_fraction``
            of the training images (seeded) instead.
        test_ann, test_images: test split; ``null`` tests (and predicts) on the validation split.
        image_size: images are resized to ``image_size × image_size`` (D-FINE: 640).
        batch_size, num_workers: loader settings (per device).
        augment: training augmentation on/off (flip and the optional ops below).
        hflip_prob: horizontal flip probability when ``augment``.
        zoom_out, iou_crop, photometric: D-FINE's RandomZoomOut / RandomIoUCrop /
            RandomPhotometricDistort (off by default: they need longer schedules).
        on_bad_annotation: ``skip`` (count, log, keep going) or ``error`` (stop at the first
            bad annotation or missing image file, naming it).
        clip_tolerance: boxes overshooting the image by at most this many pixels are clipped;
            beyond it they count as out-of-image.
        min_box_size: boxes narrower or shorter than this (pixels, after clipping) are bad.
        class_names: display names (default: the categories' names, in sorted-id order).
        val_fraction: share of training images held out when there is no ``val_ann``.
        seed: seed of the held-out draw and of the training order.
    """

    collate_fn = staticmethod(detection_collate)

    def __init__(
        self,
        root: str = ".",
        train_ann: str = "annotations/instances_train.json",
        train_images: str = "images/train",
        val_ann: str | None = "annotations/instances_val.json",
        val_images: str | None = "images/val",
        test_ann: str | None = None,
        test_images: str | None = None,
        image_size: int = 640,
        batch_size: int = 4,
        num_workers: int = 0,
        augment: bool = True,
        hflip_prob: float = 0.5,
        zoom_out: bool = False,
        iou_crop: bool = False,
        photometric: bool = False,
        on_bad_annotation: Literal["skip", "error"] = "skip",
        clip_tolerance: float = 1.0,
        min_box_size: float = 1.0,
        class_names: list[str] | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for key, value, low in (("batch_size", batch_size, 1), ("image_size", image_size, 32),
                                ("num_workers", num_workers, 0)):
            if int(value) < low:
                raise ConfigError(f"data.init_args.{key} must be >= {low}, got {value}")
        if on_bad_annotation not in ("skip", "error"):
            raise ConfigError(f"data.init_args.on_bad_annotation must be 'skip' or 'error', got {on_bad_annotation!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.init_args.val_fraction must be in (0, 1), got {val_fraction}")
        if clip_tolerance < 0 or min_box_size < 0:
            raise ConfigError("data.init_args.clip_tolerance and min_box_size must be >= 0")
        self.root = Path(root)
        self.paths = {"train": (train_ann, train_images), "val": (val_ann, val_images),
                      "test": (test_ann, test_images)}
        for split, (ann, images) in self.paths.items():
            if (ann is None) != (images is None):
                raise ConfigError(f"data.init_args.{split}_ann and {split}_images must be set together")
        self.image_size, self.batch_size, self.num_workers = int(image_size), int(batch_size), int(num_workers)
        self.augment, self.hflip_prob = augment, float(hflip_prob)
        self.zoom_out, self.iou_crop, self.photometric = zoom_out, iou_crop, photometric
        self.on_bad_annotation, self.clip_tolerance = on_bad_annotation, float(clip_tolerance)
        self.min_box_size, self.val_fraction, self.seed = float(min_box_size), float(val_fraction), int(seed)

        # categories come from the training file and fix the label space before setup, so the
        # CLI can link num_classes / class_names into the model at instantiation
        self._raw: dict[str, dict] = {"train": load_coco_json(self._resolve(train_ann))}
        self.categories = CategoryMap.from_categories(self._raw["train"]["categories"], source=str(train_ann))
        if class_names is not None and len(class_names) != len(self.categories):
            raise ConfigError(f"data.init_args.class_names has {len(class_names)} names but {train_ann} has "
                              f"{len(self.categories)} categories")
        self.num_classes = len(self.categories)
        self.class_names = list(class_names) if class_names is not None else list(self.categories.names)
        self.category_ids = list(self.categories.ids)
        self.reports: dict[str, AnnotationReport] = {}
        self._datasets: dict[str, tuple[dict, Path, str]] = {}  # split -> (clean dataset, image dir, source)
        self._coco: dict[str, COCO] = {}

    # --- paths and splits ---------------------------------------------------------------------
    def _resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.root / p

    def _load(self, split: str) -> tuple[dict, Path, str] | None:
        ann, images = self.paths[split]
        if ann is None:
            return None
        source = str(self._resolve(ann))
        raw = self._raw.get(split) or load_coco_json(source)
        if split != "train":
            self._check_categories(raw, source)
        image_dir = self._resolve(images)
        if not image_dir.is_dir():
            raise DataError(f"image folder {str(image_dir)!r} (data.init_args.{split}_images) not found")
        dataset, report = validate_coco(raw, self.categories, image_dir=image_dir, source=source,
                                        on_bad=self.on_bad_annotation, clip_tolerance=self.clip_tolerance,
                                        min_box_size=self.min_box_size)
        report.log(split)
        self.reports[split] = report
        if not dataset["images"]:
            raise DataError(f"{source}: no usable images in the {split} split")
        return dataset, image_dir, source

    def _check_categories(self, raw: dict, source: str) -> None:
        theirs = CategoryMap.from_categories(raw["categories"], source=source)
        ours = dict(zip(self.categories.ids, self.categories.names))
        clash = [(cid, name, ours[cid]) for cid, name in zip(theirs.ids, theirs.names)
                 if cid in ours and ours[cid] != name]
        if clash:
            cid, name, expected = clash[0]
            raise DataError(f"{source}: category id {cid} is {name!r} but the training file calls it {expected!r}; "
                            "all splits must share one category list")

    def split_dataset(self, split: str) -> tuple[dict, Path, str]:
        """The validated dataset dict, image folder and source file of a split (cached)."""
        if split in self._datasets:
            return self._datasets[split]
        if split in ("train", "val"):
            train, val = self._load("train"), self._load("val")
            if val is None:  # hold out part of the training images
                data, image_dir, source = train
                ids = sorted(im["id"] for im in data["images"])
                n_val = max(1, int(round(len(ids) * self.val_fraction)))
                if len(ids) - n_val < 1:
                    raise DataError(f"cannot hold out a validation split from {len(ids)} training image(s); "
                                    "set data.init_args.val_ann")
                order = np.random.default_rng(self.seed).permutation(len(ids))
                val_ids = [ids[i] for i in order[:n_val]]
                train_ids = [ids[i] for i in order[n_val:]]
                log.info("data: no val_ann: holding out %d of %d training images (val_fraction=%s, seed=%d)",
                         n_val, len(ids), self.val_fraction, self.seed)
                train = (subset_dataset(data, train_ids), image_dir, source)
                val = (subset_dataset(data, val_ids), image_dir, f"{source} (held-out part)")
            self._datasets.update(train=train, val=val)
        elif split == "test":
            test = self._load("test")
            if test is None:
                log.warning("data: no test_ann: testing and predicting use the validation split")
                test = self.split_dataset("val")
            self._datasets["test"] = test
        else:
            raise ValueError(f"unknown split {split!r}")
        return self._datasets[split]

    def coco(self, split: Literal["train", "val", "test"]) -> COCO:
        """The validated ground truth of a split as a pycocotools ``COCO`` (what COCOeval scores against)."""
        if split not in self._coco:
            self._coco[split] = build_coco(self.split_dataset(split)[0])
        return self._coco[split]

    def dataset(self, split: Literal["train", "val", "test"]) -> CocoDetectionDataset:
        data, image_dir, source = self.split_dataset(split)
        train = split == "train" and self.augment
        transform = build_transforms(train, self.image_size, self.hflip_prob, self.zoom_out, self.iou_crop,
                                     self.photometric, self.min_box_size)
        return CocoDetectionDataset(self.coco(split), image_dir, self.categories, transform, source)

    def image_path(self, split: str, image_id: int) -> Path:
        data, image_dir, _ = self.split_dataset(split)
        return image_dir / self.coco(split).imgs[int(image_id)]["file_name"]

    # --- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.split_dataset("train")
        if stage in (None, "fit", "validate"):
            self.split_dataset("val")
        if stage in (None, "test", "predict"):
            self.split_dataset("test")


# --- helpers ------------------------------------------------------------------------------------
def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _finite(value) and value > 0


def _ids(entries: list) -> set[int]:
    return {i for i in (_as_int(e.get("id")) for e in entries if isinstance(e, dict)) if i is not None}
