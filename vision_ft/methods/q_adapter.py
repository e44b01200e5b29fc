"""Q-Adapter: learnable query tokens with a zero-initialised gate inside a vision encoder.

Source: "Q-Adapter" (arXiv 2510.10022, ACM MM Asia 2025), parameter-efficient fine-tuning of a multimodal
LLM for video captioning by learnable query tokens and a gating layer inserted into its vision encoder, about
1.4% of the parameters trained. Only the abstract and first page could be read here and no code is public, so
the equations below are the kit's reading; every open choice is a config key.

At each selected vision block, ``Q`` learned query tokens ``q`` (``Q x D``, init N(0, 0.02)) serve as the
keys and values of a multi-head cross-attention read by the block's tokens, and the result is written back
through a tanh gate that starts at zero::

    h <- h + tanh(g) * W_o softmax((h W_q)(q W_k)^T / sqrt(d_head)) (q W_v)

with ``h`` the output of the MLP's last projection (``position: mlp``, before the residual add, the placement
of sequential adapters) or of the attention projection (``attn``). ``g`` is one scalar per block
(``gate: scalar``) or one per channel (``channel``), initialised at 0 as in Flamingo's gated cross-attention
(Alayrac et al. 2022), so the model is exactly the base model at step 0. Choices and why:

- the tokens read the queries (not the queries the tokens): each token's update depends on that token alone,
  so Qwen-VL's packed vision sequences (every image and frame of a batch in one sequence) never mix samples,
  and a conversation's result does not depend on what it is batched with;
- ``attn_dim`` (``d``, default half the block width) and ``heads`` (default ``d / 64``, at least 1) set the
  attention's width; ``blocks`` (indices inside the tower; default all) and ``num_queries`` (16) its reach.
  With these defaults on Qwen2.5-VL-7B's vision tower (32 blocks of width 1280) Q-Adapter trains
  32 x (16 x 1280 + 4 x 1280 x 640 + 1) = 105,512,992 parameters, 1.27% of the model's 8.29B: near the
  paper's "about 1.4%" (its base model could not be read here).

Trainable per block: ``Q D + 4 D d`` (+ ``1`` or ``D`` for the gate). Not mergeable (softmax attention); the
unmerged cost per token and block is ``2 D d + 2 Q d`` multiply-adds (a LoRA-free vision tower costs about
``12 D^2`` per token and block).
"""

from __future__ import annotations

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
_ROLES = {"mlp": "fc2", "attn": "proj"}


class QueryCrossAttention(nn.Module):
    """``tanh(g) * MHA(query=h, key=value=q)`` with learned tokens ``q``; zero while ``g = 0``."""

    def __init__(self, dim: int, num_queries: int, attn_dim: int, heads: int, gate: str) -> None:
        super().__init__()
        if attn_dim % heads:
            raise ConfigError(f"{_KEY}.attn_dim={attn_dim} is not divisible by heads={heads}")
        self.heads = heads
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.w_q = nn.Linear(dim, attn_dim, bias=False)
        self.w_k = nn.Linear(dim, attn_dim, bias=False)
        self.w_v = nn.Linear(dim, attn_dim, bias=False)
        self.w_o = nn.Linear(attn_dim, dim, bias=False)
        self.gate = nn.Parameter(torch.zeros(1 if gate == "scalar" else dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])  # tokens one by one: packed (T, D) and batched (B, T, D) alike
        d = self.w_q.out_features // self.heads
        q = self.w_q(x).view(-1, self.heads, d).transpose(0, 1)  # (heads, tokens, d)
        k = self.w_k(self.queries).view(-1, self.heads, d).transpose(0, 1)  # (heads, Q, d)
        v = self.w_v(self.queries).view(-1, self.heads, d).transpose(0, 1)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (heads, tokens, d)
        out = self.w_o(att.transpose(0, 1).reshape(x.shape[0], -1))
        return (torch.tanh(self.gate) * out).reshape(shape)


