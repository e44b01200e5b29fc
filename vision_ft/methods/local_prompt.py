"""Local-Prompt (Zeng et al., "Local-Prompt: Extensible Local Prompts for Few-Shot Out-of-Distribution
Detection", ICLR 2025; official code AuroraZengfh/Local-Prompt).

CLIP and the *global* prompts ("a photo of a {c}.") stay frozen; what trains are *local* prompts, read
against per-patch image features: one learnable context per ID class (``K x 16 x width``, class token
at the end, as CoOp's class-specific contexts) and ``M = 300`` class-agnostic *negative* contexts
(``[SOS][v_1..v_16][.][EOS]``), all initialised ``N(0, 0.02)`` and encoded by the frozen text tower.

Local (regional) image features are computed as GL-MCM / LoCoOp's ``clip_w_local`` (the CLIP copy the
official code imports): with ``x`` the input of the last visual block, ``v = x + out_proj(W_v ln_1(x)
+ b_v)``, ``v = v + mlp(ln_2(v))`` (the last block with every token attending only to itself), then
``ln_post`` and ``proj``; the class token is dropped (196 regions on ViT-B/16 at 224 px).

Training (``trainers/localprompt.py``, one batch):

1. *Global prompt guided negative augmentation*: 16 random resized crops per image (the data loader
   returns 16 views), each scored without gradients by the cosine between its global image feature
   and the frozen global text feature of the true class; the 8 best are positives, the lowest is the
   hard negative.
2. *Regional contrastive loss* (for each positive crop): the top-k regions for the true class's local
   prompt against the top-k regions of every local and negative prompt, logits ``exp(t) cos / T``:
   ``L_reg = -log sum_k e^{s_y,k/T} / (sum_{c<=K} sum_k e^{s_c,k/T} + sum_{m<=M} sum_k e^{n_m,k/T})``.
3. *Negative loss* on the hard-negative crop: at its k regions most similar to the true class, the
   negative prompts should win over the top-k regions of the ID local prompts.
4. *Diversity*: ``L_div = sum_{i,j} cos(t_i, t_j) / (M (M - 1))`` over prompt features.
5. ``L = L_reg + 5 L_neg + 0.5 L_div`` with k = 50 (train), T = 1.

OOD score (``test_ood``, higher = more in-distribution): ``MCM + regional`` with ``MCM = max_c
softmax(cos(f, g_c) / T)`` over the global prompts (T = 1 on the cosine, as MCM) and ``regional`` the
mean of the top-k (k = 10) entries, over all (region, class) pairs, of the softmax over ID local +
negative prompts restricted to the ID classes. ID classification (official ``test``) multiplies
``exp(cos(f, g_c))`` by the mean over the top-k regions of ``exp(cos(r, l_c) / T)``: :meth:`LocalPrompt.
id_logits` returns its logarithm. The global prompts can be swapped at inference for a trained CoOp
context (``global_prompts``), the paper's "extensible" use.

Choices against the official code (every one also in the class docstring):

- The official trainer takes 8 optimiser steps per batch, one per positive crop; here one step is taken
  on the mean of the 8 regional losses (the same gradient at the first of the 8 steps).
- Crops come from the batch the datamodule gives (already resized), with ``torchvision.ops.roi_align``
  (bilinear with adaptive supersampling) instead of PIL bicubic on the original file.
- The released code applies the diversity term to the ID *local* prompt features (normalised by the
  number of negative prompts); docs/methods/local_prompt.md and the paper's text apply it to the negative prompts.
  Default ``diversity_on: negative``; ``local`` reproduces the released code.

Parameters on ViT-B/16 (text width 512), ImageNet-1k (K = 1000): ``1000 * 16 * 512 + 300 * 16 * 512
= 8,192,000 + 2,457,600 = 10,649,600``.

The method adds ``local_prompt_ctx`` ``(K, n_ctx, width)`` and ``local_prompt_neg_ctx`` ``(M, n_ctx,
width)`` on the root model and, with ``global_prompts``, a frozen submodule ``local_prompt_global``
holding the CoOp context (saved with the adapter, never trained). It cannot be merged (it adds text
inputs, not weight updates). Unmerged inference cost per image: one extra value-path pass of the last
visual block over all tokens (about one block of the 12, ~8% of the ViT-B/16 image tower) and a
``(N_regions x (K + M))`` similarity; the ``K + M`` prompt features are computed once and cached
while the prompts do not change.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import Method, has_prefix
from .coop import _NEEDS as _TEXT_TOWER_NEEDS
from .coop import CoOp
from .registry import register
from .local_prompt_ops import (  # noqa: F401 - the method's operations, importable from here as before
    global_and_dense, crop_boxes, random_resized_crops, score_crops, select_crops, regional_contrastive_loss,
    negative_region_loss, diversity_loss, mcm_score, regional_score, local_id_logits,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import Backbone

log = logging.getLogger("vision_ft")

_KEY = "model.init_args.method.init_args"
#: classes the prompts are sized for when no task gave class names (``vision_ft methods`` counts):
#: ImageNet-1k, the paper's setting
COUNT_CLASSES = 1000
_GLOBAL = "local_prompt_global"


class _CoOpView:
    """The backbone as a CoOp instance sees it, with ``model`` = our frozen holder of its context, so
    CoOp's own prompt assembly (class-token position, class-specific lookup) serves the global prompts."""

    def __init__(self, backbone: Backbone, holder: nn.Module) -> None:
        self._backbone, self.model = backbone, holder

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_backbone":  # copy/pickle probes before __init__ state exists
            raise AttributeError(name)
        return getattr(self._backbone, name)


