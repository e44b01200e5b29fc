"""Local-Prompt's tensor operations: local features, random crops, the crop choice, the three losses and the
OOD scores (see :mod:`vision_ft.methods.local_prompt` for the method and its sources)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import Backbone


# --- local image features ------------------------------------------------------------------
def global_and_dense(backbone: Backbone, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images -> (pooled (B, embed_dim) == ``encode_image(x)``, patch features (B, N, embed_dim))
    from one pass: the backbone's ``dense_features(x, return_pooled=True)`` (the open_clip and transformers
    CLIP backbones: the last visual block's value path, GL-MCM / Local-Prompt's local features)."""
    return backbone.dense_features(x, return_pooled=True)


# --- negative augmentation ----------------------------------------------------------------------
def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float] = (0.08, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3), generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """``n`` random-resized-crop boxes ``(x0, y0, x1, y1)`` in pixels, torchvision's sampler
    (10 tries of area in ``scale`` and log-uniform aspect ``ratio``, then a centre crop), vectorised."""
    area = float(height * width)
    tries = 10
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, generator=generator))
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(n, tries, generator=generator)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    w, h = w[rows, first.clamp(min=0)], h[rows, first.clamp(min=0)]
    # fallback (no try fitted): torchvision's centre crop at the closest allowed aspect ratio
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    miss = first < 0
    w = torch.where(miss, torch.full_like(w, fw), w)
    h = torch.where(miss, torch.full_like(h, fh), h)
    u = torch.rand(n, 2, generator=generator)
    x0 = torch.floor(u[:, 0] * (width - w + 1))
    y0 = torch.floor(u[:, 1] * (height - h + 1))
    x0 = torch.where(miss, torch.full_like(x0, (width - fw) // 2), x0)
    y0 = torch.where(miss, torch.full_like(y0, (height - fh) // 2), y0)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def random_resized_crops(images: torch.Tensor, n: int, size: tuple[int, int],
                         scale: tuple[float, float] = (0.08, 1.0), flip: bool = True,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random resized crops (+ horizontal flip with p = 0.5) of each image (B, C, H, W) ->
    (n * B, C, *size), crop-major (crop ``i`` of image ``b`` at row ``i * B + b``)."""
    from torchvision.ops import roi_align

    b, _, height, width = images.shape
    boxes = crop_boxes(n * b, height, width, scale, generator=generator)
    index = torch.arange(b).repeat(n).to(boxes.dtype)
    rois = torch.cat([index[:, None], boxes], 1).to(device=images.device, dtype=images.dtype)
    crops = roi_align(images, rois, output_size=tuple(size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if flip:
        mask = (torch.rand(n * b, generator=generator) < 0.5).to(images.device)
        crops = torch.where(mask[:, None, None, None], crops.flip(-1), crops)
    return crops


def score_crops(crop_features: torch.Tensor, class_text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cosine (n_crops, B) between each crop's global feature (n_crops, B, D) and the global text
    feature of its image's true class (``class_text`` (K, D)); both normalised here."""
    crops = F.normalize(crop_features.float(), dim=-1)
    text = F.normalize(class_text.float(), dim=-1)[labels]  # (B, D)
    return (crops * text.unsqueeze(0)).sum(-1)


def select_crops(similarity: torch.Tensor, num_positive: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From crop scores (n_crops, B): the ``num_positive`` best crops per image (num_positive, B), best
    first, and the lowest-scoring crop (B,) -- the hard negative."""
    positives = similarity.topk(num_positive, dim=0).indices
    negative = similarity.topk(1, dim=0, largest=False).indices[0]
    return positives, negative


# --- losses and scores -------------------------------------------------------------------------
def regional_contrastive_loss(id_logits: torch.Tensor, neg_logits: torch.Tensor, labels: torch.Tensor,
                              k: int, temperature: float = 1.0) -> torch.Tensor:
    """Regional contrastive loss of a positive crop: ``id_logits`` (B, N, K) and ``neg_logits`` (B, N, M)
    are scaled region-prompt similarities. Numerator: the true class's top-k regions; denominator: the
    top-k regions of every ID local and negative prompt (official ``calculate_loss_local``)."""
    b, n, _ = id_logits.shape
    own = id_logits.gather(2, labels.view(b, 1, 1).expand(b, n, 1)).squeeze(2)  # (B, N)
    num = (own.topk(k, dim=1).values / temperature).logsumexp(1)
    den = torch.cat([id_logits.topk(k, dim=1).values, neg_logits.topk(k, dim=1).values], 2) / temperature
    return (den.flatten(1).logsumexp(1) - num).mean()


def negative_region_loss(neg_logits: torch.Tensor, id_logits: torch.Tensor, labels: torch.Tensor,
                         k: int, temperature: float = 1.0) -> torch.Tensor:
    """Loss of the hard-negative crop: at its k regions most similar to the true class's local prompt,
    the negative prompts (``neg_logits`` (B, N, M)) against the top-k regions of every ID local prompt
    (``id_logits`` (B, N, K)) (official ``calculate_loss_local_neg``)."""
    b, n, m = neg_logits.shape
    own = id_logits.gather(2, labels.view(b, 1, 1).expand(b, n, 1)).squeeze(2)  # (B, N)
    where = own.topk(k, dim=1).indices  # (B, k)
    pos = neg_logits.gather(1, where.unsqueeze(2).expand(b, k, m)) / temperature  # (B, k, M)
    other = id_logits.topk(k, dim=1).values / temperature  # (B, k, K)
    return (torch.cat([pos, other], 2).flatten(1).logsumexp(1) - pos.flatten(1).logsumexp(1)).mean()


def diversity_loss(features: torch.Tensor, normaliser: int) -> torch.Tensor:
    """``sum_{i,j} cos(t_i, t_j) / (M (M - 1))`` over prompt features (P, D), diagonal included, ``M`` =
    ``normaliser`` (the number of negative prompts in the official code)."""
    f = F.normalize(features.float(), dim=-1)
    return (f @ f.T).sum() / (normaliser * (normaliser - 1))


def mcm_score(global_cos: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """MCM (Ming et al., NeurIPS 2022): ``max_c softmax(cos(f, g_c) / T)`` over the ID classes, (B,)."""
    return (global_cos / temperature).softmax(-1).max(-1).values


def regional_score(id_cos: torch.Tensor, neg_cos: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """Regional MCM: softmax over ID local + negative prompts per region (cosines (B, N, K), (B, N, M)),
    the ID entries' top-k over all (region, class) pairs, averaged, (B,)."""
    b, n, kk = id_cos.shape
    probs = (torch.cat([id_cos, neg_cos], -1) / temperature).softmax(-1)[..., :kk]
    return probs.reshape(b, n * kk).topk(min(k, n * kk), dim=1).values.mean(1)


def local_id_logits(global_cos: torch.Tensor, id_cos: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """``log(exp(cos_g) * mean_topk_regions exp(cos_l / T))`` (B, K): the official ID classifier in log space."""
    top = (id_cos / temperature).topk(min(k, id_cos.shape[1]), dim=1).values  # (B, k, K)
    return global_cos + top.logsumexp(1) - math.log(top.shape[1])


# --- CoOp global prompts -----------------------------------------------------------------------