def _gated(module: QueryCrossAttention, host: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return y + module(y)


@register
class QAdapter(Method):
    """Q-Adapter (see the module doc): gated cross-attention to learned query tokens in vision blocks.

    Args:
        num_queries: query tokens per adapted block (``Q``).
        attn_dim: width of the cross-attention (default: half the block width).
        heads: attention heads (default ``attn_dim / 64``, at least 1).
        blocks: block indices inside each adapted tower (default all).
        towers: towers to adapt (default ``vision`` where the backbone has one, else its only tower).
        position: ``mlp`` (after the MLP's last projection) or ``attn`` (after the attention projection).
        gate: ``scalar`` (one per block) or ``channel`` (one per channel).
        lora: stack LoRA (HF peft) with these ``LoRA`` arguments, e.g. ``{r: 8, alpha: 16}`` (on the language
            model of a vision-language model by default); its tensors train and are saved with the queries.
    """

    name = "q_adapter"
    prefix = "q_adapter_"
    mergeable = False
    zero_init = True

    def __init__(self, num_queries: int = 16, attn_dim: int | None = None, heads: int | None = None,
                 blocks: list[int] | None = None, towers: list[str] | None = None, position: str = "mlp",
                 gate: str = "scalar", lora: dict[str, Any] | None = None) -> None:
        if num_queries < 1:
            raise ConfigError(f"{_KEY}.num_queries={num_queries}: at least 1")
        if attn_dim is not None and attn_dim < 1 or heads is not None and heads < 1:
            raise ConfigError(f"{_KEY}.attn_dim / heads must be >= 1")
        if position not in _ROLES:
            raise ConfigError(f"{_KEY}.position={position!r}: choose from {sorted(_ROLES)}")
        if gate not in ("scalar", "channel"):
            raise ConfigError(f"{_KEY}.gate={gate!r}: scalar or channel")
        self.num_queries, self.attn_dim, self.heads = num_queries, attn_dim, heads
        self.blocks = list(blocks) if blocks is not None else None
        self.towers = list(towers) if towers else None
        self.position, self.gate = position, gate
        self.lora = dict(lora) if lora is not None else None
        self._inner: Method | None = None
        if self.lora is not None:
            from .lora import LoRA

            try:
                self._inner = LoRA(**self.lora)
            except TypeError as e:
                raise ConfigError(f"{_KEY}.lora={self.lora}: {e} (LoRA's arguments: r, alpha, dropout, targets, "
                                  "blocks, towers)") from None

    def is_own(self, name: str) -> bool:
        return super().is_own(name) or (self._inner is not None and self._inner.is_own(name))

    def _targets(self, backbone: Backbone) -> list[int]:
        exposed = backbone.tower_names()
        towers = self.towers or (["vision"] if "vision" in exposed else (["image"] if "image" in exposed else None))
        if towers and exposed:
            unknown = sorted(set(towers) - set(exposed))
            if unknown:
                raise ConfigError(f"{_KEY}.towers={towers}: {unknown} unknown; this backbone has {exposed}")
        elif self.towers and not exposed:
            raise ConfigError(f"{_KEY}.towers={self.towers}: this backbone has a single tower (leave towers unset)")
        index = [i for i in range(backbone.num_blocks) if not towers or not exposed or backbone.tower(i) in towers]
        inner = {i: backbone.tower_block(i) if exposed else i for i in index}
        if self.blocks is not None:
            bad = sorted(set(self.blocks) - set(inner.values()))
            if bad:
                raise ConfigError(f"{_KEY}.blocks={self.blocks}: {bad} out of range (blocks 0..{max(inner.values())} "
                                  "inside the tower)")
            index = [i for i in index if inner[i] in self.blocks]
        if not index:
            raise ConfigError(f"{_KEY}: no block selected")
        return index

    def apply(self, backbone: Backbone) -> None:
        if self._inner is not None:
            self._inner.apply(backbone)
        for i in self._targets(backbone):
            site = S.at(backbone, i, _ROLES[self.position])
            dim = site.out_features
            width = self.attn_dim or max(1, dim // 2)
            heads = self.heads or max(1, width // 64)
            module = QueryCrossAttention(dim, self.num_queries, width, heads, self.gate)
            ref = site.weight
            module.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() and ref.element_size() >= 2
                      else torch.float32)
            backbone.blocks[i].add_module(f"{self.prefix}{self.position}", module)
            site.add_output_map(self.prefix, partial(_gated, module))
        self.freeze_and_mark(backbone)
        self.applied = True


def cost_per_token(dim: int, attn_dim: int, num_queries: int) -> int:
    """Multiply-adds Q-Adapter adds per token and adapted block (projections of the token in and out, scores and
    the weighted sum over the queries; the queries' own projections are shared by every token)."""
    return 2 * dim * attn_dim + 2 * num_queries * attn_dim


__all__ = ["QAdapter", "QueryCrossAttention", "cost_per_token"]
