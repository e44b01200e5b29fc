"""Accuracy per domain, for domain generalisation (DomainBed-style per-environment accuracy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric


class PerDomainAccuracy(Metric):
    """Top-1 accuracy of every domain separately.

    ``update(preds, target, domain)`` takes ``preds`` as class indices ``(B,)`` (integer)
    or scores ``(B, C)`` (logits or probabilities; the arg-max is the prediction),
    ``target`` ``(B,)`` class indices and ``domain`` ``(B,)`` domain indices in
    ``[0, num_domains)``. ``compute()`` returns a float tensor ``[num_domains]``: correct /
    total per domain, NaN for a domain that had no samples. States are integer counts
    summed across processes, so the result under DDP is exact (no per-rank averaging).

    DomainBed's "training-domain validation" score is the unweighted mean over the training
    domains of their validation accuracy: ``torch.nanmean(metric.compute())`` on the
    validation split, where only training domains have samples.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_domains: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if int(num_domains) < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        self.num_domains = int(num_domains)
        self.add_state("correct", default=torch.zeros(self.num_domains, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(self.num_domains, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, domain: torch.Tensor) -> None:
        if preds.ndim == 2:
            preds = preds.argmax(-1)
        elif preds.ndim != 1 or preds.is_floating_point():
            raise ValueError(f"preds must be class indices (B,) of an integer type or scores (B, C); got "
                             f"{tuple(preds.shape)} {preds.dtype}")
        if not (preds.shape == target.shape == domain.shape):
            raise ValueError(f"preds, target and domain must all be (B,); got {tuple(preds.shape)}, "
                             f"{tuple(target.shape)}, {tuple(domain.shape)}")
        if domain.numel() == 0:
            return
        domain = domain.long()
        low, high = int(domain.min()), int(domain.max())
        if low < 0 or high >= self.num_domains:
            raise ValueError(f"domain indices must be in [0, {self.num_domains}), got values in [{low}, {high}]")
        # one-hot sums rather than scatter/bincount: deterministic on every device
        onehot = F.one_hot(domain, self.num_domains)  # (B, D) int64
        self.correct += (onehot * (preds == target).long()[:, None]).sum(0)
        self.total += onehot.sum(0)

    def compute(self) -> torch.Tensor:
        total = self.total.to(torch.float32)
        accuracy = self.correct.to(torch.float32) / total.clamp_min(1.0)
        return torch.where(self.total > 0, accuracy, torch.full_like(accuracy, float("nan")))
