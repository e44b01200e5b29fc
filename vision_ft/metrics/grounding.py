"""Grounding answers of vision-language models: parsing, coordinate frames, metrics, drawings.

Answers are JSON (inside a ```json fence or bare): a list of objects ``{"bbox_2d": [x1, y1, x2, y2],
"label"}`` / ``{"point_2d": [x, y], "label"}``, or ``{"count": n}``. Coordinates are in the model's frame:

- ``0-1000``: normalised to 0..1000 of the image (Qwen2-VL, Qwen3-VL);
- ``resized-pixels``: absolute pixels of the image as the processor resized it (Qwen2.5-VL);
- ``0-1``: normalised to 0..1; ``pixels``: pixels of the original image.

Everything is compared in original-image pixels. An answer that cannot be read counts as wrong and is
counted (``unparsed``), never skipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch

FRAMES = ("0-1000", "0-1", "pixels", "resized-pixels")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def parse_answer(text: str) -> list[dict[str, Any]] | None:
    """The objects of a JSON answer (a ``{"count"}`` answer is one object), or ``None`` if unreadable."""
    m = _FENCE.search(text)
    body = m.group(1) if m else text
    start = min((i for i in (body.find("["), body.find("{")) if i >= 0), default=-1)
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(body[start:])
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(x, dict) for x in items):
        return None
    for x in items:
        for key, n in (("bbox_2d", 4), ("point_2d", 2)):
            if key in x and not (isinstance(x[key], list) and len(x[key]) == n
                                 and all(isinstance(v, (int, float)) for v in x[key])):
                return None
    return items


def _scale(frame: str, original: tuple[int, int], resized: tuple[int, int] | None) -> tuple[float, float]:
    """Multipliers from the frame to original pixels, (x, y)."""
    w, h = original
    if frame == "0-1000":
        return w / 1000.0, h / 1000.0
    if frame == "0-1":
        return float(w), float(h)
    if frame == "pixels":
        return 1.0, 1.0
    if frame == "resized-pixels":
        if resized is None:
            raise ValueError("frame 'resized-pixels' needs the resized image size")
        return w / resized[0], h / resized[1]
    raise ValueError(f"unknown coordinate frame {frame!r}; choose from {FRAMES}")


def to_original(coords: list[float], frame: str, original: tuple[int, int],
                resized: tuple[int, int] | None = None) -> list[float]:
    sx, sy = _scale(frame, original, resized)
    return [v * (sx if i % 2 == 0 else sy) for i, v in enumerate(coords)]


def from_original(coords: list[float], frame: str, original: tuple[int, int],
                  resized: tuple[int, int] | None = None) -> list[int]:
    """Original-pixel coordinates in ``frame``, rounded to integers (how the answers are written)."""
    sx, sy = _scale(frame, original, resized)
    return [int(round(v / (sx if i % 2 == 0 else sy))) for i, v in enumerate(coords)]


def box_iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _matched_points(pred: list[list[float]], gt: list[list[float]], radius: float) -> int:
    """Greedy one-to-one matching of predicted points to ground-truth points by distance, within ``radius``."""
    pairs = sorted((((p[0] - g[0]) ** 2 + (p[1] - g[1]) ** 2) ** 0.5, i, j)
                   for i, p in enumerate(pred) for j, g in enumerate(gt))
    used_p, used_g, hits = set(), set(), 0
    for d, i, j in pairs:
        if d <= radius and i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
            hits += 1
    return hits


@dataclass
class GroundingScores:
    """Accumulates grounding answers (in original pixels) against ground-truth boxes; :meth:`compute` gives
    ``count_mae``, ``point_acc`` (matched within ``radius`` px / max(predicted, true)), ``box_map`` (COCO mAP,
    torchmetrics with pycocotools), ``mean_best_iou`` and ``unparsed`` (count)."""

    labels: list[str]
    radius: float = 10.0
    counts: list[tuple[int, int]] = field(default_factory=list)
    points: list[float] = field(default_factory=list)
    boxes: list[tuple[list[dict], list[dict]]] = field(default_factory=list)
    best_iou: list[float] = field(default_factory=list)
    unparsed: int = 0
    answered: int = 0
    unparsed_now: bool = False

    def add(self, kind: str, answer: list[dict[str, Any]] | None, truth: list[dict[str, Any]]) -> None:
        """``truth``: ``{"bbox": [x1, y1, x2, y2], "label"}`` in original pixels; ``answer``: parsed objects
        already in original pixels (``None``: unparsed)."""
        self.answered += 1
        self.unparsed_now = answer is None
        if answer is None:
            self.unparsed += 1
        answer = answer or []
        if kind == "count":
            n = answer[0].get("count") if len(answer) == 1 and "count" in answer[0] else None
            self.counts.append((int(n) if isinstance(n, (int, float)) else -1, len(truth)))
        elif kind == "point":
            pred = [a["point_2d"] for a in answer if "point_2d" in a]
            centres = [[(t["bbox"][0] + t["bbox"][2]) / 2, (t["bbox"][1] + t["bbox"][3]) / 2] for t in truth]
            denom = max(len(pred), len(centres))
            if self.unparsed_now:  # unreadable: wrong, even where there was nothing to point at
                self.points.append(0.0)
            else:
                self.points.append(1.0 if denom == 0 else _matched_points(pred, centres, self.radius) / denom)
        elif kind == "detect":
            pred = [a for a in answer if "bbox_2d" in a]
            self.boxes.append((pred, truth))
            for t in truth:
                self.best_iou.append(max((box_iou(p["bbox_2d"], t["bbox"]) for p in pred), default=0.0))
        else:
            raise ValueError(f"unknown grounding kind {kind!r}")

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {"unparsed": float(self.unparsed)}
        if self.counts:  # an unreadable count is off by the true count plus one
            out["count_mae"] = sum(abs(p - t) if p >= 0 else t + 1 for p, t in self.counts) / len(self.counts)
        if self.points:
            out["point_acc"] = sum(self.points) / len(self.points)
        if self.boxes:
            out["mean_best_iou"] = sum(self.best_iou) / len(self.best_iou) if self.best_iou else 0.0
            out["box_map"] = self._map()
        return out

    def _map(self) -> float:
        from torchmetrics.detection import MeanAveragePrecision

        index = {name: i for i, name in enumerate(self.labels)}
        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
        preds, targets = [], []
        for pred, truth in self.boxes:
            preds.append({"boxes": torch.tensor([p["bbox_2d"] for p in pred], dtype=torch.float32).reshape(-1, 4),
                          "scores": torch.ones(len(pred)),  # the answers carry no confidence
                          "labels": torch.tensor([index.get(str(p.get("label")), -1) for p in pred], dtype=torch.long)})
            targets.append({"boxes": torch.tensor([t["bbox"] for t in truth], dtype=torch.float32).reshape(-1, 4),
                            "labels": torch.tensor([index.get(t["label"], -1) for t in truth], dtype=torch.long)})
        metric.update(preds, targets)
        value = float(metric.compute()["map"])
        return max(value, 0.0)  # pycocotools reports -1 when no ground truth exists


def draw(image: Any, answer: list[dict[str, Any]] | None, truth: list[dict[str, Any]], path: Any) -> None:
    """The image with true boxes (green) and predicted boxes / points (red), as PNG."""
    from PIL import ImageDraw

    from ..io import atomic_save_png

    img = image.convert("RGB").copy()
    pen = ImageDraw.Draw(img)
    for t in truth:
        pen.rectangle(t["bbox"], outline=(0, 200, 0), width=2)
    for a in answer or []:
        if "bbox_2d" in a:
            pen.rectangle(a["bbox_2d"], outline=(230, 0, 0), width=2)
        if "point_2d" in a:
            x, y = a["point_2d"]
            pen.ellipse([x - 3, y - 3, x + 3, y + 3], outline=(230, 0, 0), width=2)
    atomic_save_png(img, path)
