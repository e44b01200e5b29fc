"""SPT stage 2: allocate the budget over the scored tensors (paper Sec. 3.2, Algorithm 1)."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch

from .scoring import NONE, SPARSE, STRUCTURED


def _float(bits: int) -> float:
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


def _bits(value: float) -> int:
    return int(np.array([value], dtype=np.float32).view(np.int32)[0])


@dataclass
class Allocation:
    """Result of :func:`allocate`: per site a mode and a count of selected entries."""

    modes: list[int]
    counts: list[int]  # selected entries (after the fill); for structured sites: the top-tau count
    tau: float
    total: int  # trainable parameters of the allocation (structured: P_mod; sparse: count)


def allocate(desc_scores: list[torch.Tensor], costs: list[int], ratios: list[float], budget: int) -> Allocation:
    """Global top-tau selection under ``budget`` (Algorithm 1 of the paper, exact).

    Args:
        desc_scores: per site, its scores sorted in descending order (1-D, >= 0).
        costs: per site, the cost of tuning it whole (``P_mod``, or ``d`` for a vector).
        ratios: per site, ``alpha`` (matrices) or ``beta`` (vectors): a site holding at
            least ``cost / ratio`` of the selected weights is tuned whole.
        budget: parameters to spend.
    """
    thresholds = [c / r for c, r in zip(costs, ratios)]
    ascending = [(-s).contiguous() for s in desc_scores]

    def counts_at(tau: float) -> list[int]:
        out = []
        for a in ascending:
            value = torch.tensor([-tau], dtype=a.dtype, device=a.device)
            out.append(int(torch.searchsorted(a, value, right=True)[0]) if a.numel() else 0)
        return out

    def total(counts: list[int]) -> int:
        return sum(cost if c >= t else c for c, cost, t in zip(counts, costs, thresholds))

    top = max((float(s[0]) for s in desc_scores if s.numel()), default=0.0)
    lo, hi = 0, _bits(top) + 1  # hi: tau above every score, nothing selected (total 0)
    while lo < hi:  # smallest tau (most weights) whose total fits the budget
        mid = (lo + hi) // 2
        if total(counts_at(_float(mid))) <= budget:
            hi = mid
        else:
            lo = mid + 1
    tau = _float(lo)
    counts = counts_at(tau)
    slack = budget - total(counts)
    # Fill the slack: continue down the global ranking over the tensors still below their
    # threshold; an entry that would make its tensor structured is taken only if the whole
    # module fits in what is left (otherwise that tensor is closed). Only the entries a tensor
    # can still take before its threshold matter, so each contributes a short window.
    windows: dict[int, list[float]] = {}
    for m, (s, c, t) in enumerate(zip(desc_scores, counts, thresholds)):
        if c < t and c < s.numel() and slack > 0:
            windows[m] = s[c:min(s.numel(), math.ceil(t), c + slack + 1)].tolist()
    heap = [(-w[0], m, 0) for m, w in windows.items()]
    heapq.heapify(heap)
    while slack > 0 and heap:
        _, m, pos = heapq.heappop(heap)
        c = counts[m]
        if c + 1 >= thresholds[m]:  # this entry makes the tensor structured
            if costs[m] - c <= slack:
                slack -= costs[m] - c
                counts[m] = c + 1
            continue
        counts[m] = c + 1
        slack -= 1
        if pos + 1 < len(windows[m]):
            heapq.heappush(heap, (-windows[m][pos + 1], m, pos + 1))
    modes = [STRUCTURED if c >= t else SPARSE if c > 0 else NONE for c, t in zip(counts, thresholds)]
    return Allocation(modes, counts, tau, total(counts))
