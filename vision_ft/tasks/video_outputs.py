"""What a video test writes to the run folder: the per-video table (``test_per_video.csv``), one
prediction file per video in the Cholec80 ``Frame<TAB>Phase`` layout (``predictions/<video>-phase.txt``)
and ribbon plots of predicted against true phases (``ribbon_<video>.png``)."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..export import atomic_write_text
from ..metrics.temporal import plot_phase_ribbon


def write_test_files(run_dir: Path, results: dict[str, Any], video_name: dict[int, str], class_names: list[str],
                     fps: float, ribbon_videos: int) -> None:
    """The table, the prediction files and the first ``ribbon_videos`` ribbons of a test's ``results``
    (``VideoPhaseTask._sequence_results``)."""
    table = io.StringIO()
    writer = csv.writer(table)
    header = ["video", "frames", "accuracy", "precision", "recall", "jaccard", "f1"]
    relaxed = results.get("per_video_relaxed")
    if relaxed:
        header += ["accuracy_relaxed", "jaccard_relaxed", "f1_relaxed"]
    writer.writerow(header)
    for v, m in sorted(results["per_video"].items()):
        row = [video_name[v], m["frames"], _r(m["accuracy"])] + [_r(_nanmean(m[k]))
                                                                for k in ("precision", "recall", "jaccard", "f1")]
        if relaxed:
            r = relaxed[v]
            row += [_r(r["accuracy"]), _r(_nanmean(r["jaccard"])), _r(_nanmean(r["f1"]))]
        writer.writerow(row)
    atomic_write_text(run_dir / "test_per_video.csv", table.getvalue())
    for v, (frames, pred, target) in sorted(results["videos"].items()):
        lines = ["Frame\tPhase"] + [f"{f}\t{class_names[p]}" for f, p in zip(frames, pred)]
        atomic_write_text(run_dir / "predictions" / f"{safe_name(video_name[v])}-phase.txt", "\n".join(lines) + "\n")
    for v in sorted(results["videos"])[:ribbon_videos]:
        frames, pred, target = results["videos"][v]
        acc = results["per_video"][v]["accuracy"]
        plot_phase_ribbon(target, pred, class_names, run_dir / f"ribbon_{safe_name(video_name[v])}.png",
                          fps=fps, title=f"{video_name[v]}: accuracy {acc:.3f} (test)")


def safe_name(name: str) -> str:
    """A video or class name as a file-name / metric-key component."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "x"


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def _r(value: float) -> str:
    return "" if value is None or np.isnan(value) else f"{float(value):.6f}"
