"""Tiny models of every family the site layer covers, each with the forward a contract test needs.

All are the kit's backbones: the causal LMs as a Llama layout with separate projections and a Phi-3
layout with fused ``qkv_proj`` / ``gate_up_proj``, the Stable Diffusion UNet (diffusers
``UNet2DConditionModel``: self- and cross-attention ``to_q/to_k/to_v/to_out.0``, GEGLU feed-forward) and the
Wan 2.1 video transformer (``WanTransformer3DModel``: the same attention names, non-affine norms).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vision_ft.backbones import (
    HFCLIP,
    Backbone,
    CausalLM,
    DFineDetector,
    OpenCLIP,
    StableDiffusion,
    TimmViT,
    WanVideo,
)

X = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# --- builders and forwards ---------------------------------------------------------------------------
def _clip_forward(b: Backbone) -> torch.Tensor:
    img = b.encode_image(b.preprocess(X))
    txt = b.encode_text(b.tokenize(["a photo of a cat."]))
    return torch.cat([img.flatten(), txt.flatten()])


def _dfine_forward(b: Backbone) -> torch.Tensor:
    out = b(b.preprocess(X))
    return torch.cat([out.logits.flatten(), out.pred_boxes.flatten()])


_TOKENS = torch.randint(1, 64, (1, 7), generator=torch.Generator().manual_seed(0))
_LATENTS = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
_TEXT = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
_VIDEO = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(2))  # Wan [B, C, F, H, W]

#: family -> (build, forward): ``forward(backbone)`` is a deterministic output tensor in eval mode
FAMILIES: dict[str, tuple[Callable[[], Backbone], Callable[[Backbone], torch.Tensor]]] = {
    "timm": (lambda: TimmViT("vit_test_tiny"), lambda b: b(b.preprocess(X))),
    "open_clip": (lambda: OpenCLIP("open_clip_test_tiny"), _clip_forward),
    "hf_clip": (lambda: HFCLIP("hf_clip_test_tiny"), _clip_forward),
    "dfine": (lambda: DFineDetector("dfine_test_tiny", num_labels=2), _dfine_forward),
    "llama": (lambda: CausalLM("llama_test_tiny"), lambda b: b.model(input_ids=_TOKENS).logits),
    "phi3": (lambda: CausalLM("phi3_test_tiny"), lambda b: b.model(input_ids=_TOKENS).logits),
    "unet": (lambda: StableDiffusion("sd_test_tiny"), lambda b: b.denoise(_LATENTS, torch.tensor([500]), _TEXT)),
    "wan": (lambda: WanVideo("wan_test_tiny", max_sequence_length=8),
            lambda b: b.denoise(_VIDEO, torch.tensor([500.0]), _TEXT)),
}
