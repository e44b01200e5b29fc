"""Per-frame sequence metrics (phase / step / action recognition in videos) and a ribbon plot.

Every function here takes one video's per-frame class indices: ``target`` and ``pred``
are 1-D integer arrays of equal length; ``ignore_index`` (default ``-1``) marks frames
without a label, which are dropped before anything is computed.

How the field computes them, and the pitfalls (surgical phase recognition on Cholec80 /
M2CAI16 is the reference; the same applies to any per-frame video labelling):

- **Per video, then averaged over videos.** Accuracy is computed per video and averaged
  over videos (``video_acc``); pooling all frames of all videos (``frame_acc``) weights long
  videos more and gives a different number. Per-phase precision, recall, Jaccard and F1 are
  computed per video, averaged over the videos where they are defined, then averaged over
  phases. Report which one you use: numbers computed the other way are not comparable.
- **Phases absent from a video.** A phase that does not occur in a video's ground truth has
  undefined recall and Jaccard there; like the M2CAI16 evaluation script, precision, recall,
  Jaccard and F1 are then NaN for that video and excluded from the averages (``nanmean``).
  A phase that occurs but is never predicted has precision 0/0: also NaN here (as in that
  script), which *flatters* mean precision — a model that never predicts a rare phase loses
  recall but not precision. ``zero_division=0.0`` scores it as 0 instead.
- **Jaccard vs F1.** Per phase, Jaccard = TP / (TP + FP + FN) and F1 = 2TP / (2TP + FP + FN),
  so F1 = 2J / (1 + J) ≥ J: the two rank methods alike on one phase but are not
  interchangeable numbers. F1 here is computed per video and phase as 2TP / (|pred| + |gt|)
  (the harmonic mean of that video's precision and recall), which is defined whenever the
  phase occurs: a phase never predicted gets F1 = 0 even though its precision is undefined.
  Some papers instead combine the *averaged* precision and recall, which gives a different
  (usually higher) value.
- **Relaxed boundaries.** Annotated phase transitions are ambiguous by several seconds. The
  M2CAI16 / Cholec80 evaluation forgives, within ``tolerance`` frames (10 s) after the start
  of each ground-truth phase segment, predictions of the *previous* phase (late transition),
  and within ``tolerance`` frames before its end, predictions of the *next* phase (early
  transition). Forgiven frames count as correct for accuracy and as true positives for the
  predicted phase, so relaxed precision/recall can exceed 1 and are clipped to 1 (as the
  script does). ``rule="cholec80"`` adds the script's dataset-specific extras for the 7
  Cholec80 phases (dissection/packaging and cleaning/retraction may also jump by two). In
  our reading, the widely copied MATLAB script indexes the early-transition mask of the
  segment's *tail* into its *head* (MATLAB logical indexing with a shorter mask), so its
  early-transition relaxation does not act where documented; we implement the documented
  intent. Relaxed numbers are not comparable with strict ones, and with segments shorter
  than ``2 × tolerance`` (short videos, coarse sampling) they approach 1 regardless of the
  model: always report strict metrics too.
- **Unlabelled frames** (``ignore_index``) are removed and the remaining frames are
  concatenated, so a gap does not create a segment boundary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ..io import atomic_save_png

RelaxedRule = Literal["general", "cholec80"]
METRICS = ("precision", "recall", "jaccard", "f1")


# --- segments and relaxed boundaries ---------------------------------------------------------
def segments(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True in a 1-D boolean array, as ``[start, stop)`` pairs."""
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        return []
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def forgiven_frames(target: np.ndarray, pred: np.ndarray, num_classes: int, tolerance: int,
                    rule: RelaxedRule = "general") -> np.ndarray:
    """Frames whose error is forgiven by the relaxed-boundary rule (see the module docstring).

    For each ground-truth segment of class ``c`` (length ``L``, window ``t = min(tolerance, L)``):
    in its first ``t`` frames a prediction of ``c - 1`` is forgiven, in its last ``t`` frames a
    prediction of ``c + 1``. ``rule="cholec80"`` (7 phases, indices 0-6) also forgives ``c + 2``
    at the end of phases 3-6 and ``c - 2`` at the start of phases 5-6.
    """
    target, pred = np.asarray(target), np.asarray(pred)
    forgiven = np.zeros(target.shape, dtype=bool)
    if tolerance <= 0:
        return forgiven
    if rule == "cholec80" and num_classes != 7:
        raise ValueError(f"relaxed rule 'cholec80' is defined for the 7 Cholec80 phases, got {num_classes} classes")
    diff = pred.astype(np.int64) - target.astype(np.int64)
    for c in range(num_classes):
        late, early = [-1], [1]
        if rule == "cholec80" and c in (3, 4):
            early = [1, 2]
        elif rule == "cholec80" and c in (5, 6):
            late, early = [-1, -2], [1, 2]
        for start, stop in segments(target == c):
            t = min(tolerance, stop - start)
            head, tail = slice(start, start + t), slice(stop - t, stop)
            forgiven[head] |= np.isin(diff[head], late)
            forgiven[tail] |= np.isin(diff[tail], early)
    return forgiven


