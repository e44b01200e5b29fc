"""SNELL: Sparse tuning with kerNELized LoRA (Shen et al., NeurIPS 2024).

"Expanding Sparse Tuning for Low Memory Usage", official code ssfgunner/SNELL
(``model/vision_transformer_timm.py``: classes ``KLoRA`` and ``SNELL``).

Each adapted weight ``W`` (d_out x d_in) gets a sparse update ``dW`` merged from two
low-rank factors through a non-linear kernel instead of LoRA's inner product:

* ``A`` in R^{2 x d_in x r/2} and ``B`` in R^{2 x d_out x r/2} (the official
  ``In_Qs`` / ``Out_Qs``, ``num_Hs = 2`` and ``q_dim // num_Hs`` columns each), so the
  trainable count equals LoRA's at the same ``r``: ``r (d_in + d_out)`` per matrix.
* Kernel (the code's ``pathIntegrals``): a difference of two Euclidean distance
  kernels, ``K[i, j] = c (||A0_i - B0_j|| - ||A1_i - B1_j||)`` with ``c = 0.1``
  (``SCALE_FACTOR_fc``, coefficients ``c * (-1)^h``). ``K`` is d_in x d_out and the code
  computes ``F.linear(x, K.T)``, i.e. ``dW = K^T`` in PyTorch's (out, in) layout. Unlike
  ``B A^T`` its rank is not bounded by ``r``: it is full rank in general.
* Competition-based sparsification (the code's ``sparsify``): the entries of ``K``
  compete by magnitude each forward; the ``s`` fraction with the smallest ``|K|`` is
  zeroed and no index is stored (the support moves as ``A``, ``B`` train). The released
  code multiplies ``K`` by ``F.threshold(|K|.detach(), q_s, 0)``, so the surviving values
  are ``K * |K|`` with ``|K|`` treated as a constant in backward:
  ``dW = (K * stopgrad(|K| * M))^T``, ``M = 1[|K| > q_s]``. ``magnitude_weighting=False``
  gives the plain masked kernel ``(K * M)^T`` instead. With ``s = 0`` the code uses its
  ``KLoRA`` class, ``dW = K^T`` (no weighting), and so does this class.
* Forward ``y = W x + b + DropPath(dW Dropout(x))`` with dropout 0.1 and drop-path 0.1
  on the update path (``TuningModule`` / ``additional_drop``; the scripts never pass
  ``--no_drop_out`` / ``--no_drop_path``). ``dW`` is recomputed inside
  ``torch.utils.checkpoint`` (as the code's ``cp.checkpoint(self._forward, x)``), so the
  dense kernel, mask and ``dW`` are not kept for backward: only ``x``, ``A`` and ``B``.
  That is the method's memory saving over masked sparse tuning.

q, k and v each get their own ``A``, ``B`` and their own top-(1-s) selection (the code
uses separate q/k/v linears, each with its own dropout draw); here they are sites
(:mod:`vision_ft.methods.sites`): row slices of timm's fused ``qkv`` (or open_clip's packed
``in_proj_weight``), each update with its own dropout and drop-path draw, added to its rows
only. In eval mode ``W' = W + dW`` exactly, so
:meth:`SNELL.merge` folds the update into the weights (zero inference overhead).

On ViT-B/16 with r = 8 on q,k,v,proj,fc1,fc2 of the 12 blocks:
``12 * 8 * (4 * (768 + 768) + 2 * (768 + 3072)) = 1,327,104`` trainable parameters
(1.33M in docs/methods/snell.md, head excluded; r = 32: 5,308,416).

Choices and deviations:

* Threshold: the code uses ``torch.quantile(|K|, s)`` (linear interpolation, then
  ``|K| > q``); ``torch.quantile`` refuses inputs above 2^24 elements on older torch
  (the code's 1.12; ViT-g-sized matrices exceed it) and sorts the whole matrix. Here
  ``q`` is the ``round(s * n)``-th smallest ``|K|`` (``torch.kthvalue``, a selection, no
  size cap), so exactly ``n - round(s * n)`` entries survive (up to ties at ``q``); the
  code's count differs by at most one entry.
* Init: Kaiming-uniform (a = sqrt 5) on both factors, as the code. ``dW != 0`` at init
  (two different distance kernels do not cancel), so the model is slightly perturbed
  before training: ``zero_init = False``.
* Non-reentrant checkpoint (the code's ``SNELL`` uses the reentrant default of torch
  1.12, which only propagates to ``A``, ``B`` because the code also trains ``cls_token``).
  The code trains ``cls_token`` (+768 parameters); here the method trains only its own
  prefixed tensors (the prefix rule), so ``cls_token`` stays frozen.
* The optional ``SNELLA`` extensions (learnable kernel mix, importance-based sparsity
  allocation) are not part of this class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from . import sites as S
from .base import Method
from .registry import register

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import Backbone

_ROLES = ("q", "k", "v", "proj", "fc1", "fc2")
_KEY = "model.init_args.method.init_args"


@dataclass(frozen=True)
class _Settings:
    """What one site's update needs (bound to its branch)."""

    kernel_scale: float
    sparsity: float
    magnitude_weighting: bool
    dropout: float
    drop_path: float
    recompute: bool


