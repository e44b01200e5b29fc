"""The :class:`Site` and the functions that find sites on a backbone or a model."""

from __future__ import annotations

import types
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn

from ...errors import AdapterError, ConfigError
from ._state import _STATE, Branch, Dense, _state, _Update
from .apply import _fold, _lowrank_delta, _lowrank_fn, _output_hook, _weight_forward
from .attention import _mha_forward, _reader_has_updates

if TYPE_CHECKING:  # pragma: no cover
    from ...backbones.base import Backbone

_KEY = "model.init_args.method.init_args"


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
        weight = update.kind == "weight"
        first = not any((u.kind == "weight") == weight for u in state.updates)
        state.updates.append(update)
        if first:
            self._install_weight_map() if weight else self._install()

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

    def add_weight_map(self, prefix: str, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        """The host's forward reads ``fn(host, W)`` (differentiable) in place of this whole parameter ``W``,
        which itself stays untouched (e.g. trained entries written into a frozen weight: SaRA). Exact to
        merge (:meth:`merge` writes ``fn(host, W)``); whole tensors of a module's own forward only."""
        if self.key or self.ref.reader is not None:
            raise ConfigError(f"{prefix.rstrip('_')} replaces whole parameters read by their module's own forward; "
                              f"{self.name} is a slice or is read by {self.ref.reader}")
        self._add(self._new(prefix, "weight", fn=fn))

    def _install_weight_map(self) -> None:
        host = self.host
        if "forward" in host.__dict__:
            raise ConfigError(f"{self.ref.module} ({type(host).__name__}) already runs a replaced forward; a weight "
                              "map cannot be added to it")
        host.forward = types.MethodType(_weight_forward, host)

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
        if not any(u.kind == "weight" for u in state.updates):
            forward = host.__dict__.get("forward")
            if getattr(forward, "__func__", None) is _weight_forward:
                del host.__dict__["forward"]
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


@dataclass(frozen=True)
class ParamRef:
    """Where a whole parameter lives (the fields a backbone's ``WeightRef`` has): any parameter of the model,
    for methods that adapt entries of every tensor rather than roles (SaRA)."""

    module: str
    param: str
    bias: str | None = None
    start: int = 0
    stop: int | None = None
    key: str = ""
    reader: str | None = None


def parameters(backbone: Backbone) -> list[Site]:
    """A whole-tensor site for every floating-point parameter that its own module's forward reads (each
    shared tensor once, at its first owner), role ``param``, in module order: the parameters of leaf
    modules (linear, convolution, norm, embedding layers) and the packed ``in_proj`` of
    ``nn.MultiheadAttention``. Not included, because no forward of their owner reads them: tensors held by
    a container module and read by its other methods (a ViT's class token and position embedding,
    read in ``forward_features``) and the ``out_proj`` of ``nn.MultiheadAttention`` (read by its parent)."""
    model = backbone.model
    out: list[Site] = []
    seen: set[int] = set()
    for mname, module in model.named_modules():
        parent = model.get_submodule(mname.rpartition(".")[0]) if mname else None
        if isinstance(parent, nn.MultiheadAttention):
            continue
        if next(module.children(), None) is not None and not isinstance(module, nn.MultiheadAttention):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.is_floating_point():
                continue
            seen.add(id(p))
            out.append(Site(model, ParamRef(mname, pname), "param"))
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
