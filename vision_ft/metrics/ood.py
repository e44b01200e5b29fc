"""Out-of-distribution (OOD) detection metrics: FPR95, AUROC, AUPR-In, per OOD set and averaged.

Convention (as in MCM, Ming et al., NeurIPS 2022, and the evaluations that follow it: GL-MCM,
Local-Prompt): a score is **higher for in-distribution (ID)** samples, and ID is the
**positive** class.

- ``auroc``: area under the ROC curve, :func:`sklearn.metrics.roc_auc_score` with ID = 1
  (ties count one half).
- ``aupr``: **AUPR-In**, :func:`sklearn.metrics.average_precision_score` with ID as the positive
  class (``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds). This is the AUPR the
  official MCM / GL-MCM / Local-Prompt code reports.
- ``fpr95``: the fraction of OOD samples accepted as ID (score ``>= t``) at the operating point
  ``t`` where 95 % of the ID samples are kept. The threshold rule is the one of the official
  evaluation code (``fpr_and_fdr_at_recall`` in deeplearning-wisc/MCM ``utils/detection_util.py``,
  reused by GL-MCM and Local-Prompt), written here on top of :func:`sklearn.metrics.roc_curve`:

  1. candidate thresholds are the distinct observed scores (ID and OOD), from the highest down to
     the highest threshold that keeps every ID sample; a sample is accepted when ``score >= t``;
  2. ``TPR(t)`` = fraction of ID scores ``>= t``; the chosen ``t*`` is the candidate whose
     ``TPR(t)`` is closest to 0.95;
  3. ties (equally close, which includes consecutive thresholds with the same TPR, i.e. OOD
     scores between two ID scores) go to the **lowest** such threshold, the one accepting the
     most OOD samples;
  4. ``fpr95 = #(OOD >= t*) / #OOD``.

  So ``t*`` need not give exactly 95 % TPR: with 10 ID samples the TPR steps by 0.1 and the
  closest step is taken. :func:`fpr_at_tpr` also returns ``t*`` and ``TPR(t*)``.

:class:`OODScores` gathers per-sample scores across ranks (DDP) for the test epoch.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

#: metric names of each (score, OOD set) pair; ``avg`` averages them over the OOD sets
METRICS = ("fpr95", "auroc", "aupr")


def _as_array(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"OOD metrics: no {what} scores")
    if not np.isfinite(arr).all():
        raise ValueError(f"OOD metrics: {int((~np.isfinite(arr)).sum())} non-finite {what} score(s)")
    return arr


def _labelled(id_scores: Any, ood_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Labels (ID = 1, OOD = 0) and scores, ID first."""
    pos, neg = _as_array(id_scores, "in-distribution"), _as_array(ood_scores, "OOD")
    labels = np.concatenate([np.ones(len(pos), dtype=np.int64), np.zeros(len(neg), dtype=np.int64)])
    return labels, np.concatenate([pos, neg])