# --- the update ------------------------------------------------------------------------
def kernel_matrix(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``K`` (d_in x d_out) = ``scale * (cdist(A0, B0) - cdist(A1, B1))`` (official ``pathIntegrals``)."""
    dist = torch.cdist(a, b, p=2)  # (2, d_in, d_out)
    return scale * dist[0] - scale * dist[1]


def sparsify(k: torch.Tensor, sparsity: float, magnitude_weighting: bool = True) -> torch.Tensor:
    """Zero the ``round(s * n)`` entries of smallest ``|K|``; the rest compete afresh each call.

    ``magnitude_weighting`` reproduces the official ``K * F.threshold(|K|.detach(), q, 0)``.
    ``torch.kthvalue`` replaces the code's ``torch.quantile`` (capped at 2^24 inputs on older torch).
    """
    if sparsity <= 0:
        return k  # the official code switches to its un-sparsified KLoRA class at s = 0
    mag = k.detach().abs()
    n_zero = int(math.floor(sparsity * mag.numel() + 0.5))
    if n_zero == 0:
        keep = torch.ones_like(mag)
    else:
        threshold = mag.flatten().kthvalue(n_zero).values
        keep = (mag > threshold).to(k.dtype)
    return k * (mag * keep if magnitude_weighting else keep)


def delta_weight(a: torch.Tensor, b: torch.Tensor, scale: float, sparsity: float,
                 magnitude_weighting: bool = True) -> torch.Tensor:
    """The sparse update in PyTorch's (d_out, d_in) layout: ``sparsify(K)^T``."""
    return sparsify(kernel_matrix(a, b, scale), sparsity, magnitude_weighting).t()


def _site_delta(cfg: _Settings, names: tuple[str, str], host: nn.Module) -> torch.Tensor:
    """One site's (eval-mode) update as a dense (rows, in) matrix."""
    a, b = getattr(host, names[0]), getattr(host, names[1])
    return delta_weight(a, b, cfg.kernel_scale, cfg.sparsity, cfg.magnitude_weighting)


def _delta_forward(x: torch.Tensor, host: nn.Module, names: tuple[str, str], cfg: _Settings) -> torch.Tensor:
    return F.linear(x, _site_delta(cfg, names, host).to(x.dtype))


def _branch(cfg: _Settings, names: tuple[str, str], host: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``DropPath(dW Dropout(x))``, ``dW`` recomputed in backward when ``recompute``."""
    if cfg.dropout > 0:
        x = F.dropout(x, cfg.dropout, host.training)
    fn = partial(_delta_forward, host=host, names=names, cfg=cfg)
    if cfg.recompute and torch.is_grad_enabled():
        # non-reentrant: A and B (read from the module) get gradients even if x needs none
        delta = checkpoint(fn, x, use_reentrant=False)
    else:
        delta = fn(x)
    if cfg.drop_path > 0 and host.training:  # one DropPath per update, as the code's TuningModule
        keep = 1.0 - cfg.drop_path
        mask = delta.new_empty(delta.shape[0], *([1] * (delta.ndim - 1))).bernoulli_(keep).div_(keep)
        delta = delta * mask
    return delta


def _exact(cfg: _Settings, host: nn.Module) -> bool:
    return not host.training or (cfg.dropout == 0 and cfg.drop_path == 0)


# --- the method --------------------------------------------------------------------------
@register
class SNELL(Method):
    """SNELL: a kernelised, magnitude-sparsified low-rank update on every linear of the ViT.

    Args:
        r: the low-rank dimension ``q_dim``; ``A``, ``B`` have ``r / 2`` columns per kernel
            (must be even). The paper's tables use SNELL-8/16/32 (8: 1.33M parameters on
            ViT-B/16; the anchor FGVC 91.8 / VTAB 76.9 is SNELL-32).
        sparsity: ``s``, the fraction of each ``dW`` zeroed by the competition (the
            official ``--init_thres``). Tuned per task in the released scripts (FGVC
            0-0.8, VTAB 0-0.995); 0.3 is the CUB script of the README
            (``scripts/fgvc/snell*/vit_cub_snell.sh``).
        targets: roles adapted in every block (the code: q, k, v, proj, fc1, fc2).
        blocks: indices of the adapted blocks (default: all).
        kernel_scale: ``c`` in ``K = c (d0 - d1)``; the code's ``SCALE_FACTOR_fc = 0.1``.
        magnitude_weighting: surviving entries are ``K * |K|`` (|K| detached), as the
            released ``SNELL.sparsify``; ``False`` keeps them as ``K`` (mask only).
        dropout: dropout on the update's input (the code's ``additional_drop``, 0.1).
        drop_path: per-sample drop of each update (the code's ``TuningModule`` DropPath 0.1).
        recompute: recompute ``dW`` in backward (``torch.utils.checkpoint``) instead of
            storing it; ``False`` trades memory for one less kernel evaluation.
    """

    name = "snell"
    prefix = "snell_"
    mergeable = True
    zero_init = False  # Kaiming init of both factors: dW != 0 at init, as the official code

    def __init__(
        self,
        r: int = 8,
        sparsity: float = 0.3,
        targets: list[str] = ["q", "k", "v", "proj", "fc1", "fc2"],  # noqa: B006 - jsonargparse
        blocks: list[int] | None = None,
        kernel_scale: float = 0.1,
        magnitude_weighting: bool = True,
        dropout: float = 0.1,
        drop_path: float = 0.1,
        recompute: bool = True,
    ) -> None:
        if r < 2 or r % 2:
            raise ConfigError(f"{_KEY}.r must be an even integer >= 2 (two kernels of r/2 columns), got {r}")
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"{_KEY}.sparsity must be in [0, 1), got {sparsity}")
        bad = [t for t in targets if t not in _ROLES]
        if bad or not targets or len(set(targets)) != len(targets):
            raise ConfigError(f"{_KEY}.targets {list(targets)}: choose distinct roles from {list(_ROLES)}")
        for key, p in (("dropout", dropout), ("drop_path", drop_path)):
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"{_KEY}.{key} must be in [0, 1), got {p}")
        if kernel_scale == 0:
            raise ConfigError(f"{_KEY}.kernel_scale must be non-zero")
        self.r, self.sparsity = r, sparsity
        self.targets, self.blocks = list(targets), None if blocks is None else list(blocks)
        self.kernel_scale, self.magnitude_weighting = kernel_scale, magnitude_weighting
        self.dropout, self.drop_path, self.recompute = dropout, drop_path, recompute

    lora_family = True
    bench_notes = {
        "time": "SNELL builds every adapted d_out x d_in update from its kernel (cdist of the factors), "
                "sparsifies it with kthvalue over all entries, and recomputes it in backward (checkpoint) -- "
                "dense matrix work the size of the frozen weights, every step.",
        "peft": "SNELL's update is a dense kernel matrix sparsified each step, not a rank-r product: see its "
                "time entry.",
    }

    def peft_twin(self, backbone: Backbone) -> dict[str, Any]:
        return {"r": self.r, "alpha": float(self.r), "dropout": self.dropout,
                "modules": S.module_names(self.sites(backbone)),
                "note": f"rank {self.r} on {'+'.join(self.targets)} (q/k/v as the fused qkv)"}

    # --- placement ----------------------------------------------------------------------
    def sites(self, backbone: Backbone) -> list[S.Site]:
        """The adapted weights (q, k, v as rows of a fused or packed projection where the backbone has one)."""
        return S.select(backbone, [r for r in _ROLES if r in self.targets], self.blocks, method=self.name)

    def settings(self) -> _Settings:
        return _Settings(kernel_scale=self.kernel_scale, sparsity=self.sparsity,
                         magnitude_weighting=self.magnitude_weighting, dropout=self.dropout,
                         drop_path=self.drop_path, recompute=self.recompute)

    def apply(self, backbone: Backbone) -> None:
        cfg = self.settings()
        for site in self.sites(backbone):
            ref = site.weight
            a = torch.empty(2, site.in_features, self.r // 2, dtype=ref.dtype, device=ref.device)
            b = torch.empty(2, site.out_features, self.r // 2, dtype=ref.dtype, device=ref.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # official In_Qs / Out_Qs init
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            names = (site.add_tensor(self.prefix, "A", nn.Parameter(a)),
                     site.add_tensor(self.prefix, "B", nn.Parameter(b)))
            site.add_branch(self.prefix, partial(_branch, cfg, names), delta=partial(_site_delta, cfg, names),
                            exact=partial(_exact, cfg))
        self.freeze_and_mark(backbone)
        self.applied = True

    # --- inspection and merge ----------------------------------------------------------
    def delta(self, module: nn.Module) -> torch.Tensor:
        """The adapted module's current (eval-mode) update as one dense (out, in) matrix: each of its
        sites' ``dW`` in its rows, zeros elsewhere (e.g. the k rows of a fused qkv adapted on q, v)."""
        cfg, weight = self.settings(), module.weight
        out = torch.zeros_like(weight)
        for site in S.on_module(module, self.prefix):
            names = (site.tensor_name(self.prefix, "A"), site.tensor_name(self.prefix, "B"))
            out[site.start:site.stop] = _site_delta(cfg, names, module).to(out.dtype)
        return out

    def adapted_modules(self, backbone: Backbone) -> list[nn.Module]:
        """The modules holding SNELL factors, in module order."""
        return [m for m in backbone.model.modules() if S.on_module(m, self.prefix)]

    def merge(self, backbone: Backbone) -> None:
        S.merge_all(backbone.model, self.prefix)
        self.merged = True
