"""Tiny models of every family the site layer covers, each with the forward a contract test needs.

The first six are the kit's backbones (the causal LMs as a Llama layout with separate projections and a
Phi-3 layout with fused ``qkv_proj`` / ``gate_up_proj``). The last is a test-only stand-in for the
diffusers UNet attention of the Stable Diffusion work: a minimal :class:`~vision_ft.backbones.Backbone`
that says where a role's weight lives in the real library model, so the site layer and every method are
exercised on those modules before that backbone exists.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from vision_ft.backbones import Backbone, CausalLM, DFineDetector, HFCLIP, OpenCLIP, TimmViT, WeightRef
from vision_ft.errors import ConfigError

X = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class _TestBackbone(Backbone):
    """Common parts of the test-only stand-ins."""

    paths: dict[str, str]
    block_names: list[str]

    @property
    def blocks(self) -> list[nn.Module]:
        return [self.model.get_submodule(n) for n in self.block_names]

    @property
    def embed_dim(self) -> int:
        return self.width

    def module_name(self, block: int, role: str) -> str:
        if role not in self.paths:
            raise ConfigError(f"{type(self).__name__} has no role {role!r} (roles: {' '.join(self.paths)})")
        return f"{self.block_names[block]}.{self.paths[role]}"

    def weight_ref(self, block: int, role: str) -> WeightRef:
        return WeightRef(self.module_name(block, role))

    def stem(self) -> nn.Module:
        raise ConfigError(f"{type(self).__name__} has no patch-embedding stem")

    def spec(self) -> dict[str, Any]:
        return {"class_path": f"{__name__}.{type(self).__name__}", "init_args": {}}


class TinyUNet(_TestBackbone):
    """diffusers ``UNet2DConditionModel``: every ``BasicTransformerBlock``'s self-attention
    (``attn1.to_q/to_k/to_v/to_out.0``) and feed-forward."""

    paths = {"q": "attn1.to_q", "k": "attn1.to_k", "v": "attn1.to_v", "proj": "attn1.to_out.0",
             "fc1": "ff.net.0.proj", "fc2": "ff.net.2"}

    def __init__(self) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention import BasicTransformerBlock

        torch.manual_seed(0)
        self.model = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
            attention_head_dim=8, norm_num_groups=8).eval()
        self.width = 32
        self.block_names = [n for n, m in self.model.named_modules() if isinstance(m, BasicTransformerBlock)]

    def weight_ref(self, block: int, role: str) -> WeightRef:
        if role == "qkv":
            raise ConfigError("diffusers attention has separate to_q / to_k / to_v; target q, k, v")
        return super().weight_ref(block, role)

    def norms(self, block: int) -> dict[str, nn.Module]:
        b = self.blocks[block]
        return {"norm1": b.norm1, "norm2": b.norm3}

    def stem(self) -> nn.Module:
        return self.model.conv_in

    def final_norm(self) -> nn.Module:
        return self.model.conv_norm_out


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
_TEXT = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))

#: family -> (build, forward): ``forward(backbone)`` is a deterministic output tensor in eval mode
FAMILIES: dict[str, tuple[Callable[[], Backbone], Callable[[Backbone], torch.Tensor]]] = {
    "timm": (lambda: TimmViT("vit_test_tiny"), lambda b: b(b.preprocess(X))),
    "open_clip": (lambda: OpenCLIP("open_clip_test_tiny"), _clip_forward),
    "hf_clip": (lambda: HFCLIP("hf_clip_test_tiny"), _clip_forward),
    "dfine": (lambda: DFineDetector("dfine_test_tiny", num_labels=2), _dfine_forward),
    "llama": (lambda: CausalLM("llama_test_tiny"), lambda b: b.model(input_ids=_TOKENS).logits),
    "phi3": (lambda: CausalLM("phi3_test_tiny"), lambda b: b.model(input_ids=_TOKENS).logits),
    "unet": (TinyUNet, lambda b: b.model(_LATENTS, torch.tensor([500]), encoder_hidden_states=_TEXT).sample),
}
