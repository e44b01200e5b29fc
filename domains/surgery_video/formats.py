"""Readers and writers of the phase annotation files (standard library + numpy only).

- **Cholec80** ``videoXX-phase.txt``: tab-separated, a header ``Frame<TAB>Phase``, then one
  row per frame of the 25-fps video: the frame index (from 0) and the phase *name*.
- **HeiCo / EndoVis 2017** phase CSV: one row per video frame, ``frame,phase_id`` (ids 0-13,
  :data:`~domains.surgery_video.phases.HEICO_PHASES`); a header line is tolerated. The
  challenge describes per-frame CSVs; the exact file naming is not verified here (see the card).
- **JSON phase ranges** (this kit's own interchange format, not a dataset's): ``{"phases":
  [{"start": s, "end": s, "phase": name}, ...], "classes": [...]}`` with times in seconds,
  ``start`` inclusive, ``end`` exclusive; ``classes`` (optional) fixes the class order.

Every parse error names the file and the line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vision_ft.errors import DataError

_EPS = 1e-6


# --- Cholec80 -----------------------------------------------------------------------------------
def read_cholec80_phases(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """``(frame indices (N,) int64, phase names)`` of a ``videoXX-phase.txt`` file."""
    path = Path(path)
    frames, phases = [], []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if number == 1 and parts[0].lower() == "frame":
                continue
            if len(parts) != 2 or not parts[0].lstrip("-").isdigit():
                raise DataError(f"{path}:{number}: expected '<frame><TAB><phase>', got {line.strip()!r}")
            frames.append(int(parts[0]))
            phases.append(parts[1])
    if not frames:
        raise DataError(f"{path}: no annotated frames")
    array = np.asarray(frames, dtype=np.int64)
    if np.any(np.diff(array) <= 0):
        raise DataError(f"{path}: frame indices are not strictly increasing")
    return array, phases


def write_cholec80_phases(path: str | Path, phases: Sequence[str], frames: Sequence[int] | None = None) -> Path:
    """Write phase names, one per frame (frames ``0..N-1`` unless given), in the Cholec80 format."""
    path = Path(path)
    frames = range(len(phases)) if frames is None else frames
    if len(frames) != len(phases):
        raise ValueError(f"{len(frames)} frames for {len(phases)} phases")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("Frame\tPhase\n")
        f.writelines(f"{int(i)}\t{name}\n" for i, name in zip(frames, phases))
    return path


# --- HeiCo CSV ----------------------------------------------------------------------------------
def read_heico_phase_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(frame indices, phase ids)`` of a frame-wise phase CSV (``frame,phase_id`` rows)."""
    path = Path(path)
    frames, ids = [], []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            parts = [p for p in re.split(r"[,;\s]+", line.strip()) if p]
            if not parts:
                continue
            if not all(p.lstrip("-").isdigit() for p in parts[:2]):
                if number == 1:  # header
                    continue
                raise DataError(f"{path}:{number}: expected '<frame>,<phase id>', got {line.strip()!r}")
            if len(parts) < 2:
                raise DataError(f"{path}:{number}: expected '<frame>,<phase id>', got {line.strip()!r}")
            frames.append(int(parts[0]))
            ids.append(int(parts[1]))
    if not frames:
        raise DataError(f"{path}: no annotated frames")
    return np.asarray(frames, dtype=np.int64), np.asarray(ids, dtype=np.int64)


def write_heico_phase_csv(path: str | Path, phase_ids: Sequence[int]) -> Path:
    """Write one ``frame,phase_id`` row per video frame."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(f"{i},{int(p)}\n" for i, p in enumerate(phase_ids))
    return path


# --- JSON phase ranges --------------------------------------------------------------------------
def read_phase_json(path: str | Path) -> tuple[list[tuple[float, float, str]], list[str] | None]:
    """``([(start_s, end_s, phase), ...] sorted by start, classes or None)``; overlaps are an error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("phases"), list):
        raise DataError(f"{path}: expected an object with a 'phases' list of {{start, end, phase}}")
    ranges = []
    for i, item in enumerate(data["phases"]):
        try:
            start, end, name = float(item["start"]), float(item["end"]), str(item["phase"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: phases[{i}] needs numeric 'start', 'end' (seconds) and a 'phase' name") from None
        if not end > start >= 0:
            raise DataError(f"{path}: phases[{i}] has start {start} and end {end}; need 0 <= start < end")
        ranges.append((start, end, name))
    ranges.sort(key=lambda r: r[0])
    for (s0, e0, n0), (s1, _, n1) in zip(ranges, ranges[1:]):
        if s1 < e0 - _EPS:
            raise DataError(f"{path}: phase ranges overlap ({n0!r} ends at {e0}, {n1!r} starts at {s1})")
    classes = data.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{path}: 'classes' must be a list of phase names")
    return ranges, classes


def write_phase_json(path: str | Path, ranges: Sequence[dict[str, Any]] | Sequence[tuple[float, float, str]],
                     classes: Sequence[str] | None = None) -> Path:
    """Write phase ranges (``{"start", "end", "phase"}`` dicts or tuples) as JSON."""
    items = [r if isinstance(r, dict) else {"start": r[0], "end": r[1], "phase": r[2]} for r in ranges]
    data: dict[str, Any] = {"phases": [{"start": float(r["start"]), "end": float(r["end"]), "phase": str(r["phase"])}
                                       for r in items]}
    if classes is not None:
        data["classes"] = list(classes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def labels_to_ranges(labels: Sequence[int], fps: float, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Runs of equal labels at ``fps`` → ``[{"start", "end", "phase"}]`` in seconds (label -1: no range)."""
    labels = np.asarray(labels, dtype=np.int64)
    out = []
    start = 0
    for k in range(1, len(labels) + 1):
        if k == len(labels) or labels[k] != labels[start]:
            if labels[start] >= 0:
                out.append({"start": start / fps, "end": k / fps, "phase": class_names[labels[start]]})
            start = k
    return out


def ranges_to_labels(ranges: Sequence[tuple[float, float, str]], times: np.ndarray,
                     class_index: dict[str, int], source: str = "") -> np.ndarray:
    """The label of each time (s): the range with ``start <= t < end``; ``-1`` where none covers it."""
    times = np.asarray(times, dtype=np.float64)
    labels = np.full(times.shape, -1, dtype=np.int64)
    for start, end, name in ranges:
        if name not in class_index:
            raise DataError(f"{source}: unknown phase {name!r}; known: {sorted(class_index)} "
                            "(set data.init_args.class_names)")
        labels[(times >= start - _EPS) & (times < end - _EPS)] = class_index[name]
    return labels
