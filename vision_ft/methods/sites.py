"""Sites: the one place where methods touch weights.

A *site* is one weight a method may adapt: a whole ``nn.Linear`` / ``nn.Conv2d`` / ``nn.LayerNorm``
weight, or a row-slice of a packed one (q, k or v inside timm's fused ``qkv``, open_clip's
``in_proj_weight``, Phi-3's ``qkv_proj`` / ``gate_up_proj``). The backbone says *where* a role's
weight lives (:class:`~vision_ft.backbones.base.WeightRef`); this module makes it a :class:`Site` with
one small API that every method uses, whatever library built the model:

- tensors: :meth:`Site.add_tensor` registers a method's parameter or buffer on the module that owns the
  weight, named ``<prefix><part>[_<key>]`` (the prefix rule: "trainable" and "saved" stay name filters);
- updates of the site's output ``y = W x + b`` (rows ``start:stop`` only):
  :meth:`Site.add_branch` (parallel: ``y + f(x)``, with the dense ``Delta W`` where ``f`` is linear),
  :meth:`Site.add_scale_shift` (``gamma * y + beta``) and :meth:`Site.add_output_map` (sequential,
  ``g(y)``, e.g. a bottleneck adapter; not mergeable);
- :meth:`Site.effective_weight` / :meth:`Site.effective_bias` read ``W`` and ``b`` with every update
  folded in (differentiable), :meth:`Site.merge` writes them into the base weights exactly and
  removes every trace of the method, :meth:`Site.remove` removes it without merging.

How an update reaches the output depends on who reads the weight, and is decided here, once:

- the owning module's own forward computes the output (``nn.Linear``, conv, norm; transformers and
  diffusers projections): one forward hook per module applies all updates of all its row slices
  (disjoint slices are assembled with a single ``torch.cat``);
- a parent reads the parameter directly (``nn.MultiheadAttention`` reads ``in_proj_weight`` and
  ``out_proj.weight`` inside ``F.multi_head_attention_forward``; the ref names it as ``reader``): the
  parent's forward is wrapped. When every update is a linear map of the input in the current mode
  (no input dropout while training) the native attention runs on the effective weights; otherwise the
  attention is computed with ``F.scaled_dot_product_attention`` and the projections' outputs go
  through the same update code as a linear's.

Update functions receive the host module and read their tensors from it at call time (never from a
closure), so copies of the model (``copy.deepcopy``) carry working updates.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones.base import Backbone

#: attribute (on a host or reader module) holding its :class:`_HostState`
_STATE = "_vft_site_state"
_KEY = "model.init_args.method.init_args"

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
    kind: str  # "branch" | "affine" | "map"
    fn: Callable | None = None  # branch: (host, x) -> dy ; map: (host, y) -> y'
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


# --- the site ------------------------------------------------------------------------------------
@dataclass(eq=False)
class Site:
    """One adaptable weight of ``model`` (see the module docstring); built by :func:`select` / :func:`of_module`."""

    model: nn.Module
    ref: Any  # WeightRef
    role: str
    block: int | None = None
    tower: str | None = None

    # --- where ------------------------------------------------------------------------------
    @property
    def host(self) -> nn.Module:
        """The module owning the weight parameter (and the method's tensors for this site)."""
        return self.model.get_submodule(self.ref.module)

    @property
    def reader(self) -> nn.Module | None:
        """The module whose forward reads the weight directly, or ``None`` (the host's own forward)."""
        return self.model.get_submodule(self.ref.reader) if self.ref.reader else None

    @property
    def key(self) -> str:
        return self.ref.key

    @property
    def name(self) -> str:
        """``module`` or ``module[key]`` for a row slice, e.g. ``blocks.0.attn.qkv[q]``."""
        return f"{self.ref.module}[{self.key}]" if self.key else self.ref.module

    @property
    def start(self) -> int:
        return self.ref.start

    @property
    def stop(self) -> int:
        stop = self.ref.stop
        return int(getattr(self.host, self.ref.param).shape[0]) if stop is None else stop

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight rows (a view: ``(out, in)``, ``(out, in, kh, kw)`` or ``(d,)``)."""
        return getattr(self.host, self.ref.param)[self.start:self.stop]

    @property
    def bias(self) -> torch.Tensor | None:
        b = getattr(self.host, self.ref.bias, None) if self.ref.bias else None
        return None if b is None else b[self.start:self.stop]

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    @property
    def in_features(self) -> int:
        w = getattr(self.host, self.ref.param)
        if w.dim() < 2:
            raise AdapterError(f"site {self.name} is a vector (a norm's affine); it has no input width")
        return int(w.shape[1])

    @property
    def is_matrix(self) -> bool:
        return getattr(self.host, self.ref.param).dim() == 2

    # --- tensors ----------------------------------------------------------------------------
    def tensor_name(self, prefix: str, part: str) -> str:
        """``<prefix><part>`` on a whole weight, ``<prefix><part>_<key>`` on a row slice."""
        return f"{prefix}{part}_{self.key}" if self.key else f"{prefix}{part}"

    def add_tensor(self, prefix: str, part: str, tensor: torch.Tensor, name: str | None = None) -> str:
        """Register ``tensor`` on the host: an ``nn.Parameter`` trains, any other tensor is a saved buffer.
        ``name`` overrides :meth:`tensor_name` (it must still start with ``prefix``)."""
        host, name = self.host, name or self.tensor_name(prefix, part)
        if not name.startswith(prefix):
            raise ValueError(f"{name!r} does not carry the method prefix {prefix!r}")
        if name in host._parameters or name in host._buffers or name in host._modules:
            raise ConfigError(f"{self.name} already holds {name!r}: is the method applied twice?")
        if isinstance(tensor, nn.Parameter):
            host.register_parameter(name, tensor)
        else:
            host.register_buffer(name, tensor)
        _state(host, create=True).tensors.setdefault(prefix, []).append(name)
        return name

    def add_module(self, prefix: str, part: str, module: nn.Module, name: str | None = None) -> str:
        """Register a submodule of the method on the host (its parameters carry the prefix through its name)."""
        host, name = self.host, name or self.tensor_name(prefix, part)
        if not name.startswith(prefix):
            raise ValueError(f"{name!r} does not carry the method prefix {prefix!r}")
        if name in host._modules or name in host._parameters:
            raise ConfigError(f"{self.name} already holds {name!r}: is the method applied twice?")
        host.add_module(name, module)
        _state(host, create=True).tensors.setdefault(prefix, []).append(name)
        return name

    def get(self, prefix: str, part: str) -> Any:
        return getattr(self.host, self.tensor_name(prefix, part))

    # --- updates ----------------------------------------------------------------------------
    def _add(self, update: _Update) -> None:
        host = self.host
        state = _state(host, create=True)
        first = not state.updates
        state.updates.append(update)
        if first:
            self._install()

    def _new(self, prefix: str, kind: str, **kw: Any) -> _Update:
        return _Update(prefix, self.ref, self.role, self.block, self.start, self.stop, kind, **kw)

    def add_branch(self, prefix: str, fn: Branch, delta: Dense | None = None, bias_delta: Dense | None = None,
                   exact: Callable[[nn.Module], bool] | None = None) -> None:
        """Parallel update ``y[rows] += fn(host, x)``. ``delta(host)`` / ``bias_delta(host)``: the dense
        ``Delta W`` / ``Delta b`` of the rows where ``fn`` is ``x Delta W^T + Delta b`` (needed to merge and
        for weights read by a parent); ``exact(host)``: whether that holds right now (e.g. not while an
        input dropout is active; default: always)."""
        if getattr(self.host, self.ref.param).dim() == 4:
            raise ConfigError(f"{prefix.rstrip('_')} cannot add a parallel branch to the convolution {self.name}")
        self._add(self._new(prefix, "branch", fn=fn, delta=delta, bias_delta=bias_delta, exact=exact))

    def add_lowrank(self, prefix: str, down: Dense, up: Dense, pre: Branch | None = None,
                    delta: Dense | None = None, exact: Callable[[nn.Module], bool] | None = None) -> None:
        """Low-rank parallel branch ``y[rows] += up(host) @ down(host) @ pre(host, x)``: ``down`` (r x in'),
        ``up`` (rows x r, scaling folded in), ``pre`` an input transform (input dropout, a reduction of
        the input) that returns ``x`` itself when idle. ``delta`` (default ``up @ down``) is the dense
        ``Delta W`` of the rows. All low-rank branches of one module run as one product: the inputs
        are projected together (one matmul when every ``pre`` is idle) and lifted by one
        block-structured ``up`` into the module's whole output, so adapting q, k and v of a fused
        projection costs what one LoRA on it costs."""
        if getattr(self.host, self.ref.param).dim() != 2:
            raise ConfigError(f"{prefix.rstrip('_')} needs a matrix weight at {self.name}")
        if delta is None:
            delta = partial(_lowrank_delta, down, up)
        self._add(self._new(prefix, "branch", fn=partial(_lowrank_fn, down, up, pre), delta=delta, exact=exact,
                            down=down, up=up, pre=pre))

    def add_scale_shift(self, prefix: str, scale: str | None = None, shift: str | None = None) -> None:
        """``y[rows] = scale * y[rows] + shift`` per output channel; ``scale`` / ``shift`` name tensors
        registered on this site with :meth:`add_tensor` (their full names)."""
        self._add(self._new(prefix, "affine", scale=scale, shift=shift))

    def add_output_map(self, prefix: str, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        """Sequential update ``y[rows] = fn(host, y[rows])`` (non-linear: never merged)."""
        self._add(self._new(prefix, "map", fn=fn))

    def updates(self, prefix: str | None = None) -> list[_Update]:
        state = _state(self.host)
        if state is None:
            return []
        return [u for u in state.updates if u.ref == self.ref and (prefix is None or u.owner == prefix)]

    def _install(self) -> None:
        reader = self.reader
        if reader is None:
            self.host.register_forward_hook(_output_hook)
            return
        if not isinstance(reader, nn.MultiheadAttention) or not reader._qkv_same_embed_dim:
            raise ConfigError(f"{self.ref.reader} ({type(reader).__name__}) reads {self.name} directly; only "
                              "torch.nn.MultiheadAttention with a packed in_proj_weight is supported")
        if "forward" not in reader.__dict__:
            reader.forward = types.MethodType(_mha_forward, reader)
        _state(reader, create=True)

    # --- reading and merging ----------------------------------------------------------------
    def effective_weight(self, prefix: str | None = None) -> torch.Tensor:
        """The rows of ``W`` with the updates (of ``prefix``, or all) folded in; differentiable."""
        return _fold(self.host, self.weight, self.bias, self.updates(prefix), self.start)[0]

    def effective_bias(self, prefix: str | None = None) -> torch.Tensor | None:
        return _fold(self.host, self.weight, self.bias, self.updates(prefix), self.start)[1]

    @torch.no_grad()
    def merge(self, prefix: str) -> None:
        """Write ``prefix``'s updates into the base weight (and bias) rows exactly, then :meth:`remove` them."""
        ups = self.updates(prefix)
        if any(u.kind == "map" for u in ups):
            raise AdapterError(f"{prefix.rstrip('_')} applies a non-linear map at {self.name}: it cannot be merged")
        host, ref = self.host, self.ref
        w, b = _fold(host, self.weight, self.bias, ups, self.start)
        self.weight.copy_(w.to(self.weight.dtype))
        if b is not None:
            full = getattr(host, ref.bias, None) if ref.bias else None
            if full is None:
                if not ref.bias:
                    raise AdapterError(f"{self.name} has no bias to receive {prefix.rstrip('_')}'s shift")
                rows = getattr(host, ref.param).shape[0]
                full = nn.Parameter(torch.zeros(rows, dtype=w.dtype, device=w.device), requires_grad=False)
                setattr(host, ref.bias, full)
            full[self.start:self.stop].copy_(b.to(full.dtype))
        self.remove(prefix)

    def remove(self, prefix: str) -> None:
        """Drop ``prefix``'s updates at this site; once none is left on the host, its tensors, hook and
        (for a parent-read weight) the parent's wrapper go too."""
        host = self.host
        state = _state(host)
        if state is None:
            return
        state.updates = [u for u in state.updates if not (u.ref == self.ref and u.owner == prefix)]
        if any(u.owner == prefix for u in state.updates):
            return  # other slices of this host still use the method's tensors
        for name in state.tensors.pop(prefix, []):
            for store in (host._parameters, host._buffers, host._modules):
                store.pop(name, None)
        if not state.updates:
            for key in [k for k, fn in host._forward_hooks.items() if fn is _output_hook]:
                del host._forward_hooks[key]
            if not state.tensors:
                del host.__dict__[_STATE]
        reader = self.reader
        if reader is not None and not _reader_has_updates(reader):
            reader.__dict__.pop("forward", None)
            reader.__dict__.pop(_STATE, None)


# --- finding sites -------------------------------------------------------------------------------
def select(backbone: Backbone, roles: Iterable[str], blocks: Iterable[int] | None = None,
           towers: Iterable[str] | None = None, method: str = "method") -> list[Site]:
    """The sites for ``roles`` in ``blocks`` (indices inside each tower; default all) of the ``towers``
    (default all the backbone exposes), in block order then role order. Roles a backbone does not have
    are refused by the backbone with its reason."""
    roles = list(roles)
    exposed = backbone.tower_names()
    if towers is not None:
        towers = list(towers)
        missing = [t for t in towers if t not in exposed] if exposed else []
        if missing:
            raise ConfigError(f"{method}: towers/encoders {missing} are not exposed by this backbone (it has "
                              f"{exposed or 'no towers'}; see backbone.init_args.towers)")
    wanted = None if blocks is None else [int(b) for b in blocks]
    out: list[Site] = []
    for i in range(backbone.num_blocks):
        tower = backbone.tower(i)
        if towers is not None and exposed and tower not in towers:
            continue
        j = backbone.tower_block(i)
        if wanted is not None and j not in wanted:
            continue
        for role in roles:
            out.append(Site(backbone.model, backbone.weight_ref(i, role), role, i, tower))
    if wanted is not None:
        depth = max((backbone.tower_block(i) for i in range(backbone.num_blocks)), default=-1) + 1
        bad = [b for b in wanted if not 0 <= b < depth]
        if bad:
            raise ConfigError(f"{method}: blocks {bad} out of range (0..{depth - 1}) ({_KEY}.blocks)")
    return out


def at(backbone: Backbone, block: int, role: str) -> Site:
    """The site for ``role`` in block ``block`` (an index into ``backbone.blocks``)."""
    return Site(backbone.model, backbone.weight_ref(block, role), role, block, backbone.tower(block))


def of_module(backbone: Backbone, module: nn.Module, role: str, block: int | None = None) -> Site:
    """A whole-module site (a norm, the stem convolution, the final norm)."""
    tower = backbone.tower(block) if block is not None and block >= 0 else None
    return Site(backbone.model, backbone.module_ref(module), role, block, tower)


def owned(model: nn.Module, prefix: str) -> list[Site]:
    """The sites where ``prefix`` has updates, in module order."""
    out: list[Site] = []
    seen: set[Any] = set()
    for _, module in model.named_modules():
        state = _state(module)
        if state is None:
            continue
        for u in state.updates:
            if u.owner == prefix and u.ref not in seen:
                seen.add(u.ref)
                out.append(Site(model, u.ref, u.role, u.block))
    return out


def on_module(module: nn.Module, prefix: str | None = None) -> list[Site]:
    """The sites with updates (of ``prefix``, or any) on ``module`` itself, rooted at ``module`` (for
    inspection: ``weight``, ``start``/``stop``, ``key``, ``get``, ``effective_weight``)."""
    import dataclasses

    state = _state(module)
    out: list[Site] = []
    seen: set[Any] = set()
    for u in [] if state is None else state.updates:
        if (prefix is None or u.owner == prefix) and u.ref not in seen:
            seen.add(u.ref)
            out.append(Site(module, dataclasses.replace(u.ref, module="", reader=None), u.role, u.block))
    return sorted(out, key=lambda s: s.start)


def module_names(site_list: Iterable[Site]) -> list[str]:
    """The distinct modules owning the sites' weights, in order (what a whole-module tuner like peft targets)."""
    names: list[str] = []
    for site in site_list:
        if site.ref.module not in names:
            names.append(site.ref.module)
    return names


def merge_all(model: nn.Module, prefix: str) -> int:
    """Merge every site of ``prefix``; returns how many."""
    sites = owned(model, prefix)
    for site in sites:
        site.merge(prefix)
    return len(sites)


def remove_all(model: nn.Module, prefix: str) -> None:
    for site in owned(model, prefix):
        site.remove(prefix)


# --- applying updates ----------------------------------------------------------------------------
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
    ups = _state(module).updates
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


# --- a parent that reads the weight: nn.MultiheadAttention ----------------------------------------
def _reader_has_updates(mha: nn.Module) -> bool:
    return any(_state(m) is not None and _state(m).updates for m in (mha, mha.out_proj))


def _linear_now(ups: list[_Update], host: nn.Module) -> bool:
    for u in ups:
        if u.kind == "map":
            return False
        if u.kind == "branch":
            if u.delta is None and u.bias_delta is None:
                return False
            if u.exact is not None and not u.exact(host):
                return False
    return True


def _mha_forward(self: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
                 attn_mask=None, average_attn_weights=True, is_causal=False):
    """``nn.MultiheadAttention.forward`` with the sites' updates on ``in_proj`` rows and ``out_proj``."""
    native = type(self).forward
    in_state, out_state = _state(self), _state(self.out_proj)
    in_ups = [] if in_state is None else in_state.updates
    out_ups = [] if out_state is None else out_state.updates
    if _linear_now(in_ups, self) and _linear_now(out_ups, self.out_proj):
        w_in, b_in = _fold(self, self.in_proj_weight, self.in_proj_bias, in_ups)
        w_out, b_out = _fold(self.out_proj, self.out_proj.weight, self.out_proj.bias, out_ups)
        shadow = {(self, "in_proj_weight"): w_in, (self, "in_proj_bias"): b_in,
                  (self.out_proj, "weight"): w_out, (self.out_proj, "bias"): b_out}
        shadow = {k: v for k, v in shadow.items() if v is not None}
        for (module, name), t in shadow.items():
            if not torch.is_grad_enabled():  # as Parameters, PyTorch takes the merged model's kernels
                t = nn.Parameter(t, requires_grad=False)
            module.__dict__[name] = t  # shadows the parameter for this call only
        try:
            return native(self, query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                          attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        finally:
            for module, name in shadow:
                del module.__dict__[name]
    if need_weights:
        raise NotImplementedError("with a non-linear or input-dependent update (e.g. input dropout while "
                                  "training) the attention is computed by the site layer and returns no "
                                  "weights; call with need_weights=False (as open_clip does)")
    if not (query is key and key is value):
        raise NotImplementedError("site updates on a packed in_proj with input-dependent branches need "
                                  "self-attention (query is key is value)")
    if not self.batch_first:
        query = query.transpose(0, 1)
    d, h = self.embed_dim, self.num_heads
    y = F.linear(query, self.in_proj_weight, self.in_proj_bias)
    if in_ups:
        y = _transform(self, in_ups, query, y)
    q, k, v = (t.unflatten(-1, (h, d // h)).transpose(1, 2) for t in y.split(d, dim=-1))
    n, length, source = q.shape[0], q.shape[2], k.shape[2]
    mask = None
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dim() == 2 else attn_mask.view(n, h, length, source)
        if mask.dtype == torch.bool:  # nn.MultiheadAttention: True = not allowed
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
        mask = mask.to(q.dtype)
    if key_padding_mask is not None:
        pad = key_padding_mask.view(n, 1, 1, source)
        pad = (torch.zeros(pad.shape, dtype=q.dtype, device=q.device).masked_fill(pad, float("-inf"))
               if pad.dtype == torch.bool else pad.to(q.dtype))
        mask = pad if mask is None else mask + pad
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                         is_causal=bool(is_causal and mask is None))
    out = out.transpose(1, 2).reshape(n, length, d)
    y = F.linear(out, self.out_proj.weight, self.out_proj.bias)
    if out_ups:
        y = _transform(self.out_proj, out_ups, out, y)
    if not self.batch_first:
        y = y.transpose(0, 1)
    return y, None
