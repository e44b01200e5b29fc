"""SaRA: sparse fine-tuning of the smallest-magnitude pretrained weights (Hu et al., "SaRA: High-Efficient
Diffusion Model Fine-tuning with Progressive Sparse Low-Rank Adaptation", arXiv 2409.06633).

For every parameter ``W0`` of the model (the paper: the whole UNet) the entries with ``|W0| < tau`` are the
least effective ones; only they train. With ``M = |W0| < tau`` and ``p`` the trainable values (``p = W0[M]``
at the start) the model computes with

    W = W0 outside M,  W[M] = p                                                                (1)

The values are one 1-D tensor per parameter (``sara_<param>``, indices of ``M`` in ``sara_<param>_index``), so
the gradient the optimiser sees and the AdamW state are ``numel(p) = sum(M)`` numbers, not the model's
size: the "memory-saving backprop" of the paper. (1) is applied by the site layer's weight map: the
module's own forward reads the written tensor, the frozen ``W0`` is never modified, so entries outside
``M`` are bit-identical after training, and merging writes ``p`` into ``W0`` (exact).

Low-rank constraint (the paper's nuclear-norm term): each training step one 2-D weight with
``min(shape) > nuclear_min_dim`` is drawn at random and ``lambda * ||(W - W0) (.) M||_*`` is added to the loss;
its (sub)gradient ``U V^T`` (``Delta = U S V^T``) flows to ``p`` through the mask.

Progressive re-masking: at training step ``progressive_step`` the mask becomes ``M2 = |W| < tau`` of the
current weights (``M2`` is inside ``M``: entries outside ``M`` never moved); entries that grew out are frozen
at their trained values (kept in ``sara_<param>_fixed`` / ``_fixed_index``) and the optimiser state is cut
to the entries still trained.

Defaults (the paper's Stable Diffusion recipe and its public code): ``tau = 2e-3``, ``lambda = 5e-4``,
re-masking at step 2500 of 5005, AdamW weight decay 1e-2 on the values, learning rate
``1e-3 * exp(-350 tau)`` (about 5e-4; set it as the task's ``lr``).

Not reproduced from the public code: it writes ``|p|`` into the weights at set-up and at re-masking
(flipping the sign of every negative small weight), and its nuclear-norm term reaches no trainable tensor
(its gradient is lost). Here the signed values are written and the term's gradient reaches ``p``.

Inference cost after merge: none (the merged model is the plain library model).
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError
from . import sites as S
from .base import Method
from .registry import register

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import Backbone

_KEY = "model.init_args.method.init_args"


class NuclearNorm(torch.autograd.Function):
    """``||X||_*`` (sum of singular values) with the (sub)gradient ``U V^T`` of the thin SVD ``X = U S V^T``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        full = x if x.dtype in (torch.float32, torch.float64) else x.float()
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        ctx.save_for_backward((u @ vh).to(x.dtype))
        return s.sum().to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (uv,) = ctx.saved_tensors
        return grad * uv


#: a 0-d buffer on the first adapted module: 1 once the progressive re-masking happened (restored on resume)
_REMASKED = "sara_remasked"


def _names(param: str) -> tuple[str, str, str, str]:
    base = f"sara_{param}"
    return base, f"{base}_index", f"{base}_fixed", f"{base}_fixed_index"


