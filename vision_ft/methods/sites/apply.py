"""How the updates of a module reach its output, and how they fold into its weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import AdapterError
from ._state import Branch, Dense, _state, _Update


def _rows_apply(host: nn.Module, ups: list[_Update], x: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    for u in ups:
        if u.kind == "branch":
            y = y + u.fn(host, x).to(y.dtype)
        elif u.kind == "affine":
            shape = [1] * y.dim()
            shape[dim] = -1
            if u.scale is not None:
                y = y * getattr(host, u.scale).to(y.dtype).view(shape)
            if u.shift is not None:
                y = y + getattr(host, u.shift).to(y.dtype).view(shape)
        else:
            y = u.fn(host, y)
    return y


def _lowrank_fn(down: Dense, up: Dense, pre: Branch | None, host: nn.Module, x: torch.Tensor) -> torch.Tensor:
    d = down(host)
    x = x.to(d.dtype)
    if pre is not None:
        x = pre(host, x)
    return F.linear(F.linear(x, d), up(host))


def _lowrank_delta(down: Dense, up: Dense, host: nn.Module) -> torch.Tensor:
    return up(host) @ down(host)


def _lowrank_all(host: nn.Module, ups: list[_Update], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Every update is a low-rank branch: ``y + H U^T`` with ``H = [down_i pre_i(x)]`` (one matmul when no
    ``pre`` is active) and ``U`` the ups placed at their rows and columns (zeros elsewhere)."""
    downs = [u.down(host) for u in ups]
    dtype = downs[0].dtype
    xd = x.to(dtype)
    inputs = [xd if u.pre is None else u.pre(host, xd) for u in ups]
    if all(i is xd for i in inputs) and len({d.shape[1] for d in downs}) == 1:
        h = F.linear(xd, downs[0] if len(downs) == 1 else torch.cat(downs, 0))
    else:
        h = torch.cat([F.linear(i, d) for i, d in zip(inputs, downs)], -1)
    ranks = [d.shape[0] for d in downs]
    if len(ups) == 1 and ups[0].start == 0 and ups[0].stop == y.shape[-1]:
        up = ups[0].up(host)
    else:
        up = h.new_zeros(y.shape[-1], sum(ranks))
        col = 0
        for u, r in zip(ups, ranks):
            up[u.start:u.stop, col:col + r] = u.up(host)
            col += r
    return y + F.linear(h, up).to(y.dtype)


