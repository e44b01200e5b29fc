"""Stable Diffusion (diffusers) behind the :class:`~vision_ft.backbones.base.Backbone` surface.

:class:`StableDiffusion` holds the parts of a Stable Diffusion 1.x / 2.x pipeline: the denoiser
``UNet2DConditionModel`` as ``self.model`` (the part methods adapt, untouched in type), and, frozen beside
it, the ``AutoencoderKL`` (``self.vae``), the CLIP text encoder and tokenizer and the training noise
scheduler (DDPM, with the checkpoint's ``prediction_type``: epsilon or v).

Blocks are the UNet's ``BasicTransformerBlock`` s (down, mid, up order). Roles in a block: ``q k v proj``
are the self-attention's ``attn1.to_q/to_k/to_v/to_out.0``, ``cross_q cross_k cross_v cross_proj`` the
cross-attention's ``attn2.*`` (keys and values read the text embeddings), ``fc1`` / ``fc2`` the
feed-forward's ``ff.net.0.proj`` (GEGLU: value and gate rows) and ``ff.net.2``. There is no fused ``qkv``.
LoRA's default targets here are the diffusers convention: ``to_q, to_k, to_v, to_out.0`` of both attentions.

Loading (never a download unless asked): ``checkpoint`` = a local pipeline folder (``model_index.json`` with
``unet/ vae/ text_encoder/ tokenizer/ scheduler/``, what ``StableDiffusionPipeline.save_pretrained`` writes),
``pretrained: true`` = the hub id ``name`` through diffusers/transformers ``from_pretrained`` (hub access or
cache), otherwise the tiny preset ``sd_test_tiny`` built in memory (random, seeded; CLIP's BPE tokenizer
from open_clip's bundled vocabulary). Export (:meth:`save_native`) writes a pipeline folder that
``StableDiffusionPipeline.from_pretrained`` loads alone; :meth:`save_lora` writes
``pytorch_lora_weights.safetensors`` that ``StableDiffusionPipeline.load_lora_weights`` loads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ._diffusers import build_parts, check_pipeline_folder, load_error
from .base import Backbone, WeightRef

log = logging.getLogger("vision_ft")

#: role -> module path inside a BasicTransformerBlock
_PATHS = {"q": "attn1.to_q", "k": "attn1.to_k", "v": "attn1.to_v", "proj": "attn1.to_out.0",
          "cross_q": "attn2.to_q", "cross_k": "attn2.to_k", "cross_v": "attn2.to_v", "cross_proj": "attn2.to_out.0",
          "fc1": "ff.net.0.proj", "fc2": "ff.net.2"}
_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

#: tiny architecture for tests and the offline sample: 32 px images, 8 x 8 x 4 latents, text width 32
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "sd_test_tiny": {
        "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                     attention_head_dim=8, norm_num_groups=8),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                    layers_per_block=1, norm_num_groups=8, sample_size=32),
        "text": dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                     pad_token_id=49407),
        "scheduler": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="epsilon", clip_sample=False, steps_offset=1),
    },
}
#: a mid-size UNet for ``bench diffusion`` (SD 1.x block layout at reduced widths; tiny VAE, narrow text tower)
TINY_PRESETS["sd_bench_mid"] = {
    "unet": dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(128, 256, 384),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=256,
                 attention_head_dim=8, norm_num_groups=32),
    "vae": TINY_PRESETS["sd_test_tiny"]["vae"],
    "text": {**TINY_PRESETS["sd_test_tiny"]["text"], "hidden_size": 256, "intermediate_size": 512,
             "num_attention_heads": 4, "num_hidden_layers": 1},
    "scheduler": TINY_PRESETS["sd_test_tiny"]["scheduler"],
}
#: random-init architectures of released checkpoints (``methods --backbone``: counts need no download)
KNOWN_UNETS: dict[str, dict[str, Any]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": dict(cross_attention_dim=768, sample_size=64),
    "runwayml/stable-diffusion-v1-5": dict(cross_attention_dim=768, sample_size=64),
    "stabilityai/stable-diffusion-2-1-base": dict(cross_attention_dim=1024, sample_size=64,
                                                  attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
}


def is_sd_name(name: str) -> bool:
    return name in TINY_PRESETS or name in KNOWN_UNETS


class StableDiffusion(Backbone):
    """A Stable Diffusion 1.x / 2.x pipeline; methods adapt the UNet.

    Args:
        name: hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-2-1-base``)
            or the tiny preset ``sd_test_tiny``.
        pretrained: load ``name`` from the hub with ``from_pretrained`` (needs hub access or the cache).
        checkpoint: a local pipeline folder (``save_pretrained`` layout); takes precedence.
        attention: which attentions LoRA adapts by default: ``self`` (``attn1``), ``cross`` (``attn2``).
        image_size: training / sampling resolution in pixels (default: the UNet's ``sample_size`` times the
            VAE's down-sampling factor).
        grad_checkpointing: activation checkpointing of the UNet.
        init_seed: seed of the tiny preset's random initialisation (rebuilt identically to load an adapter).
    """

    def __init__(self, name: str = "sd_test_tiny", pretrained: bool = False, checkpoint: str | None = None,
                 attention: list[str] = ["self", "cross"],  # noqa: B006 - jsonargparse needs a plain list default
                 image_size: int | None = None, grad_checkpointing: bool = False, init_seed: int = 0) -> None:
        super().__init__()
        bad = [a for a in attention if a not in ("self", "cross")]
        if bad or not attention:
            raise ConfigError(f"backbone.init_args.attention={attention!r}: choose from ['self', 'cross']")
        self.name, self.pretrained, self.checkpoint = name, bool(pretrained), checkpoint
        self.attention, self.grad_checkpointing, self.init_seed = list(attention), grad_checkpointing, init_seed
        unet, vae, text_encoder, tokenizer, scheduler = self._build()
        self.model = unet
        self.vae, self.text_encoder = vae.eval(), text_encoder.eval()
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.tokenizer, self.scheduler = tokenizer, scheduler
        if grad_checkpointing:
            self.model.enable_gradient_checkpointing()
        from diffusers.models.attention import BasicTransformerBlock

        self._block_names = [n for n, m in self.model.named_modules() if isinstance(m, BasicTransformerBlock)]
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.vae_factor = factor
        self.image_size = int(image_size or self.model.config.sample_size * factor)
        if self.image_size % factor:
            raise ConfigError(f"backbone.init_args.image_size={image_size} must be a multiple of the VAE's "
                              f"down-sampling factor {factor}")

    # --- loading ----------------------------------------------------------------------------------
    def _build(self) -> tuple[nn.Module, nn.Module, nn.Module, Any, Any]:
        def known() -> Any:
            if self.name not in KNOWN_UNETS:
                return None
            self.weights_source = "randomly initialised (architecture only)"
            return self._known(self.name)

        return build_parts(self, "Stable Diffusion", TINY_PRESETS, self._load, self._tiny,
                           "stable-diffusion-v1-5/stable-diffusion-v1-5", fallback=known,
                           also=f" nor a known architecture ({list(KNOWN_UNETS)})")

    def _load(self, source: str, key: str):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        check_pipeline_folder(source, key, "StableDiffusionPipeline")
        try:
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
            text = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
            scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
        except Exception as e:  # noqa: BLE001 - offline, missing parts, wrong id: one clear error
            raise load_error("Stable Diffusion", source, e) from None
        return unet, vae, text, tokenizer, scheduler

    def _tiny(self, cfg: dict[str, Any]):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from .hf_clip_presets import clip_bpe_tokenizer

        torch.manual_seed(self.init_seed)
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
        return unet, vae, text, clip_bpe_tokenizer(77), DDPMScheduler(**cfg["scheduler"])

    def _known(self, name: str):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from .hf_clip_presets import clip_bpe_tokenizer

        torch.manual_seed(self.init_seed)
        unet = UNet2DConditionModel(**KNOWN_UNETS[name])
        width = unet.config.cross_attention_dim
        text = CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=1,
                                            num_attention_heads=max(1, width // 64)))
        vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), latent_channels=4, norm_num_groups=32,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        return unet, vae, text, clip_bpe_tokenizer(77), DDPMScheduler(**TINY_PRESETS["sd_test_tiny"]["scheduler"])

    # --- structure --------------------------------------------------------------------------------
    @property
    def blocks(self) -> list[nn.Module]:
        return [self.model.get_submodule(n) for n in self._block_names]

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.block_out_channels[0])

    def block_width(self, block: int) -> int:
        return int(self.blocks[block].norm1.normalized_shape[0])

    def module_name(self, block: int, role: str) -> str:
        if role == "qkv":
            raise ConfigError("diffusers attention has separate to_q / to_k / to_v and no fused qkv; target q, k, v "
                              "(and cross_q, cross_k, cross_v for the cross-attention) "
                              "(model.init_args.method.init_args.targets)")
        if role not in _PATHS:
            raise ConfigError(f"Stable Diffusion blocks have no role {role!r} (roles: {' '.join(_PATHS)})")
        return f"{self._block_names[block]}.{_PATHS[role]}"

    def weight_ref(self, block: int, role: str) -> WeightRef:
        return WeightRef(self.module_name(block, role))

    @property
    def default_lora_targets(self) -> list[str]:
        """The diffusers training scripts' LoRA targets: ``to_q, to_k, to_v, to_out.0`` of the attentions
        named in ``attention``."""
        roles = []
        if "self" in self.attention:
            roles += ["q", "k", "v", "proj"]
        if "cross" in self.attention:
            roles += ["cross_q", "cross_k", "cross_v", "cross_proj"]
        return roles

    def norms(self, block: int) -> dict[str, nn.Module]:
        b = self.blocks[block]
        return {"norm1": b.norm1, "norm2": b.norm3}

    def stem(self) -> nn.Module:
        return self.model.conv_in

    def final_norm(self) -> nn.Module:
        return self.model.conv_norm_out

    # --- compute ----------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the VAE's input range [-1, 1] at :attr:`image_size`."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = nn.functional.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                               align_corners=False, antialias=True)
        return images * 2.0 - 1.0

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, sample: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] -> scaled latents (a draw from the VAE posterior, or its mean)."""
        x = self.preprocess(images).to(dtype=next(self.vae.parameters()).dtype)
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Captions -> the text encoder's last hidden states (B, L, D), the UNet's ``encoder_hidden_states``."""
        ids = self.tokenize(captions).to(next(self.text_encoder.parameters()).device)
        return self.text_encoder(ids)[0]

    def denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.model(latents, timesteps, encoder_hidden_states=text).sample

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise ConfigError("Stable Diffusion is a generator with no image features; use "
                          "vision_ft.tasks.TextToImageTask (model.class_path)")

    def pipeline(self, scheduler: Any | None = None):
        """A ``StableDiffusionPipeline`` sharing these modules (no copy; safety checker off)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        sched = scheduler or DDIMScheduler.from_config(self.scheduler.config)
        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.model, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # --- identity and export -----------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "init_args": {"name": self.name, "pretrained": self.pretrained, "checkpoint": self.checkpoint,
                              "attention": list(self.attention), "image_size": self.image_size,
                              "grad_checkpointing": self.grad_checkpointing, "init_seed": self.init_seed}}

    def save_native(self, out_dir: str | Path) -> Path:
        """A pipeline folder (``model_index.json`` + parts) that ``StableDiffusionPipeline.from_pretrained`` loads;
        the training (DDPM) scheduler is saved, swap it at inference as usual."""
        out = Path(out_dir)
        self.pipeline(scheduler=self.scheduler).save_pretrained(str(out), safe_serialization=True)
        return out

    def save_lora(self, out_dir: str | Path, layers: dict[str, torch.Tensor]) -> Path:
        """``pytorch_lora_weights.safetensors`` in diffusers' layout (``unet.<module>.lora.down/up.weight``) from
        :meth:`~vision_ft.methods.Method.lora_layers`; ``StableDiffusionPipeline.load_lora_weights(out_dir)``
        loads it (scaling already folded into ``lora_B``, so the file's alpha is its rank)."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        ranks = {k.rsplit(".lora_A", 1)[0]: v.shape[0] for k, v in layers.items() if ".lora_A." in k}
        if not ranks:
            raise ConfigError("no LoRA factors to write")
        r = max(ranks.values())
        metadata = {"r": r, "lora_alpha": r, "target_modules": sorted(ranks),
                    "rank_pattern": {k: v for k, v in ranks.items() if v != r},
                    "alpha_pattern": {k: v for k, v in ranks.items() if v != r}}
        state = convert_state_dict_to_diffusers({k: v.detach().float().contiguous() for k, v in layers.items()})
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=state, safe_serialization=True,
                                                  unet_lora_adapter_metadata=metadata)
        return out / "pytorch_lora_weights.safetensors"
