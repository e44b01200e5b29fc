"""The bookkeeping every adapted module carries: its updates and the tensors each method registered."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

#: attribute (on a host or reader module) holding its :class:`_HostState`
_STATE = "_vft_site_state"

Branch = Callable[[nn.Module, torch.Tensor], torch.Tensor]
Dense = Callable[[nn.Module], torch.Tensor]


@dataclass(eq=False)
class _Update:
    owner: str  # the method's prefix
    ref: Any  # WeightRef of the site
    role: str
    block: int | None
    start: int
    stop: int
    kind: str  # "branch" | "affine" | "map" | "weight"
    fn: Callable | None = None  # branch: (host, x) -> dy ; map: (host, y) -> y' ; weight: (host, W) -> W'
    delta: Dense | None = None  # branch: dense Delta W rows (host) -> (stop-start, in...)
    bias_delta: Dense | None = None  # branch: Delta b rows
    exact: Callable[[nn.Module], bool] | None = None  # branch: fn(x) == x dW^T + db now
    scale: str | None = None  # affine: tensor names on the host
    shift: str | None = None
    down: Dense | None = None  # low-rank branch: fn(x) = up (down pre(x)), factors (r, in') / (rows, r)
    up: Dense | None = None
    pre: Branch | None = None  # input transform (host, x) -> x' (dropout...); returns x itself when idle


@dataclass(eq=False)
class _HostState:
    updates: list[_Update] = field(default_factory=list)
    tensors: dict[str, list[str]] = field(default_factory=dict)  # owner -> registered names


def _state(module: nn.Module, create: bool = False) -> _HostState | None:
    state = module.__dict__.get(_STATE)
    if state is None and create:
        state = _HostState()
        module.__dict__[_STATE] = state
    return state