def _branch_delta(host: nn.Module, ups: list[_Update], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The full-width sum of parallel branches on row ranges: each layer of disjoint ranges is one
    ``cat`` of their outputs with zeros in the gaps (a bias delta broadcasts over the tokens)."""
    width = y.shape[-1]
    groups: dict[tuple[int, int], list[_Update]] = {}
    for u in ups:
        groups.setdefault((u.start, u.stop), []).append(u)
    layers: list[list[tuple[int, int]]] = []
    for span in sorted(groups):
        for layer in layers:
            if layer[-1][1] <= span[0]:
                layer.append(span)
                break
        else:
            layers.append([span])
    lead = list(y.shape[:-1])
    total = None
    for layer in layers:
        pieces, prev = [], 0
        for start, stop in layer:
            if start > prev:
                pieces.append(y.new_zeros(lead + [start - prev]))
            d = sum(u.fn(host, x).to(y.dtype) for u in groups[(start, stop)])
            pieces.append(d.expand(lead + [stop - start]))
            prev = stop
        if prev < width:
            pieces.append(y.new_zeros(lead + [width - prev]))
        d = pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)
        total = d if total is None else total + d
    return total


def _transform(host: nn.Module, ups: list[_Update], x: torch.Tensor, y: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Apply the updates (grouped by row range) to ``y``.

    Only parallel branches (the LoRA family, sparse and bias deltas): ``y`` plus the low-rank ones as
    one product and the others as full-width deltas -- never slicing ``y``, whose backward would cost
    a zero-filled full-size buffer per slice. With scale/shift or output maps, disjoint groups are
    transformed on their slices and assembled with one cat, overlapping ones one after the other."""
    if dim in (-1, y.dim() - 1) and all(u.kind == "branch" for u in ups):
        low = [u for u in ups if u.down is not None]
        rest = [u for u in ups if u.down is None]
        out = _lowrank_all(host, low, x, y) if low else y
        return out + _branch_delta(host, rest, x, y) if rest else out
    width = y.shape[dim]
    groups: dict[tuple[int, int], list[_Update]] = {}
    for u in ups:
        groups.setdefault((u.start, width if u.stop is None else u.stop), []).append(u)
    spans = sorted(groups)
    if len(spans) == 1 and spans[0] == (0, width):
        return _rows_apply(host, ups, x, y, dim)
    if all(a[1] <= b[0] for a, b in zip(spans, spans[1:])):  # disjoint
        pieces, prev = [], 0
        for start, stop in spans:
            if start > prev:
                pieces.append(y.narrow(dim, prev, start - prev))
            pieces.append(_rows_apply(host, groups[(start, stop)], x, y.narrow(dim, start, stop - start), dim))
            prev = stop
        if prev < width:
            pieces.append(y.narrow(dim, prev, width - prev))
        return torch.cat(pieces, dim)
    for (start, stop), group in groups.items():  # overlapping ranges: one after the other
        rows = _rows_apply(host, group, x, y.narrow(dim, start, stop - start), dim)
        y = torch.cat([y.narrow(dim, 0, start), rows, y.narrow(dim, stop, width - stop)], dim)
    return y


#: modules whose output channels are on dim 1
_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _output_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    ups = [u for u in _state(module).updates if u.kind != "weight"]
    if not ups:
        return output
    dim = 1 if isinstance(module, _CHANNELS_FIRST) else -1
    return _transform(module, ups, args[0], output, dim)


def _fold(host: nn.Module, w: torch.Tensor, b: torch.Tensor | None, ups: list[_Update],
          offset: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W, b)`` of rows ``offset:offset+len(w)`` with ``ups`` folded in (differentiable)."""
    def rows(t: torch.Tensor | None, u: _Update) -> tuple[int, int]:
        return u.start - offset, u.stop - offset

    for u in ups:
        s, e = rows(w, u)
        whole = s == 0 and e == w.shape[0]
        if u.kind == "map":
            raise AdapterError(f"{u.owner.rstrip('_')} applies a non-linear map: no effective weight exists")
        if u.kind == "weight":  # the whole tensor, replaced (never a row slice: see Site.add_weight_map)
            w = u.fn(host, w)
            continue
        if u.kind == "branch":
            if u.delta is None and u.bias_delta is None:
                raise AdapterError(f"{u.owner.rstrip('_')}'s update at {u.ref.module} is not a linear map of "
                                   "the input: it cannot be folded into the weight")
            new_w = w[s:e] if u.delta is None else w[s:e] + u.delta(host).to(w.dtype)
            new_b = None if b is None else b[s:e]
            if u.bias_delta is not None:
                db = u.bias_delta(host).to(w.dtype)
                new_b = db if new_b is None else new_b + db
        else:
            gamma = None if u.scale is None else getattr(host, u.scale).to(w.dtype)
            beta = None if u.shift is None else getattr(host, u.shift).to(w.dtype)
            new_w = w[s:e] if gamma is None else w[s:e] * gamma.view(-1, *([1] * (w.dim() - 1)))
            new_b = None if b is None else b[s:e]
            if gamma is not None and new_b is not None:
                new_b = new_b * gamma
            if beta is not None:
                new_b = beta if new_b is None else new_b + beta
        w = new_w if whole else torch.cat([w[:s], new_w, w[e:]], 0)
        if new_b is not None and b is None:
            b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        if b is not None and new_b is not None:
            b = new_b if whole else torch.cat([b[:s], new_b, b[e:]], 0)
    return w, b


def _weight_forward(self: nn.Module, *args, **kwargs):
    """A host's forward while some of its parameters are read through weight maps: each mapped
    parameter is swapped for ``fn(host, W)`` (differentiable) for the duration of the class's own forward,
    then put back, so the module keeps its type, its state dict and its other hooks."""
    swaps: dict[str, torch.Tensor] = {}
    for u in _state(self).updates:
        if u.kind == "weight":
            name = u.ref.param
            swaps[name] = u.fn(self, swaps.get(name, self._parameters[name]))
    if not swaps:
        return type(self).forward(self, *args, **kwargs)
    saved = {name: self._parameters[name] for name in swaps}
    self._parameters.update(swaps)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        self._parameters.update(saved)
