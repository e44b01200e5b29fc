"""Bottleneck adapters for ViTs: the sequential adapter (Houlsby et al.) and AdaptFormer.

Both add, per block, a small two-layer bottleneck ``Up(act(Down(.)))`` with ``Up``
zero-initialised, so the model is unchanged at init. They differ in where the
bottleneck reads and writes:

* :class:`Adapter` (Houlsby et al., ICML 2019, "Parameter-Efficient Transfer
  Learning for NLP", Fig. 2): *sequential*, on a sub-layer's output before the
  residual add, ``h <- h + Up(act(Down(h)))`` with ``h`` the output of the MLP's last
  projection (fc2) and, optionally, of the attention projection.
* :class:`AdaptFormer` (Chen et al., NeurIPS 2022, "AdaptFormer: Adapting Vision
  Transformers for Scalable Visual Recognition", the AdaptMLP module): *parallel* to
  the MLP branch, ``x <- x + MLP(LN2 x) + s * Up(ReLU(Down(x)))`` with ``x`` the
  residual stream after attention (the input of LN2, not its output, as in the
  official code).

The bottleneck is a submodule named ``<prefix>...`` registered on the block
(``blocks.3.adapter_mlp.down.weight``); it is applied by forward hooks on modules
of the :class:`~vision_ft.backbones.Backbone` surface (``linear(i, "fc2")``,
``norms(i)["norm2"]``, the block), so the timm model keeps its type and
state-dict names. Hooks are module-level functions bound to their adapter with
:func:`functools.partial`, which ``copy.deepcopy`` maps onto the copied adapter.

Neither can be merged into the base weights (the bottleneck is nonlinear):
:meth:`Method.merge` raises. Unmerged inference cost per block and token is
``2 d b`` multiply-adds (+ a LayerNorm where one is configured): on ViT-B/16 at
224 px (197 tokens, 17.6 GMACs) that is +29 MMACs (+0.17%) for Adapter-8 after the
MLP, +58 MMACs (+0.33%) for the Houlsby placement, +232 MMACs (+1.3%) for
AdaptFormer-64, plus two small matmuls and an activation per adapted site (a few
extra kernel launches per block on GPU, which dominates at small batch sizes).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from typing import TYPE_CHECKING

from ..errors import ConfigError
from . import sites as S
from .base import Method
from .registry import register

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import Backbone

_KEY = "model.init_args.method.init_args"
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Bottleneck(nn.Module):
    """``s * Up(Dropout(act(Down(LN(x)))))``; ``Up = 0`` at init, so the output is 0.

    ``Down`` is Kaiming-uniform (``a = sqrt(5)``, the ``nn.Linear`` default, as the
    AdaptFormer and MoSA codes set it), its bias 0; ``Up`` weight and bias 0. The
    LayerNorm (eps 1e-6, as the ViT's own) is present only when ``norm`` is set.
    ``generator`` (optional) draws the Down init; by default the global torch RNG.
    """

    def __init__(self, dim: int, bottleneck: int, scale: float = 1.0, dropout: float = 0.0,
                 activation: str = "relu", norm: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.scale = float(scale)
        self.norm = nn.LayerNorm(dim, eps=1e-6) if norm else nn.Identity()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        #: input of a parallel adapter, captured by the LN2 hook until the block hook uses it
        self.pending: torch.Tensor | None = None

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.act(self.down(self.norm(x))))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.hidden(x))
        return out if self.scale == 1.0 else out * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


# --- hooks (module level, bound with functools.partial, so deepcopy works) -----------------
def _sequential(adapter: Bottleneck, host: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """Output map of a sub-layer's last projection: ``h + adapter(h)`` (Houlsby placement)."""
    return output + adapter(output)


def _capture_hook(adapter: Bottleneck, module: nn.Module, args, output) -> None:
    """On LN2: remember its input ``x``, the residual stream the parallel adapter reads."""
    adapter.pending = args[0]


def _parallel_hook(adapter: Bottleneck, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """On the block: ``x + MLP(LN2 x)`` (the block output) ``+ adapter(x)``."""
    x, adapter.pending = adapter.pending, None
    if x is None:
        raise RuntimeError("parallel adapter: the block ran without its LN2 (norm2) being called")
    return output + adapter(x)


def _check_positive(value: int, arg: str) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{_KEY}.{arg} must be a positive integer, got {value!r}")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ConfigError(f"{_KEY}.activation={activation!r} unknown; choose from {sorted(ACTIVATIONS)}")


def _check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{_KEY}.dropout must be in [0, 1), got {dropout!r}")


def _like(module: nn.Module, ref: nn.Module, fallback: nn.Module | None = None) -> nn.Module:
    """``module`` on the device / dtype of ``ref`` (of ``fallback`` where ``ref`` has no parameters, as Wan's
    non-affine norms), in ``ref``'s train / eval mode."""
    p = next(ref.parameters(), None)
    if p is None and fallback is not None:
        p = next(fallback.parameters(), None)
    if p is None:
        return module.train(ref.training)
    return module.to(device=p.device, dtype=p.dtype).train(ref.training)


@register
class Adapter(Method):
    """Sequential bottleneck adapter (Houlsby et al., ICML 2019): ``h <- h + Up(act(Down(h)))``.

    Placement: on the output of a sub-layer's last projection, before the residual
    add (Houlsby Fig. 2). ``positions=["mlp"]`` (default) puts one adapter after the
    MLP (after fc2) in every block: the "Adapter-8" baseline row of the VTAB-1k /
    FGVC tables (NOAH, SSF, SPT, FacT...), whose 0.16M count on ViT-B/16 is one
    adapter of bottleneck 8 per block, i.e. the Pfeiffer placement; Houlsby's
    original two adapters per layer are ``positions=["attn", "mlp"]``. The base
    LayerNorms stay frozen (Houlsby also tuned them; the ViT baselines do not).

    On ViT-B/16, bottleneck 8: ``12 * (2*768*8 + 8 + 768) = 156,768`` parameters
    (``["mlp"]``), 313,536 with ``["attn", "mlp"]``; head excluded. Anchor
    (docs/methods/adapter.md): Adapter-8 FGVC 85.5 / VTAB group mean 73.9.

    Init: Down Kaiming-uniform, Up = 0 (identity at init, ``zero_init``), not
    Houlsby's near-zero normal init of both layers. Not mergeable (nonlinear); the
    unmerged cost is ``2 d b`` multiply-adds per token and site (+0.17% of ViT-B/16's
    compute for Adapter-8 after the MLP).

    Args:
        bottleneck: hidden width ``b`` (8: the "Adapter-8" table rows).
        positions: sub-layers followed by an adapter, any of ``attn`` (after the
            attention projection) and ``mlp`` (after fc2).
        activation: ``gelu`` (default), ``relu`` or ``silu``.
        dropout: dropout on the bottleneck activations during training.
    """

    name = "adapter"
    prefix = "adapter_"
    mergeable = False
    zero_init = True

    _ROLES = {"attn": "proj", "mlp": "fc2"}

    def __init__(
        self,
        bottleneck: int = 8,
        positions: list[str] = ["mlp"],  # noqa: B006 - jsonargparse needs a plain list default
        activation: str = "gelu",
        dropout: float = 0.0,
    ) -> None:
        _check_positive(bottleneck, "bottleneck")
        bad = [p for p in positions if p not in self._ROLES]
        if bad or not positions or len(set(positions)) != len(positions):
            raise ConfigError(f"{_KEY}.positions={list(positions)!r}: give distinct entries of "
                              f"{sorted(self._ROLES)}")
        _check_activation(activation)
        _check_dropout(dropout)
        self.bottleneck, self.positions = bottleneck, list(positions)
        self.activation, self.dropout = activation, dropout

    def apply(self, backbone: Backbone) -> None:
        for i, block in enumerate(backbone.blocks):
            for pos in self.positions:
                site = S.at(backbone, i, self._ROLES[pos])
                adapter = _like(Bottleneck(backbone.block_width(i), self.bottleneck, dropout=self.dropout,
                                           activation=self.activation), site.host)
                block.add_module(f"{self.prefix}{pos}", adapter)
                site.add_output_map(self.prefix, partial(_sequential, adapter))
        self.freeze_and_mark(backbone)
        self.applied = True


@register
class AdaptFormer(Method):
    """AdaptFormer (Chen et al., NeurIPS 2022): a scaled bottleneck parallel to the MLP.

    ``x <- x + MLP(LN2 x) + s * Up(Dropout(ReLU(Down(x))))``, where ``x`` is the
    residual stream after attention. From the official code
    (ShoufaChen/AdaptFormer ``models/custom_modules.py`` Block.forward and
    ``models/adapter.py``): the adapter reads ``x`` itself, not ``LN2 x``, and has no
    LayerNorm of its own (``ffn_adapter_layernorm_option="none"`` in ``main_image.py``
    and ``main_video.py``); its output is added outside the MLP's drop-path; ReLU;
    dropout 0.1 on the bottleneck; ``s = 0.1`` (``ffn_adapter_scalar``); init
    ``"lora"``: Down Kaiming-uniform, Up and both biases 0; bottleneck 64
    (``--ffn_num`` default, the paper's AdaptFormer-64).

    On ViT-B/16, bottleneck 64: ``12 * (2*768*64 + 64 + 768) = 1,189,632``
    parameters (head excluded); with ``layernorm=True`` (a trainable LN before Down,
    the official ``"in"`` option and MoSA's adapter) ``12 * 100,672 = 1,208,064``.

    Not mergeable (nonlinear); unmerged cost ``2 d b`` multiply-adds per token and
    block (+1.3% of ViT-B/16's compute at b = 64).

    Args:
        bottleneck: hidden width (64).
        scale: ``s``, the fixed scale of the adapter output (0.1).
        dropout: dropout on the bottleneck activations (0.1, official Block).
        layernorm: a trainable LayerNorm on the adapter input (official option
            ``"in"``; off in the official image and video recipes).
        activation: ``relu`` (official), ``gelu`` or ``silu``.
    """

    name = "adaptformer"
    prefix = "adaptformer_"
    mergeable = False
    zero_init = True
    bench_notes = {
        "time": "AdaptFormer-64 runs a bottleneck (two d x 64 products, ReLU, dropout) beside every MLP on the "
                "residual stream and keeps its input and hidden activations for backward (see the activations "
                "column): about 1.2M trained weights whose weight-gradient products full fine-tuning's 0.70 goal "
                "does not budget for.",
    }

    def __init__(
        self,
        bottleneck: int = 64,
        scale: float = 0.1,
        dropout: float = 0.1,
        layernorm: bool = False,
        activation: str = "relu",
    ) -> None:
        _check_positive(bottleneck, "bottleneck")
        _check_activation(activation)
        _check_dropout(dropout)
        self.bottleneck, self.scale, self.dropout = bottleneck, scale, dropout
        self.layernorm, self.activation = layernorm, activation

    # subclasses (MoSA) change the adapter, not where it sits
    def make_adapter(self, dim: int, block_index: int) -> Bottleneck:
        return Bottleneck(dim, self.bottleneck, scale=self.scale, dropout=self.dropout,
                          activation=self.activation, norm=self.layernorm)

    @property
    def adapter_name(self) -> str:
        return f"{self.prefix}adapter"

    def adapters(self, backbone: Backbone) -> list[Bottleneck]:
        return [getattr(block, self.adapter_name) for block in backbone.blocks]

    def apply(self, backbone: Backbone) -> None:
        for i, block in enumerate(backbone.blocks):
            norm2 = backbone.norms(i)["norm2"]
            adapter = _like(self.make_adapter(backbone.block_width(i), i), norm2, block)
            block.add_module(self.adapter_name, adapter)
            norm2.register_forward_hook(partial(_capture_hook, adapter))
            block.register_forward_hook(partial(_parallel_hook, adapter))
        self.freeze_and_mark(backbone)
        self.applied = True
