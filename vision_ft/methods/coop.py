"""CoOp: Context Optimization (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022).

The hand-crafted prompt "a photo of a {class}." is replaced by learnable context vectors in the
text encoder's token-embedding space (paper Eq. 2): ``t = [SOS][v_1]...[v_M][CLASS][.][EOS]``, the
class token at the end (or the middle / front, Sec. 3.2), contexts shared by all classes (unified)
or one set per class (class-specific, "CSC"). Both CLIP encoders stay frozen; only the context
trains, through the frozen text encoder (the backbone's ``encode_text_embeddings``). Defaults from
the official code (KaiyangZhou/CoOp, ``scripts/coop/main.sh`` and ``trainers/coop.py``): 16 context
tokens, random init ``N(0, 0.02)`` (or the embedding of ``ctx_init`` words, e.g. "a photo of a"),
class token at the end, unified context; ``configs/trainers/CoOp/vit_b16.yaml``: SGD lr 0.002,
batch 32, 200 epochs (16 shots), cosine, 1 warm-up epoch at constant lr 1e-5.

On ViT-B/16 (text width 512) the unified context has ``16 * 512 = 8,192`` parameters.

The context is the parameter ``coop_ctx`` on the backbone's root model (``(M, width)``, or
``(K, M, width)`` class-specific, ``K`` from the class names the task passes to
:meth:`~vision_ft.methods.base.Method.set_class_names` before ``apply``). CoOp cannot be merged into the
encoder weights (it changes the text encoder's input, not a weight); at inference the K class
features are computed once (the CLIP task caches them per evaluation), so the unmerged cost is one
text-encoder pass over K prompts, the same as zero-shot CLIP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from ..errors import ConfigError
from .base import Method
from .registry import register

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import Backbone

_NEEDS = ("tokenize", "token_embedding", "encode_text_embeddings", "eot_indices", "count_tokens")


@register
class CoOp(Method):
    """CoOp learnable prompt context for a CLIP text head.

    Args:
        n_ctx: number of context tokens ``M`` (16, the paper's default, Sec. 4.1).
        ctx_init: initialise the context from these words' embeddings (e.g. ``a photo of a``; its
            token count then sets ``n_ctx``); empty: random ``N(0, init_std)``.
        class_token_position: ``end`` (default), ``middle`` or ``front`` (paper Sec. 3.2).
        class_specific: one context per class (CSC) instead of one shared context.
        init_std: std of the random init (0.02 in the official code).
    """

    name = "coop"
    prefix = "coop_"
    mergeable = False
    zero_init = False  # the learned context replaces the hand-crafted prompt
    #: needs a CLIP backbone with a text tower (the registry-wide contract on a timm ViT skips it)
    requires_text_tower = True
    #: the learned prompts replace the CLIP task's template head (:meth:`class_text_features`)
    provides_text_features = True

    def __init__(
        self,
        n_ctx: int = 16,
        ctx_init: str = "",
        class_token_position: Literal["end", "middle", "front"] = "end",
        class_specific: bool = False,
        init_std: float = 0.02,
    ) -> None:
        key = "model.init_args.method.init_args"
        if n_ctx < 1:
            raise ConfigError(f"{key}.n_ctx must be >= 1, got {n_ctx}")
        if class_token_position not in ("end", "middle", "front"):
            raise ConfigError(f"{key}.class_token_position must be end, middle or front, got {class_token_position!r}")
        self.n_ctx, self.ctx_init = int(n_ctx), str(ctx_init or "")
        self.class_token_position, self.class_specific, self.init_std = class_token_position, class_specific, init_std
        self._tokens: dict[tuple[str, ...], tuple[torch.Tensor, list[int]]] = {}

    def apply(self, backbone: Backbone) -> None:
        missing = [m for m in _NEEDS if not hasattr(backbone, m)]
        if missing:
            raise ConfigError(f"coop needs a CLIP backbone with a text tower (open_clip or transformers CLIP); "
                              f"{type(backbone).__name__} lacks {missing} (model.init_args.backbone)")
        model = backbone.model
        with torch.no_grad():
            probe = backbone.token_embedding(backbone.tokenize(["x"]))
        width, dtype, device = probe.shape[-1], probe.dtype, probe.device
        if self.ctx_init:
            words = self.ctx_init.replace("_", " ")
            n = backbone.count_tokens(words)
            with torch.no_grad():
                init = backbone.token_embedding(backbone.tokenize([words]))[0, 1:1 + n].clone()
            self.n_ctx = n
        else:
            init = torch.empty(self.n_ctx, width, dtype=dtype, device=device)
            nn.init.normal_(init, std=self.init_std)
        if self.class_specific:
            names = self.class_names
            if not names:
                raise ConfigError("coop class_specific=true needs the task's class names "
                                  "(use vision_ft.tasks.clip_classification.CLIPClassificationTask)")
            if self.ctx_init:
                init = init.unsqueeze(0).repeat(len(names), 1, 1)
            else:
                init = torch.empty(len(names), self.n_ctx, width, dtype=dtype, device=device)
                nn.init.normal_(init, std=self.init_std)
            self._class_index = {n: i for i, n in enumerate(names)}
        model.register_parameter("coop_ctx", nn.Parameter(init))
        self.freeze_and_mark(backbone)
        self.applied = True

    def _prompt_tokens(self, backbone: Backbone, names: list[str]) -> tuple[torch.Tensor, list[int]]:
        key = tuple(names)
        if key not in self._tokens:
            clean = [n.replace("_", " ") for n in names]
            placeholder = " ".join(["X"] * self.n_ctx)
            tokens = backbone.tokenize([f"{placeholder} {n}." for n in clean]).cpu()
            self._tokens[key] = (tokens, [backbone.count_tokens(n) for n in clean])
        return self._tokens[key]

    def class_text_features(self, backbone: Backbone, class_names: list[str]) -> torch.Tensor:
        """Text features (len(class_names), D) of the learned prompts, not normalised."""
        names = class_names
        ctx = backbone.model.coop_ctx
        tokens, name_lens = self._prompt_tokens(backbone, names)
        tokens = tokens.to(ctx.device)
        with torch.no_grad():
            emb = backbone.token_embedding(tokens).to(ctx.dtype)
        prefix, suffix = emb[:, :1], emb[:, 1 + self.n_ctx:]  # [SOS] | [CLASS] [.] [EOS] [pad...]
        if self.class_specific:
            unknown = [n for n in names if n not in self._class_index]
            if unknown:
                raise ConfigError(f"coop class_specific has no context for classes {unknown}: per-class contexts "
                                  "exist only for the classes it was built with (no base-to-novel transfer)")
            ctx = ctx[[self._class_index[n] for n in names]]
        else:
            ctx = ctx.unsqueeze(0).expand(len(names), -1, -1)
        if self.class_token_position == "end":
            prompts = torch.cat([prefix, ctx, suffix], 1)
        else:
            rows = []
            half = self.n_ctx // 2
            for i, n in enumerate(name_lens):
                cls, rest = suffix[i:i + 1, :n], suffix[i:i + 1, n:]
                c = ctx[i:i + 1]
                if self.class_token_position == "middle":
                    rows.append(torch.cat([prefix[i:i + 1], c[:, :half], cls, c[:, half:], rest], 1))
                else:
                    rows.append(torch.cat([prefix[i:i + 1], cls, c, rest], 1))
            prompts = torch.cat(rows, 0)
        return backbone.encode_text_embeddings(prompts, backbone.eot_indices(tokens))
