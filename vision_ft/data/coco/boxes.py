"""Box formats: COCO ``[x, y, w, h]`` pixels <-> ``[cx, cy, w, h]`` normalised (DETR-family losses).

:func:`coco_to_cxcywh` and :func:`cxcywh_to_coco` are the only two places that convert.
"""

from __future__ import annotations

import torch
from torchvision.ops import box_convert


def coco_to_cxcywh(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """COCO ``[x, y, w, h]`` in pixels → ``[cx, cy, w, h]`` normalised by the image size."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    scale = boxes.new_tensor([width, height, width, height])
    return box_convert(boxes, in_fmt="xywh", out_fmt="cxcywh") / scale


def cxcywh_to_coco(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """``[cx, cy, w, h]`` normalised → COCO ``[x, y, w, h]`` in pixels (inverse of :func:`coco_to_cxcywh`)."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    scale = boxes.new_tensor([width, height, width, height])
    return box_convert(boxes * scale, in_fmt="cxcywh", out_fmt="xywh")


def xyxy_to_coco(boxes: torch.Tensor) -> torch.Tensor:
    """``[x0, y0, x1, y1]`` → COCO ``[x, y, w, h]`` (same units)."""
    return box_convert(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4), in_fmt="xyxy", out_fmt="xywh")
