"""Surgical phase recognition metrics, the field's way, and evaluation of Cholec80-format files.

The computations are :mod:`vision_ft.metrics.temporal` (read its docstring for the pitfalls:
video-level vs frame-level averaging, phases absent from a video, relaxed boundaries,
Jaccard vs F1); this module fixes the surgical defaults — the 7 Cholec80 phases, a 10 s
relaxed boundary with the Cholec80 rule — and evaluates prediction files written in the
Cholec80 annotation format, as the M2CAI16 / Cholec80 evaluation scripts do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from vision_ft.errors import DataError
from vision_ft.metrics.temporal import aggregate, forgiven_frames, plot_phase_ribbon, sequence_metrics

from .formats import read_cholec80_phases
from .phases import CHOLEC80_PHASES

__all__ = ["aggregate", "evaluate_phase_files", "forgiven_frames", "format_report", "phase_metrics",
           "plot_phase_ribbon", "sequence_metrics"]


def phase_metrics(target: Sequence[int], pred: Sequence[int], fps: float = 1.0, relaxed_s: float = 0.0,
                  class_names: Sequence[str] = CHOLEC80_PHASES,
                  rule: Literal["general", "cholec80"] | None = None) -> dict[str, Any]:
    """One video's accuracy and per-phase precision / recall / Jaccard / F1.

    ``relaxed_s`` > 0 applies the relaxed boundary (``round(relaxed_s · fps)`` frames); the rule
    defaults to ``cholec80`` for the 7 Cholec80 phases and ``general`` otherwise.
    """
    rule = rule or ("cholec80" if list(class_names) == CHOLEC80_PHASES else "general")
    return sequence_metrics(target, pred, len(class_names), tolerance=int(round(relaxed_s * fps)), rule=rule)


def evaluate_phase_files(gt_dir: str | Path, pred_dir: str | Path, fps: float = 1.0, annotation_fps: float = 25.0,
                         relaxed_s: float = 10.0, class_names: Sequence[str] = CHOLEC80_PHASES,
                         pred_frames: Literal["native", "sampled"] = "sampled",
                         videos: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate ``pred_dir/videoXX-phase.txt`` against ``gt_dir/videoXX-phase.txt``.

    ``videos`` lists the video ids to evaluate (each must have both files); by default, every
    ground-truth video that has a prediction file (e.g. the test split, when ``pred_dir`` is a
    run's ``predictions/``). The evaluated ids are returned under ``"videos"``.

    Ground truth is subsampled to ``fps`` (rows whose frame is a multiple of
    ``annotation_fps / fps``). Predictions hold either the same native frame indices
    (``pred_frames="native"``, subsampled alike) or one row per sampled frame ``0, 1, 2 …``
    (``"sampled"``, as ``fit`` writes them into ``predictions/``). Lengths must match.

    Returns ``{"videos", "per_video": {id: metrics}, "strict": aggregate, "relaxed": aggregate}``
    (``relaxed`` only when ``relaxed_s > 0``).
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    step = int(round(annotation_fps / fps))
    index = {n: i for i, n in enumerate(class_names)}
    if videos is None:
        gt_files = [p for p in sorted(gt_dir.glob("*-phase.txt")) if (pred_dir / p.name).is_file()]
        if not gt_files:
            raise DataError(f"no '*-phase.txt' file in {pred_dir} matches one in {gt_dir}")
    else:
        gt_files = [gt_dir / f"{v}-phase.txt" for v in videos]
    per_video, relaxed = {}, {}
    for gt_path in gt_files:
        pred_path = pred_dir / gt_path.name
        for path in (gt_path, pred_path):
            if not path.is_file():
                raise DataError(f"{path} not found")
        frames, phases = read_cholec80_phases(gt_path)
        target = _indices([p for f, p in zip(frames, phases) if f % step == 0], index, gt_path)
        p_frames, p_phases = read_cholec80_phases(pred_path)
        if pred_frames == "native":
            p_phases = [p for f, p in zip(p_frames, p_phases) if f % step == 0]
        pred = _indices(p_phases, index, pred_path)
        if len(pred) != len(target):
            raise DataError(f"{pred_path}: {len(pred)} predicted frames for {len(target)} ground-truth frames at "
                            f"{fps} fps (pred_frames={pred_frames!r})")
        video = gt_path.name[: -len("-phase.txt")]
        per_video[video] = phase_metrics(target, pred, fps, 0.0, class_names)
        if relaxed_s > 0:
            relaxed[video] = phase_metrics(target, pred, fps, relaxed_s, class_names)
    out: dict[str, Any] = {"videos": list(per_video), "per_video": per_video,
                           "strict": aggregate(list(per_video.values()))}
    if relaxed:
        out["per_video_relaxed"] = relaxed
        out["relaxed"] = aggregate(list(relaxed.values()))
    return out


def format_report(results: dict[str, Any], class_names: Sequence[str] = CHOLEC80_PHASES) -> str:
    """A per-phase table (mean over videos) and the summary lines, in percent."""
    lines = []
    for kind in ("strict", "relaxed"):
        if kind not in results:
            continue
        r = results[kind]
        lines.append(f"== {kind} ({r['videos']} videos) ==")
        lines.append(f"{'phase':<26}{'Jacc':>7}{'Prec':>7}{'Rec':>7}{'F1':>7}")
        for i, name in enumerate(class_names):
            vals = [100 * r[f"{m}_per_class"][i] for m in ("jaccard", "precision", "recall", "f1")]
            lines.append(f"{name:<26}" + "".join(f"{v:7.2f}" for v in vals))
        lines.append(f"video accuracy {100 * r['video_acc']:.2f} ± {100 * r['video_acc_std']:.2f} (std over videos); "
                     f"frame accuracy {100 * r['frame_acc']:.2f}")
        lines.append(f"mean jaccard {100 * r['jaccard']:.2f}, precision {100 * r['precision']:.2f}, "
                     f"recall {100 * r['recall']:.2f}, F1 {100 * r['f1']:.2f}")
    return "\n".join(lines)


def _indices(phases: Sequence[str], index: dict[str, int], path: Path) -> np.ndarray:
    unknown = sorted(set(phases) - set(index))
    if unknown:
        raise DataError(f"{path}: unknown phase(s) {unknown}")
    return np.array([index[p] for p in phases], dtype=np.int64)