# --- one video ---------------------------------------------------------------------------------
def sequence_metrics(target: Sequence[int] | np.ndarray, pred: Sequence[int] | np.ndarray, num_classes: int,
                     tolerance: int = 0, rule: RelaxedRule = "general", ignore_index: int = -1,
                     zero_division: float = float("nan")) -> dict[str, Any]:
    """Accuracy and per-class precision / recall / Jaccard / F1 of one video.

    Args:
        target, pred: per-frame class indices (same length).
        num_classes: number of classes; per-class arrays have this length.
        tolerance: relaxed boundary in frames (``10 s × fps``); 0 = strict.
        rule: ``general`` or ``cholec80`` (see :func:`forgiven_frames`).
        ignore_index: target value of unlabelled frames (dropped).
        zero_division: precision of a class present in the target but never predicted.

    Returns:
        ``{"accuracy": float, "frames": int, "precision"|"recall"|"jaccard"|"f1": (C,) arrays}``;
        per-class values are NaN for classes absent from the target.
    """
    target, pred = np.asarray(target, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    if target.shape != pred.shape or target.ndim != 1:
        raise ValueError(f"target and pred must be 1-D and of equal length, got {target.shape} and {pred.shape}")
    keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    if target.size and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target classes must be in [0, {num_classes}) or {ignore_index}")
    correct = (pred == target) | forgiven_frames(target, pred, num_classes, tolerance, rule)
    out: dict[str, Any] = {"frames": int(target.size),
                           "accuracy": float(correct.mean()) if target.size else float("nan")}
    per = {k: np.full(num_classes, np.nan) for k in METRICS}
    for c in range(num_classes):
        in_target, in_pred = target == c, pred == c
        n_target = int(in_target.sum())
        if n_target == 0:
            continue
        union = in_target | in_pred
        tp = float(correct[union].sum())
        n_pred = int(in_pred.sum())
        p = min(1.0, tp / n_pred) if n_pred else zero_division
        r = min(1.0, tp / n_target)
        per["precision"][c], per["recall"][c] = p, r
        per["jaccard"][c] = min(1.0, tp / int(union.sum()))
        per["f1"][c] = min(1.0, 2 * tp / (n_pred + n_target))  # harmonic mean of P and R before clipping
    out.update(per)
    return out


def aggregate(per_video: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Average per-video results the field's way.

    Returns ``video_acc`` (mean of per-video accuracy) and ``video_acc_std``; per-class arrays
    ``<metric>_per_class`` (``nanmean`` over the videos where the class occurs); and the
    summary ``<metric>`` = mean over classes of those (``nanmean``: a class absent from every
    video is skipped). ``frame_acc`` pools all frames, for contrast.
    """
    if not per_video:
        raise ValueError("no videos to aggregate")
    acc = np.array([v["accuracy"] for v in per_video], dtype=np.float64)
    frames = np.array([v["frames"] for v in per_video], dtype=np.float64)
    out: dict[str, Any] = {"videos": len(per_video), "video_acc": float(np.nanmean(acc)),
                           "video_acc_std": float(np.nanstd(acc)),
                           "frame_acc": float(np.nansum(acc * frames) / max(frames.sum(), 1.0))}
    for key in METRICS:
        stacked = np.stack([v[key] for v in per_video])  # (videos, classes)
        with np.errstate(all="ignore"):
            counts = (~np.isnan(stacked)).sum(0)
            per_class = np.where(counts > 0, np.nansum(stacked, 0) / np.maximum(counts, 1), np.nan)
        out[f"{key}_per_class"] = per_class
        out[key] = float(np.nanmean(per_class)) if np.any(~np.isnan(per_class)) else float("nan")
    return out


# --- collecting per-frame predictions under DDP ------------------------------------------------
class PerFramePredictions(Metric):
    """Gathers per-frame ``(video, frame, pred, target)`` across processes.

    ``compute()`` returns ``{video_index: (frames, pred, target)}`` sorted by frame, with the
    duplicates a ``DistributedSampler`` pads in removed, so per-video sequence metrics are
    exact under DDP.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("video", "frame", "pred", "target"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, video: torch.Tensor, frame: torch.Tensor, pred: torch.Tensor, target: torch.Tensor) -> None:
        for name, value in (("video", video), ("frame", frame), ("pred", pred), ("target", target)):
            getattr(self, name).append(value.detach().long().reshape(-1))

    def compute(self) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if not self.video:
            return {}
        video, frame, pred, target = (dim_zero_cat(getattr(self, n)).cpu().numpy()
                                      for n in ("video", "frame", "pred", "target"))
        out = {}
        for v in np.unique(video):
            sel = video == v
            frames, first = np.unique(frame[sel], return_index=True)
            out[int(v)] = (frames, pred[sel][first], target[sel][first])
        return out


# --- ribbon plot --------------------------------------------------------------------------------
def plot_phase_ribbon(target: Sequence[int] | np.ndarray, pred: Sequence[int] | np.ndarray,
                      class_names: Sequence[str], path: str | Path, fps: float = 1.0, title: str = "",
                      ignore_index: int = -1) -> Path:
    """Ground truth over prediction as two colour bars along time (one colour per class), PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    target, pred = np.asarray(target), np.asarray(pred)
    k = len(class_names)
    base = plt.get_cmap("tab20" if k > 10 else "tab10")
    colours = [base(i % base.N) for i in range(k)] + [(0.85, 0.85, 0.85, 1.0)]  # last: unlabelled
    cmap = ListedColormap(colours)
    rows = np.stack([np.where(target == ignore_index, k, target), np.where(pred < 0, k, pred)])
    seconds = len(target) / max(fps, 1e-9)
    fig, ax = plt.subplots(figsize=(10, 2.2 + 0.18 * ((k + 3) // 4)))
    ax.imshow(rows, aspect="auto", cmap=cmap, vmin=-0.5, vmax=k + 0.5, interpolation="nearest",
              extent=(0, seconds, 1.5, -0.5))
    ax.set_yticks([0, 1], labels=["ground truth", "prediction"])
    ax.set_xlabel("time (s)")
    ax.set_title(title or "phases")
    present = sorted(set(np.unique(rows).tolist()))
    handles = [Patch(color=colours[i], label=class_names[i] if i < k else "unlabelled") for i in present]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=4, fontsize=7, frameon=False)
    fig.tight_layout()
    try:
        return atomic_save_png(fig, path, dpi=100)
    finally:
        plt.close(fig)
