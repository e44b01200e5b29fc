"""SSF: Scaling & Shifting your Features (Lian et al., NeurIPS 2022).

A per-channel affine ``y = gamma * x + beta`` after every operation of the ViT:
norm1, attention qkv (3d), attention proj, norm2, fc1 (before the activation),
fc2 in every block, plus after the patch-embedding projection (before the
position embedding) and after the final norm. On ViT-B/16 that is
``2 * (768 + 2304 + 768 + 768 + 3072 + 768) * 12 + 2 * 2 * 768 = 205,824``
trainable parameters, head excluded.

Each place is a site (:mod:`vision_ft.methods.sites`) of the backbone; the factors
are registered on the module owning the weight as ``ssf_scale`` / ``ssf_shift``
and applied to its output by the site layer, so the model keeps its type and
state-dict names (on open_clip, whose attention reads its packed ``in_proj_weight``
directly, the scale and shift act through the effective weight). :meth:`SSF.merge`
folds them into the preceding Linear / LayerNorm / Conv2d exactly (the official
code has no merge): ``W' = diag(gamma) W``, ``b' = gamma * b + beta``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import VisionFTError
from . import sites as S
from .base import Method
from .registry import register

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import Backbone


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

    bench_notes = {
        "time": "SSF scales and shifts the output of every linear, norm and the patch embedding: elementwise "
                "passes over every activation in forward and backward, a reduction over all tokens per channel "
                "for its gradients, and the input of every scale saved for backward (see the activations column).",
    }

    def paper_parameters(self) -> dict[str, Any] | None:
        return {"value": 205_824, "precision": 1, "text": "205,824 (0.24M VTAB / 0.39M FGVC with heads)",
                "compare": "trainable", "source": "SSF (Lian et al., NeurIPS 2022): 2*8448*12 + 2*1536"}

    def __init__(self, init_std: float = 0.02) -> None:
        self.init_std = init_std

    @staticmethod
    def sites(backbone: Backbone) -> list[S.Site]:
        """The places whose outputs SSF scales and shifts, in forward order. Where the attention has
        separate q, k, v projections (transformers, diffusers) the qkv scale/shift is theirs: the
        same ``3d`` factors on the same outputs as on a fused ``qkv``."""
        out = [S.of_module(backbone, backbone.stem(), "stem")]
        for i in range(backbone.num_blocks):
            norms = backbone.norms(i)
            try:
                qkv = [S.at(backbone, i, "qkv")]
            except VisionFTError:  # no fused projection: the backbone said so
                qkv = [S.at(backbone, i, r) for r in ("q", "k", "v")]
            out += [S.of_module(backbone, norms["norm1"], "norm1", i), *qkv,
                    S.at(backbone, i, "proj"), S.of_module(backbone, norms["norm2"], "norm2", i),
                    S.at(backbone, i, "fc1"), S.at(backbone, i, "fc2")]
        out.append(S.of_module(backbone, backbone.final_norm(), "final_norm"))
        return out

    def apply(self, backbone: Backbone) -> None:
        for site in self.sites(backbone):
            ref = site.weight
            c = site.out_features
            scale = torch.ones(c, dtype=ref.dtype, device=ref.device)
            shift = torch.zeros(c, dtype=ref.dtype, device=ref.device)
            if self.init_std > 0:
                nn.init.normal_(scale, 1.0, self.init_std)
                nn.init.normal_(shift, 0.0, self.init_std)
            site.add_scale_shift(self.prefix, scale=site.add_tensor(self.prefix, "scale", nn.Parameter(scale)),
                                 shift=site.add_tensor(self.prefix, "shift", nn.Parameter(shift)))
        self.freeze_and_mark(backbone)
        self.applied = True

    def merge(self, backbone: Backbone) -> None:
        S.merge_all(backbone.model, self.prefix)
        self.merged = True
