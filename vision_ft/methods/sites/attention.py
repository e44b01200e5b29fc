"""A parent that reads the weight itself: ``nn.MultiheadAttention`` (open_clip's packed ``in_proj_weight``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._state import _state, _Update
from .apply import _fold, _transform


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
