"""COCO box AP with pycocotools' COCOeval, on the ground truth as the annotation file has it.

torchmetrics' ``MeanAveragePrecision`` rebuilds the ground truth from the targets it is
given, so areas (APs/m/l) would come from boxes instead of the file's ``area`` and crowd
regions would be lost; here the validated ground truth :class:`~pycocotools.coco.COCO`
of the split is scored directly, so the numbers are those ``pycocotools`` gives on the
written results JSON (tested).

Results are COCO's results format: ``{"image_id", "category_id" (the file's own id),
"bbox": [x, y, w, h] in original pixels, "score"}``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

log = logging.getLogger("vision_ft")

#: COCOeval.stats order (iouType "bbox", maxDets 1/10/100).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(image_ids: Sequence[int], detections: Sequence[dict[str, torch.Tensor]],
                    category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """Detections per image (``scores``, contiguous ``labels``, ``boxes`` x0y0x1y1 pixels) → COCO results.

    Contiguous labels are mapped back to the annotation file's category ids.
    """
    out = []
    for image_id, det in zip(image_ids, detections):
        boxes = det["boxes"].detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for score, label, box in zip(det["scores"].tolist(), det["labels"].tolist(), xywh):
            out.append({"image_id": int(image_id), "category_id": int(category_ids[int(label)]),
                        "bbox": [round(float(v), 3) for v in box], "score": round(float(score), 5)})
    return out


def evaluate_coco(coco_gt: COCO, results: list[dict[str, Any]], image_ids: Sequence[int] | None = None,
                  class_names: Sequence[str] | None = None) -> tuple[dict[str, float], dict[str, float], str]:
    """Run COCOeval (bbox) → (the 12 summary stats by name, AP per category name, the printed summary).

    ``image_ids`` restricts evaluation to the images that were actually run (partial
    validation epochs, ``limit_val_batches``); by default every ground-truth image counts, as
    ``pycocotools`` does. As in pycocotools, a stat is -1 where the ground truth has nothing
    to score (e.g. APs without small objects); per-class AP is -1 for a class without ground truth.
    """
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))  # loadRes adds keys in place
    else:  # pycocotools cannot load an empty result list: an empty detection set scores 0
        coco_dt = COCO()
        coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                           "annotations": []}
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt.createIndex()
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if image_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
    precision = evaluator.eval["precision"]  # [iou thresholds, recall, category, area, maxDets]
    names = list(class_names) if class_names is not None else [
        coco_gt.cats[c].get("name", str(c)) for c in evaluator.params.catIds]
    per_class = {}
    for k, name in enumerate(names):
        p = precision[:, :, k, 0, -1]
        per_class[name] = float(np.mean(p[p > -1])) if (p > -1).any() else -1.0
    return stats, per_class, printed.getvalue()


class COCOEvaluator:
    """Accumulates COCO results over an epoch (all ranks) and scores them with :func:`evaluate_coco`."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.image_ids: set[int] = set()

    def update(self, image_ids: Sequence[int], results: list[dict[str, Any]]) -> None:
        self.image_ids.update(int(i) for i in image_ids)
        self.results.extend(results)

    def reset(self) -> None:
        self.results, self.image_ids = [], set()

    def gathered(self) -> tuple[list[dict[str, Any]], list[int]]:
        """Results and image ids of every rank; an image seen on several ranks (a distributed
        sampler pads the last batch with repeats) keeps the detections of the first rank only."""
        parts = [(self.results, sorted(self.image_ids))]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, (self.results, sorted(self.image_ids)))
        owner: dict[int, int] = {}
        for rank, (_, ids) in enumerate(parts):
            for i in ids:
                owner.setdefault(i, rank)
        results = [r for rank, (res, _) in enumerate(parts) for r in res if owner[r["image_id"]] == rank]
        return results, sorted(owner)

    def compute(self, coco_gt: COCO, class_names: Sequence[str] | None = None):
        results, image_ids = self.gathered()
        return evaluate_coco(coco_gt, results, image_ids=image_ids, class_names=class_names), results