def fpr_at_tpr(id_scores: Any, ood_scores: Any, tpr: float = 0.95) -> tuple[float, float, float]:
    """``(FPR, threshold t*, TPR(t*))`` at the ROC point whose TPR is closest to ``tpr``.

    Higher score = more ID; ties between equally close points go to the lowest threshold (the
    official MCM evaluation's rule; see the module docstring).
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    labels, scores = _labelled(id_scores, ood_scores)
    fpr, tpr_curve, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    # sklearn prepends the point (0, 0) at threshold +inf; the official rule uses observed scores only
    fpr, tpr_curve, thresholds = fpr[1:], tpr_curve[1:], thresholds[1:]
    last = int(np.argmax(tpr_curve >= 1.0))  # highest threshold keeping every ID sample (tpr = tps / tps[-1])
    gap = np.abs(tpr_curve[: last + 1] - tpr)
    cut = last - int(np.argmin(gap[::-1]))  # argmin from the low-threshold end: ties -> lowest threshold
    return float(fpr[cut]), float(thresholds[cut]), float(tpr_curve[cut])


def ood_metrics(id_scores: Any, ood_scores: Any) -> dict[str, float]:
    """FPR95, AUROC and AUPR-In of one OOD set against the ID set (plus the FPR95 operating point
    ``threshold`` / ``tpr`` and the sample counts ``n_id`` / ``n_ood``)."""
    labels, scores = _labelled(id_scores, ood_scores)
    fpr95, threshold, tpr = fpr_at_tpr(scores[labels == 1], scores[labels == 0])
    return {"fpr95": fpr95, "auroc": float(roc_auc_score(labels, scores)),
            "aupr": float(average_precision_score(labels, scores)), "threshold": threshold, "tpr": tpr,
            "n_id": int(labels.sum()), "n_ood": int((labels == 0).sum())}


def evaluate_ood(scores: dict[str, Any], ood_set: Any, set_names: Sequence[str]) -> dict[str, dict[str, dict]]:
    """Metrics of every score on every OOD set, and their mean over the sets.

    Args:
        scores: score name -> per-sample scores (N,), higher = more in-distribution.
        ood_set: per-sample set index (N,): 0 = in-distribution, ``k >= 1`` = ``set_names[k - 1]``.
        set_names: names of the OOD sets.

    Returns:
        ``{score: {set_name: {fpr95, auroc, aupr, threshold, tpr, n_id, n_ood}, ..., "avg": {fpr95,
        auroc, aupr}}}``; ``avg`` is the unweighted mean over the OOD sets (as the papers report it).
    """
    source = np.asarray(ood_set.detach().cpu() if isinstance(ood_set, torch.Tensor) else ood_set).reshape(-1)
    if "avg" in set_names:
        raise ValueError("an OOD set may not be named 'avg' (reserved for the mean over sets)")
    unknown = sorted(set(np.unique(source).tolist()) - set(range(len(set_names) + 1)))
    if unknown:
        raise ValueError(f"OOD set indices {unknown} outside 0..{len(set_names)} (0 = in-distribution)")
    out: dict[str, dict[str, dict]] = {}
    for name, values in scores.items():
        values = np.asarray(values.detach().cpu().double() if isinstance(values, torch.Tensor) else values,
                            dtype=np.float64).reshape(-1)
        if len(values) != len(source):
            raise ValueError(f"score {name!r}: {len(values)} values for {len(source)} samples")
        if not np.isfinite(values).all():
            raise ValueError(f"score {name!r}: {int((~np.isfinite(values)).sum())} non-finite value(s)")
        per = {set_name: ood_metrics(values[source == 0], values[source == k])
               for k, set_name in enumerate(set_names, start=1)}
        per["avg"] = {m: float(np.mean([per[s][m] for s in set_names])) for m in METRICS}
        out[name] = per
    return out


def flatten(results: dict[str, dict[str, dict]], prefix: str = "test/") -> dict[str, float]:
    """``{"<prefix><score>/<set>/<metric>": value}`` for the metrics in :data:`METRICS`."""
    return {f"{prefix}{score}/{set_name}/{m}": float(values[m])
            for score, per in results.items() for set_name, values in per.items() for m in METRICS}


class OODScores(Metric):
    """Per-sample OOD scores of a test epoch, gathered across ranks.

    ``update(index, ood_set, scores)`` takes each sample's position in the (unsharded) test set,
    its set index (0 = ID) and a dict of named scores (B,). ``compute()`` concatenates every
    rank's samples (torchmetrics syncs under DDP), drops the duplicates a distributed sampler
    pads with (same ``index``) and returns them sorted by ``index``, so the result does not
    depend on the number of ranks: ``{"index", "ood_set", "scores": {name: (N,)}}``.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("ood_set", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.names: list[str] | None = None

    def update(self, index: torch.Tensor, ood_set: torch.Tensor, scores: dict[str, torch.Tensor]) -> None:
        names = list(scores)
        if self.names is None:
            self.names = names
        elif names != self.names:
            raise ValueError(f"OOD score names changed within the epoch: {names} after {self.names}")
        n = len(index)
        for name, value in scores.items():
            if value.shape != (n,):
                raise ValueError(f"OOD score {name!r} has shape {tuple(value.shape)}, expected ({n},)")
        self.index.append(index.reshape(-1).long())
        self.ood_set.append(ood_set.reshape(-1).long())
        self.values.append(torch.stack([scores[k].detach().float() for k in names], dim=1))

    def compute(self) -> dict[str, Any]:
        index, source = dim_zero_cat(self.index), dim_zero_cat(self.ood_set)
        values = dim_zero_cat(self.values)
        order = torch.argsort(index, stable=True)
        sorted_index = index[order]
        keep = torch.ones_like(sorted_index, dtype=torch.bool)
        keep[1:] = sorted_index[1:] != sorted_index[:-1]
        pick = order[keep]
        return {"index": index[pick], "ood_set": source[pick],
                "scores": {name: values[pick, j] for j, name in enumerate(self.names or [])}}

    def reset(self) -> None:
        super().reset()
        self.names = None
