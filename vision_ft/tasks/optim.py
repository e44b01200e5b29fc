"""The optimiser and LR schedule every task uses: AdamW (or nesterov SGD) with linear warm-up then
cosine decay to ``lr * min_lr_ratio``, stepped per optimiser step."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def make_optimizer(groups: list[dict[str, Any]], name: str, lr: float) -> torch.optim.Optimizer:
    """``adamw`` or ``sgd`` (momentum 0.9, nesterov) over parameter groups carrying their own lr / decay."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def warmup_cosine(total_steps: int, warmup_fraction: float, min_lr_ratio: float) -> Callable[[int], float]:
    """LR factor of step ``s``: ``(s + 1) / warmup`` during warm-up, then cosine from 1 to ``min_lr_ratio``."""
    total = max(1, int(total_steps))
    warmup = int(warmup_fraction * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
