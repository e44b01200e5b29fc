"""Metrics torchmetrics lacks.

- :class:`PerDomainAccuracy`: accuracy per domain (domain generalisation, DomainBed).
- :class:`COCOEvaluator`, :func:`evaluate_coco`: COCO box AP with pycocotools on the file's ground truth.
- :func:`sequence_metrics`, :func:`aggregate`, :class:`PerFramePredictions`: per-frame phase metrics
  (video-level accuracy, per-phase precision/recall/Jaccard/F1, relaxed boundaries) for video tasks.
"""

from .coco_eval import COCOEvaluator, evaluate_coco, to_coco_results
from .domain_accuracy import PerDomainAccuracy
from .temporal import PerFramePredictions, aggregate, sequence_metrics

__all__ = ["COCOEvaluator", "PerDomainAccuracy", "PerFramePredictions", "aggregate", "evaluate_coco",
           "sequence_metrics", "to_coco_results"]