def _write(param: str, host: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """Equation (1): ``W0`` with the frozen grown entries and the trained values written in."""
    values, index, fixed, fixed_index = (getattr(host, n) for n in _names(param))
    flat = w.reshape(-1)
    if fixed_index.numel():
        flat = flat.index_put((fixed_index,), fixed.to(w.dtype))
    return flat.index_put((index,), values.to(w.dtype)).view_as(w)


@register
class SaRA(Method):
    """SaRA (arXiv 2409.06633): the entries of every weight with ``|W0| < threshold`` train, sparsely.

    Args:
        threshold: ``tau`` of the mask ``|W0| < tau`` (2e-3, the paper's default).
        nuclear_weight: ``lambda`` of the nuclear-norm term (5e-4; 0 turns it off).
        nuclear_min_dim: the term draws among 2-D weights with ``min(shape)`` above this (64, as the
            public code).
        progressive_step: training step of the re-masking (2500 of the recipe's 5005; ``null``: never).
    """

    name = "sara"
    prefix = "sara_"
    mergeable = True
    zero_init = True

    def __init__(self, threshold: float = 2e-3, nuclear_weight: float = 5e-4, nuclear_min_dim: int = 64,
                 progressive_step: int | None = 2500) -> None:
        if not threshold > 0:
            raise ConfigError(f"{_KEY}.threshold must be > 0, got {threshold}")
        if nuclear_weight < 0:
            raise ConfigError(f"{_KEY}.nuclear_weight must be >= 0, got {nuclear_weight}")
        if progressive_step is not None and progressive_step < 1:
            raise ConfigError(f"{_KEY}.progressive_step must be >= 1 or null, got {progressive_step}")
        self.threshold, self.nuclear_weight = float(threshold), float(nuclear_weight)
        self.nuclear_min_dim, self.progressive_step = int(nuclear_min_dim), progressive_step
        self._model: nn.Module | None = None

    @staticmethod
    def default_lr(threshold: float = 2e-3) -> float:
        """The public code's learning rate for a threshold: ``1e-3 * exp(-350 tau)``."""
        return 1e-3 * math.exp(-350.0 * threshold)

    # --- life cycle ---------------------------------------------------------------------------
    def apply(self, backbone: Backbone) -> None:
        added, first = 0, None
        for site in S.parameters(backbone):
            w = site.weight.detach()
            index = (w.reshape(-1).abs() < self.threshold).nonzero().reshape(-1)
            if index.numel() == 0:
                continue
            values, iname, fixed, fname = _names(site.ref.param)
            site.add_tensor(self.prefix, "", nn.Parameter(w.reshape(-1)[index].clone()), name=values)
            site.add_tensor(self.prefix, "", index, name=iname)
            site.add_tensor(self.prefix, "", w.new_zeros(0), name=fixed)
            site.add_tensor(self.prefix, "", index.new_zeros(0), name=fname)
            site.add_weight_map(self.prefix, partial(_write, site.ref.param))
            added, first = added + 1, first or site
        if not added:
            raise ConfigError(f"sara: no weight has entries below threshold={self.threshold} ({_KEY}.threshold)")
        first.add_tensor(self.prefix, "", torch.zeros((), dtype=torch.uint8), name=_REMASKED)  # saved with the values
        self._model = backbone.model
        self._remasked = False
        self.freeze_and_mark(backbone)
        self.applied = True

    def _sites(self) -> list[S.Site]:
        assert self._model is not None, "apply() first"
        return S.owned(self._model, self.prefix)

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """The trained values are weight entries: AdamW decays them as the recipe does (1-D or not)."""
        return False if self.is_own(name) else super().no_weight_decay(name, param)

    # --- the nuclear-norm term -------------------------------------------------------------------
    def nuclear_candidates(self) -> list[S.Site]:
        return [s for s in self._sites() if s.weight.dim() == 2 and min(s.weight.shape) > self.nuclear_min_dim]

    def masked_delta(self, site: S.Site) -> torch.Tensor:
        """``(W - W0) (.) M`` of a site under the current mask (differentiable in the values)."""
        values, index = (getattr(site.host, n) for n in _names(site.ref.param)[:2])
        w0 = site.weight.detach()
        flat = torch.zeros(w0.numel(), dtype=values.dtype, device=values.device)
        return flat.index_put((index,), values - w0.reshape(-1)[index].to(values.dtype)).view_as(w0)

    def regularizer(self, outputs: dict[str, Any], batch: Any) -> dict[str, torch.Tensor]:
        if self.nuclear_weight <= 0 or self.merged:
            return {}
        candidates = self.nuclear_candidates()
        if not candidates:
            return {}
        site = candidates[int(torch.randint(len(candidates), ()).item())]
        return {"sara_nuclear": self.nuclear_weight * NuclearNorm.apply(self.masked_delta(site))}

    # --- progressive re-masking -----------------------------------------------------------------
    def on_train_batch_start(self, task: Any) -> None:
        step = int(getattr(task, "global_step", 0))
        if self.progressive_step is None or self._remasked or step < self.progressive_step:
            return
        opts = task.optimizers() if getattr(task, "_trainer", None) is not None else []
        opts = opts if isinstance(opts, (list, tuple)) else [opts]
        self.remask([getattr(o, "optimizer", o) for o in opts])

    @torch.no_grad()
    def remask(self, optimizers: list[torch.optim.Optimizer] = ()) -> int:
        """``M2 = |W| < tau`` on the current weights; grown entries are frozen at their values, optimiser
        state is cut to the kept entries. Returns the number of entries frozen."""
        frozen = 0
        for site in self._sites():
            host = site.host
            vname, iname, fname, finame = _names(site.ref.param)
            values, index = getattr(host, vname), getattr(host, iname)
            keep = values.abs() < self.threshold
            grown = ~keep
            frozen += int(grown.sum())
            host._buffers[fname] = torch.cat([getattr(host, fname), values.detach()[grown].to(site.weight.dtype)])
            host._buffers[finame] = torch.cat([getattr(host, finame), index[grown]])
            host._buffers[iname] = index[keep]
            values.data = values.data[keep].clone()
            for opt in optimizers:
                state = opt.state.get(values)
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                    if state and isinstance(state.get(key), torch.Tensor) and state[key].shape == keep.shape:
                        state[key] = state[key][keep].clone()
        self._flag().fill_(1)
        self._remasked = True
        return frozen

    def _flag(self) -> torch.Tensor:
        assert self._model is not None, "apply() first"
        for _, module in self._model.named_modules():
            if _REMASKED in module._buffers:
                return module._buffers[_REMASKED]
        raise KeyError(_REMASKED)

    # --- saving and merging ----------------------------------------------------------------------
    def load_adapter(self, backbone: Backbone, state: dict[str, torch.Tensor]) -> None:
        """Sizes follow the saved mask (a re-masked run's is smaller than the fresh model's)."""
        model = backbone.model
        for key, value in state.items():
            if not self.is_own(key):
                continue
            mname, _, tname = key.rpartition(".")
            try:
                host = model.get_submodule(mname)
            except AttributeError:
                continue
            if tname in host._parameters and host._parameters[tname].shape != value.shape:
                host._parameters[tname].data = torch.empty(value.shape, dtype=host._parameters[tname].dtype,
                                                           device=host._parameters[tname].device)
            elif tname in host._buffers and host._buffers[tname].shape != value.shape:
                host._buffers[tname] = torch.empty(value.shape, dtype=value.dtype,
                                                   device=host._buffers[tname].device)
        super().load_adapter(backbone, state)
        self._remasked = bool(self._flag().item())

    def merge(self, backbone: Backbone) -> None:
        S.merge_all(backbone.model, self.prefix)
        self.merged = True

    def mask_size(self) -> int:
        """``sum(M)``: entries trained now."""
        return sum(getattr(s.host, _names(s.ref.param)[0]).numel() for s in self._sites())
