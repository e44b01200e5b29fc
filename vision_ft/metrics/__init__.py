"""Metrics torchmetrics lacks.

- :func:`caption_scores`, :class:`CaptionScores`: BLEU-4, METEOR, ROUGE-L, CIDEr-D with pycocoevalcap and its
  PTB tokenizer, several references per video (METEOR skipped, a stand-in tokenizer, when Java is missing).
- :class:`PerDomainAccuracy`: accuracy per domain (domain generalisation, DomainBed).
- :class:`COCOEvaluator`, :func:`evaluate_coco`: COCO box AP with pycocotools on the file's ground truth.
- :func:`sequence_metrics`, :func:`aggregate`, :class:`PerFramePredictions`: per-frame phase metrics
  (video-level accuracy, per-phase precision/recall/Jaccard/F1, relaxed boundaries) for video tasks.
- :func:`ood_metrics`, :func:`evaluate_ood`, :func:`fpr_at_tpr`, :class:`OODScores`: OOD detection
  (FPR95 with the official MCM threshold rule, AUROC, AUPR-In; scores gathered across ranks).
"""

from .captioning import CaptionScores, caption_scores
from .coco_eval import COCOEvaluator, evaluate_coco, to_coco_results
from .domain_accuracy import PerDomainAccuracy
from .ood import OODScores, evaluate_ood, fpr_at_tpr, ood_metrics
from .temporal import PerFramePredictions, aggregate, sequence_metrics

__all__ = ["COCOEvaluator", "CaptionScores", "OODScores", "PerDomainAccuracy", "PerFramePredictions", "aggregate",
           "caption_scores", "evaluate_coco", "evaluate_ood", "fpr_at_tpr", "ood_metrics", "sequence_metrics",
           "to_coco_results"]
