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

from .annotations import AnnotationReport, build_coco, load_coco_json, subset_dataset, validate_coco
from .boxes import coco_to_cxcywh, cxcywh_to_coco, xyxy_to_coco
from .categories import CategoryMap
from .datamodule import DETECTION_SPLITS, COCODetectionData
from .dataset import CocoDetectionDataset, build_transforms, detection_collate, image_to_tensor

__all__ = [
    "AnnotationReport",
    "COCODetectionData",
    "CategoryMap",
    "CocoDetectionDataset",
    "DETECTION_SPLITS",
    "build_coco",
    "build_transforms",
    "coco_to_cxcywh",
    "cxcywh_to_coco",
    "detection_collate",
    "image_to_tensor",
    "load_coco_json",
    "subset_dataset",
    "validate_coco",
    "xyxy_to_coco",
]
