"""Metrics torchmetrics lacks.

- :class:`PerDomainAccuracy`: accuracy per domain (domain generalisation, DomainBed).
- :class:`COCOEvaluator`, :func:`evaluate_coco`: COCO box AP with pycocotools on the file's ground truth.
- :func:`sequence_metrics`, :func:`aggregate`, :class:`PerFramePredictions`: per-frame phase metrics
  (video-level accuracy, per-phase precision/recall/Jaccard/F1, relaxed boundaries) for video tasks.
- :func:`ood_metrics`, :func:`evaluate_ood`, :func:`fpr_at_tpr`, :class:`OODScores`: OOD detection
  (FPR95 with the official MCM threshold rule, AUROC, AUPR-In; scores gathered across ranks).
"""

from .coco_eval import COCOEvaluator, evaluate_coco, to_coco_results
from .domain_accuracy import PerDomainAccuracy
from .ood import OODScores, evaluate_ood, fpr_at_tpr, ood_metrics
from .temporal import PerFramePredictions, aggregate, sequence_metrics

__all__ = ["COCOEvaluator", "OODScores", "PerDomainAccuracy", "PerFramePredictions", "aggregate", "evaluate_coco",
           "evaluate_ood", "fpr_at_tpr", "ood_metrics", "sequence_metrics", "to_coco_results"]
