"""Multi-label pieces with masked (unknown) labels and per-label decision thresholds.

Labels are ``float`` ``(B, L)`` with ``NaN`` where a label is unknown, e.g. a CheXpert
"uncertain" finding under the ``ignore`` policy. Such entries are left out of the loss
(:func:`masked_bce_with_logits`) and of every metric (:func:`metric_targets` turns them into
torchmetrics' ``ignore_index``), so they count neither as positive nor as negative.

:class:`DefinedAUROC` scores only the labels that have both positives and negatives.
:class:`LabelThresholds` chooses one decision threshold per label on validation data, by
Youden's J (sensitivity + specificity − 1, the ROC point farthest above the chance line),
and keeps them as a buffer so they are saved with the task's heads and used at prediction.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MultilabelAUROC
from torchmetrics.utilities.data import dim_zero_cat

#: the target value torchmetrics skips (``ignore_index``) for masked labels
IGNORE = -1


def masked_bce_with_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the known (non-NaN) entries; 0 (with a gradient path) when none are known."""
    labels = labels.float()
    known = ~torch.isnan(labels)
    losses = F.binary_cross_entropy_with_logits(logits, torch.where(known, labels, torch.zeros_like(labels)),
                                                reduction="none")
    count = known.sum()
    return (losses * known).sum() / count.clamp(min=1)


def metric_targets(labels: torch.Tensor) -> torch.Tensor:
    """Integer targets for torchmetrics: 0/1, and :data:`IGNORE` where the label is NaN."""
    labels = labels.float()
    return torch.where(torch.isnan(labels), torch.full_like(labels, IGNORE), labels).long()


def youden_thresholds(probs: torch.Tensor, targets: torch.Tensor, default: float = 0.5) -> torch.Tensor:
    """Per label, the threshold ``t`` maximising sensitivity + specificity − 1 for ``prob >= t``.

    Candidates are the label's observed probabilities; entries with target :data:`IGNORE` are left
    out; a label without both a positive and a negative keeps ``default``. Ties go to the highest
    threshold (fewest positives).
    """
    out = torch.full((probs.shape[1],), float(default), dtype=torch.float32)
    for j in range(probs.shape[1]):
        keep = targets[:, j] != IGNORE
        p, y = probs[keep, j].double(), targets[keep, j]
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        cand = torch.unique(p)  # ascending
        predicted = p[None, :] >= cand[:, None]
        tpr = (predicted & (y == 1)[None]).sum(1).double() / n_pos
        tnr = (~predicted & (y == 0)[None]).sum(1).double() / n_neg
        j_stat = tpr + tnr - 1
        best = torch.nonzero(j_stat == j_stat.max()).flatten()[-1]
        out[j] = float(cand[best])
    return out


class ThresholdCollector(Metric):
    """Gathers probabilities and targets (across ranks) and returns :func:`youden_thresholds`."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, targets: torch.Tensor) -> None:
        self.probs.append(probs.detach().float())
        self.targets.append(targets.detach().long())

    def compute(self) -> torch.Tensor:
        return youden_thresholds(dim_zero_cat(self.probs).cpu(), dim_zero_cat(self.targets).cpu())


class LabelThresholds(nn.Module):
    """Per-label decision thresholds (a buffer, 0.5 until validation sets them) and their collector."""

    def __init__(self, num_labels: int):
        super().__init__()
        self.register_buffer("values", torch.full((num_labels,), 0.5))
        self.collector = ThresholdCollector()

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        self.collector.update(probs, metric_targets(labels))

    def choose(self) -> torch.Tensor | None:
        """Set the thresholds from what was collected (None if nothing was); reset the collector."""
        if not self.collector.update_called:
            return None
        chosen = self.collector.compute().to(self.values)
        self.collector.reset()
        self.values.copy_(chosen)
        return chosen

    def predict(self, probs: torch.Tensor) -> torch.Tensor:
        return (probs >= self.values.to(probs)).int()


class DefinedAUROC(MultilabelAUROC):
    """Multi-label AUROC that leaves out labels it cannot score.

    A label whose (non-ignored) targets lack positives or negatives has no ROC curve;
    torchmetrics scores it 0, which drags a mean down for nothing the model did. Here such a
    label is NaN (``average=None``) and the macro mean (``average="macro"``) runs over the
    defined labels only. With every label defined it equals :class:`MultilabelAUROC`.
    """

    def __init__(self, num_labels: int, average: str | None = "macro", **kwargs):
        if average not in ("macro", None):
            raise ValueError(f"average must be 'macro' or None, got {average!r}")
        super().__init__(num_labels=num_labels, average=None, ignore_index=IGNORE, **kwargs)
        self.mean = average == "macro"

    def compute(self) -> torch.Tensor:
        target = dim_zero_cat(self.target)
        defined = ((target == 1).sum(0) > 0) & ((target == 0).sum(0) > 0)
        if not bool(defined.any()):
            per_label = torch.full((self.num_labels,), float("nan"), device=target.device)
        else:
            with warnings.catch_warnings():  # torchmetrics warns about the undefined labels it scores 0
                warnings.simplefilter("ignore", UserWarning)
                per_label = super().compute().float()
            per_label = torch.where(defined, per_label, torch.full_like(per_label, float("nan")))
        return torch.nanmean(per_label) if self.mean else per_label
