"""SSF: Scaling & Shifting your Features (Lian et al., NeurIPS 2022).

A per-channel affine ``y = gamma * x + beta`` after every operation of the ViT:
norm1, attention qkv (3d), attention proj, norm2, fc1 (before the activation),
fc2 in every block, plus after the patch-embedding projection (before the
position embedding) and after the final norm. On ViT-B/16 that is
``2 * (768 + 2304 + 768 + 768 + 3072 + 768) * 12 + 2 * 2 * 768 = 205,824``
trainable parameters, head excluded.

Each site is an existing module of the backbone; the factors are registered on
it as ``ssf_scale`` / ``ssf_shift`` and applied by a forward hook, so the model
keeps its type and state-dict names. :meth:`SSF.merge` folds them into the
preceding Linear / LayerNorm / Conv2d exactly (the official code has no merge):
``W' = diag(gamma) W``, ``b' = gamma * b + beta``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbones import Backbone
from ..errors import AdapterError
from .base import Method
from .registry import register


def _ssf_hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    scale, shift = module.ssf_scale, module.ssf_shift
    if isinstance(module, nn.Conv2d):  # channels on dim 1
        return output * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return output * scale + shift


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    raise AdapterError(f"SSF cannot be placed after a {type(module).__name__}")


@register
class SSF(Method):
    """SSF: learnable per-channel scale and shift after every ViT operation.

    Args:
        init_std: std of the init ``gamma ~ N(1, s)``, ``beta ~ N(0, s)``; the paper
            and its code use 0.02. ``0`` gives the exact identity at init.
    """

    name = "ssf"
    prefix = "ssf_"
    mergeable = True
    zero_init = False  # gamma ~ N(1, 0.02) perturbs the output at init, as in the paper

    def __init__(self, init_std: float = 0.02) -> None:
        self.init_std = init_std

    @staticmethod
    def sites(backbone: Backbone) -> list[nn.Module]:
        """The modules whose outputs SSF scales and shifts, in forward order."""
        out: list[nn.Module] = [backbone.stem()]
        for i in range(backbone.num_blocks):
            norms = backbone.norms(i)
            out += [norms["norm1"], backbone.linear(i, "qkv"), backbone.linear(i, "proj"),
                    norms["norm2"], backbone.linear(i, "fc1"), backbone.linear(i, "fc2")]
        out.append(backbone.final_norm())
        return out

    def apply(self, backbone: Backbone) -> None:
        for module in self.sites(backbone):
            c = _out_channels(module)
            ref = next(module.parameters())
            scale = torch.ones(c, dtype=ref.dtype, device=ref.device)
            shift = torch.zeros(c, dtype=ref.dtype, device=ref.device)
            if self.init_std > 0:
                nn.init.normal_(scale, 1.0, self.init_std)
                nn.init.normal_(shift, 0.0, self.init_std)
            module.register_parameter("ssf_scale", nn.Parameter(scale))
            module.register_parameter("ssf_shift", nn.Parameter(shift))
            module.register_forward_hook(_ssf_hook)
        self.freeze_and_mark(backbone)
        self.applied = True

    @torch.no_grad()
    def merge(self, backbone: Backbone) -> None:
        for module in self.sites(backbone):
            if not hasattr(module, "ssf_scale"):
                continue
            scale, shift = module.ssf_scale.detach(), module.ssf_shift.detach()
            weight = module.weight
            if isinstance(module, nn.Conv2d):
                weight.mul_(scale.view(-1, 1, 1, 1))
            elif isinstance(module, nn.Linear):
                weight.mul_(scale.view(-1, 1))
            else:  # LayerNorm: gamma * (w * xhat + b) + beta
                weight.mul_(scale)
            if module.bias is None:
                module.bias = nn.Parameter(shift.clone(), requires_grad=False)
            else:
                module.bias.mul_(scale).add_(shift)
            for key in [k for k, fn in module._forward_hooks.items() if fn is _ssf_hook]:
                del module._forward_hooks[key]
            del module.ssf_scale
            del module.ssf_shift
        self.merged = True
