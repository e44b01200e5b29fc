"""Metrics torchmetrics lacks.

- :class:`PerDomainAccuracy`: accuracy per domain (domain generalisation, DomainBed).
- :class:`COCOEvaluator`, :func:`evaluate_coco`: COCO box AP with pycocotools on the file's ground truth.
"""

from .coco_eval import COCOEvaluator, evaluate_coco, to_coco_results
from .domain_accuracy import PerDomainAccuracy

__all__ = ["COCOEvaluator", "PerDomainAccuracy", "evaluate_coco", "to_coco_results"]
