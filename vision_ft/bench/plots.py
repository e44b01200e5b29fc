"""The benchmark page's figures: step/memory/inference ratios per method and the transfer testbed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .goals import MERGE_GOAL, TIME_GOAL


def plot_ratios(train: dict[str, Any] | None, infer: dict[str, Any] | None, path: Path) -> Path | None:
    """Bars per method: step time and memory vs full fine-tuning, inference vs base, with the goals."""
    if not train and not infer:
        return None
    from ..plots import _save, plt

    panels = []
    if train:
        rows = train["rows"]
        labels = [r["method"] for r in rows]
        subject = [r["name"] != "full" for r in rows]
        panels.append(("train step time / full FT (grey: the reference itself)", labels,
                       [r.get("ratio_vs_full") for r in rows], TIME_GOAL, subject))
        panels.append(("persistent memory / full FT", labels,
                       [r["memory"].get("persistent_ratio_vs_full") for r in rows], None, subject))
        if any(r.get("peak") for r in rows):
            panels.append(("peak memory of steps / full FT", labels,
                           [(r.get("peak") or {}).get("ratio_vs_full") for r in rows], None, subject))
    if infer:
        rows = infer["rows"]
        labels = [r["method"] for r in rows]
        panels.append(("inference / base (merged; grey: not mergeable, unmerged, no goal)", labels,
                       [r["merged_ratio"] if r.get("merged_ratio") is not None else r["unmerged_ratio"]
                        for r in rows], MERGE_GOAL, [r.get("merged_ratio") is not None for r in rows]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7, 0.6 * max(len(p[1]) for p in panels) + 2),
                                                      2.8 * len(panels)), squeeze=False)
    for ax, (title, labels, values, goal, subject) in zip(axes[:, 0], panels):
        vals = [float("nan") if v is None else v for v in values]
        colors = ["tab:gray" if not sub else "tab:red" if goal is not None and v == v and v > goal else "tab:blue"
                  for v, sub in zip(vals, subject)]
        ax.bar(range(len(vals)), vals, color=colors)
        ax.axhline(1.0, color="black", lw=0.8)
        if goal is not None:
            ax.axhline(goal, color="tab:green", ls="--", lw=1, label=f"goal {goal:.2f}")
            ax.legend(fontsize=8, loc="upper left")
        ax.set_xticks(range(len(labels)), labels=labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_transfer(transfer: dict[str, Any] | None, path: Path) -> Path | None:
    """Target accuracy and source retention vs trainable parameters (head included, log scale)."""
    if not transfer:
        return None
    from ..plots import _save, plt

    rows = transfer["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "target_acc", "target accuracy"), (axes[1], "retention", "source retention")):
        for r in rows:
            x = max(1, r["trainable_with_head"])
            ax.errorbar([x], [r[f"{key}_mean"]], yerr=[r[f"{key}_std"]], fmt="o", capsize=3)
            ax.annotate(r["method"], (x, r[f"{key}_mean"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if key == "retention" and transfer.get("source_acc") is not None:
            ax.axhline(transfer["source_acc"], color="gray", ls="--", lw=1, label="source acc before adaptation")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (head included, log)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} (mean ± std over {len(transfer['seeds'])} seeds)", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


# --- the page ------------------------------------------------------------------------------------------
