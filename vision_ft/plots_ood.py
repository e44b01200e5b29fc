"""PNG plots of OOD detection results (matplotlib, headless): ROC curves and score histograms.

Kept apart from :mod:`vision_ft.plots` (training curves, confusion matrices); same conventions:
Agg backend, atomic writes. Scores are "higher = more in-distribution"; the ROC's positive class
is in-distribution (TPR = ID kept, FPR = OOD accepted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from .plots import _save  # noqa: E402


def plot_ood_roc(id_scores: np.ndarray, ood_scores: dict[str, np.ndarray], path: str | Path,
                 score_name: str, results: dict[str, dict[str, Any]] | None = None) -> Path:
    """One ROC curve per OOD set; the legend gives AUROC and FPR95 from ``results`` (the output of
    :func:`vision_ft.metrics.ood.evaluate_ood` for this score), the FPR95 points are marked."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    id_scores = np.asarray(id_scores, dtype=np.float64)
    for name, neg in ood_scores.items():
        neg = np.asarray(neg, dtype=np.float64)
        labels = np.r_[np.ones(len(id_scores)), np.zeros(len(neg))]
        fpr, tpr, _ = roc_curve(labels, np.r_[id_scores, neg])
        label = name
        if results and name in results:
            r = results[name]
            label = f"{name} (AUROC {r['auroc']:.3f}, FPR95 {r['fpr95']:.3f})"
        (line,) = ax.plot(fpr, tpr, label=label)
        if results and name in results:
            ax.plot([results[name]["fpr95"]], [results[name]["tpr"]], "o", color=line.get_color(), markersize=5)
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.axhline(0.95, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("FPR (OOD accepted as in-distribution)")
    ax.set_ylabel("TPR (in-distribution kept)")
    ax.set_title(f"ROC, score {score_name!r} (ID positive)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_ood_histograms(id_scores: np.ndarray, ood_scores: dict[str, np.ndarray], path: str | Path,
                        score_name: str, results: dict[str, dict[str, Any]] | None = None) -> Path:
    """One panel per OOD set: density histograms of the ID and that set's scores on shared bins,
    with the FPR95 threshold as a vertical line when ``results`` are given."""
    id_scores = np.asarray(id_scores, dtype=np.float64)
    every = np.concatenate([id_scores, *[np.asarray(v, dtype=np.float64) for v in ood_scores.values()]])
    lo, hi = float(every.min()), float(every.max())
    if hi <= lo:  # all scores equal: one bin around the value
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 41)
    n = len(ood_scores)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    for ax, (name, neg) in zip(axes[0], ood_scores.items()):
        ax.hist(id_scores, bins=bins, density=True, alpha=0.55, label=f"ID (n={len(id_scores)})")
        ax.hist(np.asarray(neg, dtype=np.float64), bins=bins, density=True, alpha=0.55,
                label=f"{name} (n={len(neg)})")
        if results and name in results:
            ax.axvline(results[name]["threshold"], color="black", linestyle="--", linewidth=0.9,
                       label=f"FPR95 threshold (FPR {results[name]['fpr95']:.3f})")
        ax.set_xlabel(f"{score_name} (higher = in-distribution)")
        ax.set_ylabel("density")
        ax.set_title(f"ID vs {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
