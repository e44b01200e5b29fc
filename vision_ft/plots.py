"""PNG plots written into a run directory (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io import atomic_save_png  # noqa: E402


def plot_curves(history: dict[str, list[tuple[float, float]]], path: str | Path, title: str = "") -> Path:
    """One panel for losses, one for the other metrics; x is the epoch (fractional for steps)."""
    losses = {k: v for k, v in history.items() if "loss" in k and v}
    others = {k: v for k, v in history.items() if "loss" not in k and v}
    panels = [p for p in (losses, others) if p]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name, points in sorted(panel.items()):
            xs, ys = zip(*points)
            style = "-" if len(points) > 30 else "-o"
            ax.plot(xs, ys, style, label=name, alpha=0.5 if name.endswith("step") else 1.0,
                    markersize=3)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_title(title or "training curves")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str | Path,
                          title: str = "confusion matrix") -> Path:
    """Counts, with row-normalised colour (recall per true class)."""
    matrix = np.asarray(matrix)
    n = len(class_names)
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                        color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_per_label(values: Sequence[float], labels: Sequence[str], path: str | Path,
                   metric: str = "AUROC") -> Path:
    """A bar per label (multi-label tasks)."""
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(labels) + 2), 4))
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(labels)), labels=labels, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel(metric)
    ax.set_title(f"per-label {metric}")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    try:
        return atomic_save_png(fig, path, dpi=110)
    finally:
        plt.close(fig)
