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

Where the update lives:
- open_clip's ``nn.MultiheadAttention`` packs q/k/v in ``in_proj_weight`` and never calls an
  ``nn.Linear`` forward for them. The factors are registered on the attention module
  (``clip_lora_A_q`` ...) and the instance's ``forward`` is wrapped: without input dropout (eval,
  or ``dropout=0``) the attention runs natively on ``W + s B A`` (rows of the packed weight, and
  ``out_proj.weight`` for ``o``); with dropout in training it computes the attention itself
  (``F.scaled_dot_product_attention``) with the LoRA branches on dropped-out inputs, as the
  official code's own attention module does. The module keeps its type and state-dict names.
- ``nn.Linear`` projections (transformers CLIP ``q_proj``...) and fused ``qkv`` linears (timm)
  get a forward hook adding the branch to their output (rows ``start:stop`` for a fused one).
:meth:`CLIPLoRA.merge` adds ``s B A`` into the weight rows exactly and removes every trace.
"""

from __future__ import annotations

import logging
import math
import types

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone, PackedSlice
from ..errors import ConfigError
from .base import Method
from .registry import register

log = logging.getLogger("vision_ft")

_ROLE = {"q": "q", "k": "k", "v": "v", "o": "proj"}


def _branch(module: nn.Module, key: str, x: torch.Tensor) -> torch.Tensor:
    """The update's output ``Delta W dropout(x)`` for target ``key`` registered on ``module``
    (``s B A dropout(x)`` for CLIP-LoRA; the method class stored on the module computes it)."""
    p = module._clip_lora_dropout
    if p > 0 and module.training:
        x = F.dropout(x, p, training=True)
    return module._clip_lora_impl.branch(module, key, x)


def _delta(module: nn.Module, key: str) -> torch.Tensor:
    """The dense update ``Delta W`` (out x in) for target ``key``."""
    return module._clip_lora_impl.delta(module, key)


def _linear_hook(module: nn.Linear, args, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    for key, (start, stop) in module._clip_lora.items():
        d = _branch(module, key, x).to(output.dtype)
        output = output + (d if (start, stop) == (0, output.shape[-1])
                           else F.pad(d, (start, output.shape[-1] - stop)))
    return output


def _in_proj_weights(mha: nn.MultiheadAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """``in_proj_weight`` and ``out_proj.weight`` with the LoRA deltas added (differentiable)."""
    w_in, w_out = mha.in_proj_weight, mha.out_proj.weight
    d = mha.embed_dim
    parts = []
    for i, key in enumerate("qkv"):
        rows = w_in[i * d:(i + 1) * d]
        parts.append(rows + _delta(mha, key).to(rows.dtype) if key in mha._clip_lora else rows)
    if any(k in mha._clip_lora for k in "qkv"):
        w_in = torch.cat(parts, 0)
    if "o" in mha._clip_lora:
        w_out = w_out + _delta(mha, "o").to(w_out.dtype)
    return w_in, w_out


def _mha_forward(self: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
                 attn_mask=None, average_attn_weights=True, is_causal=False):
    """``nn.MultiheadAttention.forward`` with CLIP-LoRA on q/k/v/o (bound to the instance)."""
    native = type(self).forward
    if not (self.training and self._clip_lora_dropout > 0):
        w_in, w_out = _in_proj_weights(self)
        if not torch.is_grad_enabled():  # as Parameters, PyTorch takes the same kernels as for the merged model
            w_in, w_out = nn.Parameter(w_in, requires_grad=False), nn.Parameter(w_out, requires_grad=False)
        self.__dict__["in_proj_weight"] = w_in  # shadows the parameter for this call only
        self.out_proj.__dict__["weight"] = w_out
        try:
            return native(self, query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                          attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        finally:
            del self.__dict__["in_proj_weight"]
            del self.out_proj.__dict__["weight"]
    if need_weights:
        raise NotImplementedError("clip_lora with dropout computes attention itself and returns no attention "
                                  "weights; call with need_weights=False (as open_clip does)")
    if not self.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    d, h = self.embed_dim, self.num_heads
    bias = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
    projected = []
    for i, (name, x) in enumerate(zip("qkv", (query, key, value))):
        y = F.linear(x, self.in_proj_weight[i * d:(i + 1) * d], bias[i])
        if name in self._clip_lora:
            y = y + _branch(self, name, x).to(y.dtype)
        projected.append(y.view(y.shape[0], y.shape[1], h, d // h).transpose(1, 2))
    q, k, v = projected
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
    if "o" in self._clip_lora:
        y = y + _branch(self, "o", out).to(y.dtype)
    if not self.batch_first:
        y = y.transpose(0, 1)
    return y, None


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

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r)

    def sites(self, backbone: Backbone) -> list[tuple[int, str]]:
        """``(block, target)`` pairs the method adapts."""
        has_towers = hasattr(backbone, "tower")
        if has_towers:
            exposed = {backbone.tower(i) for i in range(backbone.num_blocks)}
            missing = [e for e in self.encoders if e not in exposed]
            if missing:
                raise ConfigError(f"clip_lora encoders {missing} are not exposed by the backbone "
                                  f"(model.init_args.method.init_args.encoders vs backbone.init_args.towers)")
        out = []
        for i in range(backbone.num_blocks):
            if has_towers and backbone.tower(i) not in self.encoders:
                continue
            j = backbone.tower_block(i) if has_towers else i
            if self.blocks is not None and j not in self.blocks:
                continue
            out += [(i, t) for t in self.targets]
        return out

    # --- the parameterisation (subclasses with another form of Delta W override these three) ---
    def init_tensors(self, module: nn.Module, target: str, weight: torch.Tensor) -> dict[str, nn.Parameter | torch.Tensor]:
        """The tensors of one site, by name suffix (registered as ``<prefix><suffix>_<target>``):
        ``nn.Parameter`` values train, plain tensors become buffers. ``weight`` is the frozen
        (out x in) weight of the site (rows of a packed one)."""
        d_out, d_in = weight.shape
        a = torch.empty(self.r, d_in, dtype=weight.dtype, device=weight.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(d_out, self.r, dtype=weight.dtype, device=weight.device)
        return {"A": nn.Parameter(a), "B": nn.Parameter(b)}

    @classmethod
    def branch(cls, module: nn.Module, key: str, x: torch.Tensor) -> torch.Tensor:
        """``Delta W x`` for site ``key`` of ``module`` (input dropout already applied)."""
        a, b = getattr(module, f"{cls.prefix}A_{key}"), getattr(module, f"{cls.prefix}B_{key}")
        return F.linear(F.linear(x.to(a.dtype), a), b) * module._clip_lora_scale

    @classmethod
    def delta(cls, module: nn.Module, key: str) -> torch.Tensor:
        """The dense ``Delta W`` (out x in) of site ``key``."""
        a, b = getattr(module, f"{cls.prefix}A_{key}"), getattr(module, f"{cls.prefix}B_{key}")
        return (b @ a) * module._clip_lora_scale

    # --- placement (shared by the CLIP-LoRA family) -------------------------------------
    def apply(self, backbone: Backbone) -> None:
        for i, target in self.sites(backbone):
            site = backbone.linear(i, _ROLE[target])
            if isinstance(site, nn.Linear):
                module, start, stop, weight = site, 0, site.out_features, site.weight
            elif isinstance(site, PackedSlice):
                module, start, stop = site.linear, site.start, site.stop
                weight = site.linear.weight[start:stop]
            else:  # an open_clip AttentionWeight: the tensors live on the nn.MultiheadAttention
                module = backbone.model.get_submodule(site.name.removesuffix(".out_proj"))
                if not isinstance(module, nn.MultiheadAttention):
                    raise ConfigError(f"{self.name} cannot adapt {site.name} ({type(module).__name__})")
                start, stop, weight = site.start, site.stop, site.weight
            if getattr(module, "_clip_lora_impl", type(self)) is not type(self):
                raise ConfigError(f"{site.name} is already adapted by {module._clip_lora_impl.name}")
            for suffix, tensor in self.init_tensors(module, target, weight.detach()).items():
                name = f"{self.prefix}{suffix}_{target}"
                if isinstance(tensor, nn.Parameter):
                    module.register_parameter(name, tensor)
                else:
                    module.register_buffer(name, tensor)
            if not hasattr(module, "_clip_lora"):
                module._clip_lora = {}
                module._clip_lora_scale, module._clip_lora_dropout = self.scale, self.dropout
                module._clip_lora_impl = type(self)
                if isinstance(module, nn.MultiheadAttention):
                    module.forward = types.MethodType(_mha_forward, module)
                else:
                    module.register_forward_hook(_linear_hook)
            module._clip_lora[target] = (start, stop)
        self.freeze_and_mark(backbone)
        self.applied = True

    @torch.no_grad()
    def merge(self, backbone: Backbone) -> None:
        for module in list(backbone.model.modules()):
            sites = getattr(module, "_clip_lora", None)
            if sites is None:
                continue
            for target, (start, stop) in sites.items():
                delta = _delta(module, target)
                if isinstance(module, nn.MultiheadAttention):
                    weight = module.out_proj.weight if target == "o" else module.in_proj_weight
                else:
                    weight = module.weight
                weight[start:stop] += delta.to(weight.dtype)
                own = [n for n, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
                       if n.startswith(self.prefix) and n.endswith(f"_{target}")]
                for name in own:
                    delattr(module, name)
            if isinstance(module, nn.MultiheadAttention):
                del module.forward  # back to the class's forward
            else:
                for key in [k for k, fn in module._forward_hooks.items() if fn is _linear_hook]:
                    del module._forward_hooks[key]
            del module._clip_lora, module._clip_lora_scale, module._clip_lora_dropout, module._clip_lora_impl
        self.merged = True
