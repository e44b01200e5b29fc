"""CLIP-LoRA (Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPRW 2024).

LoRA on the query, key and value projections of every block of both CLIP encoders:
``q = W_q x + s B_q A_q dropout(x)`` (same for k, v), ``A`` Kaiming-uniform, ``B = 0`` so the
model is the zero-shot CLIP at step 0. Recipe read from the official code (MaxZanella/CLIP-LoRA,
``run_utils.py`` / ``loralib/layers.py`` / ``lora.py``): rank ``r = 2``, ``alpha = 1``, dropout
0.25 on the LoRA input, ``params = q k v``, ``encoder = both``, ``position = all``; scaling
``s = alpha / sqrt(r)`` (the official ``LoRALayer`` uses ``alpha / sqrt(r)``, not LoRA's
``alpha / r``); AdamW (weight decay 1e-2, betas 0.9/0.999) at lr 2e-4 with a cosine schedule
over ``500 x shots`` iterations, batch 32, one hand-crafted template per dataset for the text
side (``a photo of a {}.`` on ImageNet).

On ViT-B/16 (visual width 768, text width 512, 12 + 12 blocks) with r = 2 on q, k, v:
``2 * (768 + 768) * 3 * 12 + 2 * (512 + 512) * 3 * 12 = 110,592 + 73,728 = 184,320``.

Where the update lives: each adapted projection is a site (:mod:`vision_ft.methods.sites`): a
separate ``q_proj`` (transformers), the q/k/v rows of timm's fused ``qkv`` or of open_clip's packed
``in_proj_weight``. The factors are registered on the module owning the weight (``clip_lora_A_q``
on a packed weight, ``clip_lora_A`` on a whole one) and the branch ``s B A dropout(x)`` is added to
the site's output rows. For open_clip's attention, which reads its packed weight directly, the site
layer runs the native attention on ``W + s B A`` when no input dropout is active, and computes the
attention itself with the branches on dropped-out inputs otherwise, as the official code's own
attention module does. :meth:`CLIPLoRA.merge` adds ``s B A`` into the weight rows exactly and
removes every trace.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import sites as S
from .base import Method
from .registry import register

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import Backbone

log = logging.getLogger("vision_ft")

_ROLE = {"q": "q", "k": "k", "v": "v", "o": "proj"}


def _dropout_inactive(method: CLIPLoRA, host: nn.Module) -> bool:
    return not (method.dropout > 0 and host.training)


@register
class CLIPLoRA(Method):
    """CLIP-LoRA: low-rank updates of q, k, v in all blocks of both CLIP encoders.

    Args:
        r: rank (2: official ``--r`` default, the paper's setting for all few-shot tables).
        alpha: scaling numerator; the update is scaled by ``alpha / sqrt(r)`` as in the official
            ``LoRALayer`` (``--alpha`` default 1).
        dropout: dropout on the LoRA branch input (official ``--dropout_rate`` 0.25).
        targets: projections to adapt, any of ``q k v o`` (official ``--params`` default q k v).
        encoders: towers to adapt, ``visual`` and/or ``text`` (official ``--encoder both``). On a
            backbone without towers (a timm ViT) every block is adapted.
        blocks: indices inside each tower to adapt (default: all, the official ``--position all``).
    """

    name = "clip_lora"
    prefix = "clip_lora_"
    mergeable = True
    zero_init = True

    def __init__(
        self,
        r: int = 2,
        alpha: float = 1.0,
        dropout: float = 0.25,
        targets: list[str] = ["q", "k", "v"],  # noqa: B006 - jsonargparse needs a plain list default
        encoders: list[str] = ["visual", "text"],  # noqa: B006
        blocks: list[int] | None = None,
    ) -> None:
        key = "model.init_args.method.init_args"
        if r < 1:
            raise ConfigError(f"{key}.r must be >= 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{key}.dropout must be in [0, 1), got {dropout}")
        bad = [t for t in targets if t not in _ROLE]
        if bad or not targets:
            raise ConfigError(f"{key}.targets={targets!r}: choose from {list(_ROLE)}")
        bad = [e for e in encoders if e not in ("visual", "text")]
        if bad or not encoders:
            raise ConfigError(f"{key}.encoders={encoders!r}: choose from ['visual', 'text']")
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.targets, self.encoders = list(targets), list(encoders)
        self.blocks = None if blocks is None else [int(b) for b in blocks]

    lora_family = True
    bench_notes = {
        "time": "CLIP-LoRA draws an independent dropout mask (p=0.25) of the block input for each of q, k and v, as "
                "the official code's three LoRA linears do, and keeps the three dropped inputs for backward (see "
                "the activations column); the low-rank products themselves run as one (see the peft goal).",
        "peft": "the twin is peft LoRA of the same rank on the fused qkv with the same input dropout, which peft "
                "draws once per module; CLIP-LoRA draws it three times (q, k, v), as the official code does, and "
                "keeps three dropped copies of the block input. The low-rank products are not the cost: the "
                "clip_lora[dropout=0] row (no dropout in method or twin) measures "
                "{measured:clip_lora[dropout=0]:ratio_vs_peft} its twin and "
                "{measured:clip_lora[dropout=0]:ratio_vs_full} full fine-tuning in this run.",
    }

    def peft_twin(self, backbone: Backbone) -> dict[str, Any]:
        return {"r": self.r, "alpha": float(self.r), "dropout": self.dropout,
                "modules": S.module_names(self.sites(backbone)),
                "note": f"rank {self.r} on the fused qkv, dropout {self.dropout} ({self.name}: r={self.r} on "
                        f"{'+'.join(self.targets)} slices)"}

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r)

    def sites(self, backbone: Backbone) -> list[S.Site]:
        """The adapted projections, block by block (``encoders`` applies to two-tower backbones)."""
        towers = self.encoders if backbone.tower_names() else None
        return S.select(backbone, [_ROLE[t] for t in self.targets], self.blocks, towers, method=self.name)

    # --- the parameterisation (subclasses with another form of Delta W override these) ----------
    def init_tensors(self, site: S.Site, weight: torch.Tensor) -> dict[str, nn.Parameter | torch.Tensor]:
        """The tensors of one site, by part name (registered as ``<prefix><part>[_<key>]``):
        ``nn.Parameter`` values train, plain tensors become saved buffers. ``weight`` is the frozen
        (out x in) weight of the site (rows of a packed one)."""
        d_out, d_in = weight.shape
        a = torch.empty(self.r, d_in, dtype=weight.dtype, device=weight.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(d_out, self.r, dtype=weight.dtype, device=weight.device)
        return {"A": nn.Parameter(a), "B": nn.Parameter(b)}

    def down(self, host: nn.Module, names: dict[str, str]) -> torch.Tensor:
        """The down-projection of one site (``r x in'``); ``names``: part -> tensor name on ``host``."""
        return getattr(host, names["A"])

    def up(self, host: nn.Module, names: dict[str, str]) -> torch.Tensor:
        """The up-projection with the scaling folded in (``out x r``): ``s B``."""
        return getattr(host, names["B"]) * self.scale

    def reduce_input(self, host: nn.Module, names: dict[str, str], x: torch.Tensor) -> torch.Tensor:
        """What the down-projection reads (the input itself; Block-LoRA sums its chunks)."""
        return x

    def delta(self, host: nn.Module, names: dict[str, str]) -> torch.Tensor:
        """The dense ``Delta W`` (out x in) of one site."""
        return self.up(host, names) @ self.down(host, names)

    def branch(self, host: nn.Module, names: dict[str, str], x: torch.Tensor) -> torch.Tensor:
        """``Delta W x`` of one site (input dropout already applied)."""
        a = self.down(host, names)
        return F.linear(F.linear(self.reduce_input(host, names, x.to(a.dtype)), a), self.up(host, names))

    def site_names(self, site: S.Site) -> dict[str, str]:
        """Part -> tensor name of the method's tensors at ``site``."""
        return {p: site.tensor_name(self.prefix, p) for p in ("A", "B", "U")
                if hasattr(site.host, site.tensor_name(self.prefix, p))}

    def site_delta(self, site: S.Site) -> torch.Tensor:
        """The dense ``Delta W`` at ``site`` (for inspection and tests)."""
        return self.delta(site.host, self.site_names(site))

    def site_branch(self, site: S.Site, x: torch.Tensor) -> torch.Tensor:
        """``Delta W x`` at ``site`` without dropout (for inspection and tests)."""
        return self.branch(site.host, self.site_names(site), x)

    # --- placement (shared by the CLIP-LoRA family) -------------------------------------
    def apply(self, backbone: Backbone) -> None:
        for site in self.sites(backbone):
            names = {part: site.add_tensor(self.prefix, part, t)
                     for part, t in self.init_tensors(site, site.weight.detach()).items()}
            site.add_lowrank(self.prefix, partial(self.down, names=names), partial(self.up, names=names),
                             pre=partial(_lora_input, self, names), delta=partial(self.delta, names=names),
                             exact=partial(_dropout_inactive, self))
        self.freeze_and_mark(backbone)
        self.applied = True

    def merge(self, backbone: Backbone) -> None:
        S.merge_all(backbone.model, self.prefix)
        self.merged = True


def _lora_input(method: CLIPLoRA, names: dict[str, str], host: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input dropout (training only; one draw per site, as the official separate q/k/v linears), then
    the parameterisation's input reduction; ``x`` itself when both are idle."""
    if method.dropout > 0 and host.training:
        x = F.dropout(x, method.dropout, training=True)
    return method.reduce_input(host, names, x)