def read_coop_run(path: str) -> tuple[dict[str, Any], list[str], torch.Tensor]:
    """CoOp's init args, class names and context tensor from a run dir (``adapter.json`` +
    ``adapter.safetensors``) or its ``adapter.safetensors`` file."""
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    run = p.parent if p.is_file() else p
    meta_path, weights = run / "adapter.json", (p if p.is_file() else run / "adapter.safetensors")
    if not meta_path.is_file() or not weights.is_file():
        raise ConfigError(f"{_KEY}.global_prompts={path!r}: no CoOp run there (needs adapter.json and "
                          "adapter.safetensors written by `fit` with method coop)")
    meta = json.loads(meta_path.read_text())
    if meta.get("method") != "coop":
        raise ConfigError(f"{_KEY}.global_prompts={path!r} is a {meta.get('method')!r} run; global prompts "
                          "come from a CoOp run")
    tensors = load_file(str(weights))
    ctx = tensors.get("backbone.model.coop_ctx")
    if ctx is None:
        raise ConfigError(f"{_KEY}.global_prompts={path!r}: adapter.safetensors has no coop_ctx")
    args = dict((meta.get("method_spec") or {}).get("init_args") or {})
    return args, list(meta.get("class_names") or []), ctx


# --- the method ---------------------------------------------------------------------------------
@register
class LocalPrompt(Method):
    """Local-Prompt: per-class local prompts + negative local prompts on regional CLIP features.

    Hooks the CLIP tasks call (declared on :class:`~vision_ft.methods.base.Method`):
    :meth:`training_loss` (the full loss, crops included; it replaces the task's cross-entropy, which
    would have no gradient here), :meth:`ood_scores` (``mcm``, ``regional``, ``mcm+regional``; higher
    = ID) and :meth:`id_logits` (the official ID classifier), the last two in the OOD task. The local
    prompts are sized from the class names the task passes to ``set_class_names``.

    Defaults are the official recipe (AuroraZengfh/Local-Prompt: ``train.py`` argument defaults,
    ``scripts/train.sh`` / ``eval.sh`` and the README's ImageNet-1k commands, ``trainers/localprompt.py``;
    paper Sec. 3, Tables 1-2 report ImageNet-1k with these settings).

    Args:
        n_ctx: context tokens per prompt (``N_CTX 16``).
        num_negative_prompts: class-agnostic negative local prompts ``M`` (``--num_neg_prompts 300``).
        init_std: std of the ``N(0, std)`` context init (0.02, random init: ``CTX_INIT ""``).
        top_k_train: regions in the training losses (README: ``topk 50``); clamped to the region count.
        top_k_eval: (region, class) entries in the regional score and regions in :meth:`id_logits`
            (``eval.sh`` ``--top_k 10``).
        temperature: ``T`` of the losses (on ``exp(t) cos``) and of the scores (on ``cos``) (``--T 1``).
        negative_weight: weight of the negative loss (``--lambda_value 5``).
        diversity_weight: weight of the diversity loss (``--div_value 0.5``).
        diversity_on: ``negative`` (the paper text, docs/methods/local_prompt.md) or ``local`` (the released code, which
            applies it to the ID local prompt features).
        num_crops: random crops per image for negative augmentation (16 views from the data loader).
        num_positive: best-scoring crops used as positives (``--num_pos 8``); the lowest is the negative.
        crop_scale: area range of the random resized crops (Dassl ``RRCROP_SCALE (0.08, 1.0)``).
        regional_weight: weight of the regional score in ``mcm+regional`` (1 in the paper; 0 gives MCM).
        global_prompts: a CoOp run dir (or its ``adapter.safetensors``) whose learned context replaces
            the hand-crafted global prompt at inference (paper: "extensible" to trained global prompts).
    """

    name = "local_prompt"
    prefix = "local_prompt_"
    mergeable = False
    #: the local / negative prompts start random (N(0, 0.02)): the regional score and the ID logits
    #: differ from zero-shot CLIP at init (the CLIP encoders themselves are never changed)
    zero_init = False
    requires_text_tower = True

    def __init__(
        self,
        n_ctx: int = 16,
        num_negative_prompts: int = 300,
        init_std: float = 0.02,
        top_k_train: int = 50,
        top_k_eval: int = 10,
        temperature: float = 1.0,
        negative_weight: float = 5.0,
        diversity_weight: float = 0.5,
        diversity_on: Literal["negative", "local"] = "negative",
        num_crops: int = 16,
        num_positive: int = 8,
        crop_scale: list[float] = [0.08, 1.0],  # noqa: B006 - jsonargparse needs a plain list default
        regional_weight: float = 1.0,
        global_prompts: str | None = None,
    ) -> None:
        for key, value, low in (("n_ctx", n_ctx, 1), ("num_negative_prompts", num_negative_prompts, 1),
                                ("top_k_train", top_k_train, 1), ("top_k_eval", top_k_eval, 1),
                                ("num_positive", num_positive, 1)):
            if int(value) < low:
                raise ConfigError(f"{_KEY}.{key} must be >= {low}, got {value}")
        if num_crops <= num_positive:
            raise ConfigError(f"{_KEY}.num_crops ({num_crops}) must exceed num_positive ({num_positive}): "
                              "the lowest-scoring crop is the hard negative")
        if temperature <= 0:
            raise ConfigError(f"{_KEY}.temperature must be > 0, got {temperature}")
        if diversity_on not in ("negative", "local"):
            raise ConfigError(f"{_KEY}.diversity_on must be 'negative' or 'local', got {diversity_on!r}")
        if diversity_weight and num_negative_prompts < 2:
            raise ConfigError(f"{_KEY}.num_negative_prompts must be >= 2 with a diversity loss "
                              "(it is normalised by M (M - 1))")
        if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ConfigError(f"{_KEY}.crop_scale must be [low, high] with 0 < low <= high <= 1, got {crop_scale}")
        self.n_ctx, self.num_negative_prompts, self.init_std = int(n_ctx), int(num_negative_prompts), init_std
        self.top_k_train, self.top_k_eval, self.temperature = int(top_k_train), int(top_k_eval), float(temperature)
        self.negative_weight, self.diversity_weight = float(negative_weight), float(diversity_weight)
        self.diversity_on, self.num_crops, self.num_positive = diversity_on, int(num_crops), int(num_positive)
        self.crop_scale = [float(c) for c in crop_scale]
        self.regional_weight, self.global_prompts = float(regional_weight), global_prompts
        self._row: dict[str, int] = {}
        self._tokens: torch.Tensor | None = None
        self._neg_tokens: torch.Tensor | None = None
        self._coop: CoOp | None = None
        self._coop_view: _CoOpView | None = None
        self._cache: dict[Any, Any] = {}
        #: the last training loss's terms (detached), for logging by the task
        self.last_terms: dict[str, float] = {}

    # --- set-up -------------------------------------------------------------------------------
    def apply(self, backbone: Backbone) -> None:
        missing = [m for m in _TEXT_TOWER_NEEDS if not hasattr(backbone, m)]
        if missing:
            raise ConfigError(f"local_prompt needs a CLIP backbone with a text tower (open_clip or transformers CLIP); "
                              f"{type(backbone).__name__} lacks {missing} (model.init_args.backbone)")
        if not hasattr(backbone, "dense_features"):
            raise ConfigError(f"local_prompt needs per-patch CLIP features: {type(backbone).__name__} has no "
                              "dense_features() (use the open_clip or transformers CLIP backbone; "
                              "model.init_args.backbone)")
        names = list(self.class_names or [])
        if not names:
            names = [f"class {i}" for i in range(COUNT_CLASSES)]
            log.warning("[vision_ft] local_prompt: applied without class names (no task); local prompts sized "
                        "for %d classes (ImageNet-1k) -- only meaningful for parameter counts. Use a CLIP task.",
                        COUNT_CLASSES)
        if len(set(names)) != len(names):
            raise ConfigError("local_prompt needs distinct class names (model.init_args.class_names)")
        model = backbone.model
        with torch.no_grad():
            probe = backbone.token_embedding(backbone.tokenize(["x"]))
        width, dtype, device = probe.shape[-1], probe.dtype, probe.device
        local = torch.empty(len(names), self.n_ctx, width, dtype=dtype, device=device)
        negative = torch.empty(self.num_negative_prompts, self.n_ctx, width, dtype=dtype, device=device)
        nn.init.normal_(local, std=self.init_std)
        nn.init.normal_(negative, std=self.init_std)
        model.register_parameter("local_prompt_ctx", nn.Parameter(local))
        model.register_parameter("local_prompt_neg_ctx", nn.Parameter(negative))
        placeholder = " ".join(["X"] * self.n_ctx)
        clean = [n.replace("_", " ") for n in names]
        self._row = {n: i for i, n in enumerate(names)}
        self._tokens = backbone.tokenize([f"{placeholder} {n}." for n in clean]).cpu()
        self._neg_tokens = backbone.tokenize([f"{placeholder} ."]).cpu()
        if self.global_prompts:
            self._attach_global_prompts(backbone)
        self.freeze_and_mark(backbone)
        self.applied = True

    def _attach_global_prompts(self, backbone: Backbone) -> None:
        args, coop_names, ctx = read_coop_run(self.global_prompts)
        coop = CoOp(**args)
        holder = nn.Module()
        backbone.model.add_module(_GLOBAL, holder)
        view = _CoOpView(backbone, holder)
        coop.set_class_names(coop_names or list(self.class_names or []))
        coop.apply(view)
        param = holder.coop_ctx
        if tuple(param.shape) != tuple(ctx.shape):
            raise ConfigError(f"{_KEY}.global_prompts: CoOp context {tuple(ctx.shape)} does not fit this backbone "
                              f"(expects {tuple(param.shape)}); was it trained on another CLIP?")
        with torch.no_grad():
            param.copy_(ctx.to(param.dtype))
        param.requires_grad_(False)
        self._coop, self._coop_view = coop, view

    def is_trainable(self, name: str) -> bool:
        """The local and negative prompts; not the frozen CoOp context under ``local_prompt_global``
        (saved with the adapter all the same: the base rule saves every own tensor)."""
        return has_prefix(name, self.prefix) and not name.startswith(f"{_GLOBAL}.")

    # --- text features ------------------------------------------------------------------------
    def _cached(self, key: tuple, compute):
        """``compute()``, memoised while gradients are off (evaluation, crop scoring)."""
        if torch.is_grad_enabled():
            return compute()
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = compute()
        return self._cache[key]

    @staticmethod
    def _state(*tensors: torch.Tensor) -> tuple:
        return tuple((t.data_ptr(), t._version, str(t.device)) for t in tensors)

    def global_text_features(self, task: Any, indices: list[int]) -> torch.Tensor:
        """Normalised global prompt features (len(indices), D): the task's templates (``a photo of a {}.``)
        or, with ``global_prompts``, the CoOp context (both frozen, no gradient)."""
        names = [task.class_names[i] for i in indices]
        backbone = task.backbone
        if self._coop is not None:
            ctx = backbone.model.get_submodule(_GLOBAL).coop_ctx
            key = ("coop", tuple(names), self._state(ctx))
            return self._cached(key, lambda: F.normalize(
                self._coop.class_text_features(self._coop_view, names).float(), dim=-1))
        key = ("templates", tuple(names), tuple(task.templates), id(backbone.model),
               str(backbone.model.logit_scale.device))
        return self._cached(key, lambda: task.zero_shot_features(list(indices)))

    def local_text_features(self, backbone: Backbone, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised features of the ID local prompts of ``names`` (K, D) and of the negative prompts (M, D)."""
        model = backbone.model
        ctx, neg = model.local_prompt_ctx, model.local_prompt_neg_ctx
        unknown = [n for n in names if n not in self._row]
        if unknown:
            raise ConfigError(f"local_prompt has no local prompt for classes {unknown}: local prompts exist only for "
                              "the classes it was built with")
        key = ("local", tuple(names), self._state(ctx, neg))
        return self._cached(key, lambda: self._encode_local(backbone, names))

    def _encode_local(self, backbone: Backbone, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        model = backbone.model
        ctx, neg = model.local_prompt_ctx, model.local_prompt_neg_ctx
        rows = torch.tensor([self._row[n] for n in names], device=ctx.device)
        tokens = self._tokens.to(ctx.device)[rows]
        neg_tokens = self._neg_tokens.to(ctx.device).expand(len(neg), -1)
        with torch.no_grad():
            emb = backbone.token_embedding(tokens).to(ctx.dtype)
            neg_emb = backbone.token_embedding(neg_tokens[:1]).to(ctx.dtype).expand(len(neg), -1, -1)
        n = self.n_ctx
        prompts = torch.cat([torch.cat([emb[:, :1], ctx[rows], emb[:, 1 + n:]], 1),
                             torch.cat([neg_emb[:, :1], neg, neg_emb[:, 1 + n:]], 1)], 0)
        eot = backbone.eot_indices(torch.cat([tokens, neg_tokens], 0))
        feats = F.normalize(backbone.encode_text_embeddings(prompts, eot).float(), dim=-1)
        return feats[: len(names)], feats[len(names):]

    # --- training -----------------------------------------------------------------------------
    def training_loss(self, task: Any, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The full Local-Prompt loss of a batch: images (B, 3, H, W) in [0, 1], labels (B,) as positions in
        ``task.seen`` (what ``CLIPClassificationTask._seen_batch`` gives; class indices when nothing is
        held out). ``L_reg`` (mean over the positive crops) ``+ negative_weight L_neg + diversity_weight L_div``."""
        backbone = task.backbone
        indices = list(task.seen)
        names = [task.class_names[i] for i in indices]
        b = images.shape[0]
        crops = random_resized_crops(images.float(), self.num_crops, backbone.input_size, tuple(self.crop_scale))
        with torch.no_grad():
            pooled, dense = global_and_dense(backbone, backbone.preprocess(crops))
            sim = score_crops(pooled.view(self.num_crops, b, -1), self.global_text_features(task, indices), labels)
            positives, negative = select_crops(sim, self.num_positive)
            dense = F.normalize(dense.float(), dim=-1)
            dense = dense.view(self.num_crops, b, *dense.shape[1:])
            batch = torch.arange(b, device=dense.device)
            pos_regions = dense[positives, batch]  # (P, B, N, D)
            neg_regions = dense[negative, batch]  # (B, N, D)
        k = min(self.top_k_train, dense.shape[2])
        if k < self.top_k_train and not getattr(self, "_warned_k", False):
            log.warning("[vision_ft] local_prompt: top_k_train=%d > %d regions; using %d", self.top_k_train,
                        dense.shape[2], k)
            self._warned_k = True
        t_local, t_neg = self.local_text_features(backbone, names)
        scale = backbone.logit_scale().float()
        labels = labels.to(dense.device)
        regional = torch.stack([
            regional_contrastive_loss(scale * pos_regions[p] @ t_local.T, scale * pos_regions[p] @ t_neg.T,
                                      labels, k, self.temperature)
            for p in range(pos_regions.shape[0])]).mean()
        negative_loss = negative_region_loss(scale * neg_regions @ t_neg.T, scale * neg_regions @ t_local.T,
                                             labels, k, self.temperature)
        loss = regional + self.negative_weight * negative_loss
        diversity = torch.zeros((), device=loss.device)
        if self.diversity_weight:
            diversity = diversity_loss(t_neg if self.diversity_on == "negative" else t_local,
                                       self.num_negative_prompts)
            loss = loss + self.diversity_weight * diversity
        self.last_terms = {"local_prompt_regional": float(regional.detach()),
                           "local_prompt_negative": float(negative_loss.detach()),
                           "local_prompt_diversity": float(diversity.detach())}
        return loss

    # --- inference ----------------------------------------------------------------------------
    def _similarities(self, task: Any, images: torch.Tensor, indices: list[int]):
        backbone = task.backbone
        names = [task.class_names[i] for i in indices]
        pooled, dense = global_and_dense(backbone, backbone.preprocess(images))
        global_cos = F.normalize(pooled.float(), dim=-1) @ self.global_text_features(task, indices).T
        dense = F.normalize(dense.float(), dim=-1)
        t_local, t_neg = self.local_text_features(backbone, names)
        return global_cos, dense @ t_local.T, dense @ t_neg.T

    @torch.no_grad()
    def ood_scores(self, task: Any, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """OOD scores (B,) of images in [0, 1], higher = more in-distribution, over all ID classes (the task's
        class names, as the OOD task's MCM): ``mcm`` (global prompts; ``T`` = the task's ``mcm_temperature``
        when it has one, else ``temperature``), ``regional`` and ``mcm+regional`` (the Local-Prompt score,
        ``mcm + regional_weight * regional``; exactly ``mcm`` when ``regional_weight`` is 0)."""
        global_cos, id_cos, neg_cos = self._similarities(task, images, list(range(len(task.class_names))))
        mcm = mcm_score(global_cos, float(getattr(task, "mcm_temperature", self.temperature)))
        regional = regional_score(id_cos, neg_cos, self.top_k_eval, self.temperature)
        total = mcm if self.regional_weight == 0 else mcm + self.regional_weight * regional
        return {"mcm": mcm, "regional": regional, "mcm+regional": total}

    @torch.no_grad()
    def id_logits(self, task: Any, images: torch.Tensor) -> torch.Tensor:
        """ID class scores (B, len(task.seen)) of the official classifier, in log space:
        ``cos_g + log mean_{top-k regions} exp(cos_l / T)`` (its argmax is the official prediction)."""
        global_cos, id_cos, _ = self._similarities(task, images, list(task.seen))
        return local_id_logits(global_cos, id_cos, self.top_k_eval, self.temperature)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state
