"""CogVideoX (diffusers) behind the :class:`~vision_ft.backbones.base.Backbone` surface, beside Wan 2.1.

:class:`CogVideoX` holds a CogVideoX 1.0 text-to-video pipeline: ``CogVideoXTransformer3DModel`` as
``self.model`` (what methods adapt) and, frozen beside it, ``AutoencoderKLCogVideoX``, the T5 text encoder and
tokenizer, and the checkpoint's ``CogVideoXDDIMScheduler`` (CogVideoX-2b: v-prediction, zero terminal SNR,
trailing timesteps).

Family facts handled here (the task and TIC-FT stay generic):

- latent layout ``[B, F, C, H, W]``: the frame axis is :attr:`frame_dim` = 1; ``4k + 1`` pixel frames give
  ``k + 1`` latents (ConfigError otherwise); latents are the VAE posterior times its ``scaling_factor``;
- DDPM noising ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``. A noise level is the timestep's fraction
  ``(t + 1) / T`` (1 = pure noise at zero terminal SNR), the axis the paper's CogVideoX setting uses: TIC-FT's
  default buffer levels 0.25, 0.5, 0.75 are its ``t = 249, 499, 749``, and a buffer at ``min(level, tau_k)`` is
  noised by the scheduler's ``add_noise`` at that timestep. (Flow matching's ``sigma`` is likewise its timestep
  over 1000, so one ``tau`` marks the same place on both schedules.) Training draws ``t`` uniformly; the
  transformer gets the target's ``t``;
- the loss of diffusers' CogVideoX LoRA recipe: the v-prediction turned into ``x_0`` with the scheduler's
  ``get_velocity(model_output, x_t, t)``, MSE to ``x_0`` weighted by ``1 / (1 - a_t)``;
- sampling with DDIM: a DDIM step with a zero prediction is not the identity, so frames a sampler holds
  (TIC-FT's condition and buffers) are re-injected after every step.

Blocks are ``CogVideoXBlock`` s: ``q k v proj`` = the joint text-video attention ``attn1.to_q/to_k/to_v/to_out.0``,
``fc1`` / ``fc2`` = ``ff.net.0.proj`` / ``ff.net.2``; LoRA's default targets: ``to_q, to_k, to_v, to_out.0``
(diffusers' CogVideoX LoRA script and TIC-FT). CogVideoX 1.5 (``patch_size_t``) is refused.

Loading: ``checkpoint`` = a local pipeline folder (``CogVideoXPipeline.save_pretrained``), ``pretrained: true``
= the hub id ``name`` (``THUDM/CogVideoX-2b``), otherwise the tiny random preset ``cogvideox_test_tiny``.
:meth:`save_lora` writes a file ``CogVideoXPipeline.load_lora_weights`` loads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ._diffusers import build_parts, check_pipeline_folder, frame_size, load_error
from .base import Backbone, WeightRef
from .video_diffusion import latent_frame_count, video_to_vae_input, write_lora_file

_PATHS = {"q": "attn1.to_q", "k": "attn1.to_k", "v": "attn1.to_v", "proj": "attn1.to_out.0",
          "fc1": "ff.net.0.proj", "fc2": "ff.net.2"}
#: the CogVideoX-2b scheduler's settings (its hub scheduler_config.json)
_DDIM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
             timestep_spacing="trailing", rescale_betas_zero_snr=True, snr_shift_scale=3.0)
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "cogvideox_test_tiny": {
        "transformer": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                            time_embed_dim=8, text_embed_dim=32, num_layers=2, sample_width=4, sample_height=4,
                            sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16),
        "vae": dict(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                    up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
                    layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4),
        "text": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
        "size": 32,
    },
}
HUB_IDS = ("THUDM/CogVideoX-2b",)


class CogVideoX(Backbone):
    """A CogVideoX 1.0 text-to-video pipeline; methods adapt the transformer.

    Args:
        name: hub id (``THUDM/CogVideoX-2b``) or the tiny preset ``cogvideox_test_tiny``.
        pretrained: load ``name`` from the hub (needs hub access or the cache).
        checkpoint: a local pipeline folder (``save_pretrained`` layout); takes precedence.
        height, width: resolution in pixels (default: the preset's, 480 x 720 for hub checkpoints).
        grad_checkpointing: activation checkpointing of the transformer blocks.
        init_seed: seed of the tiny preset's random initialisation.
    """

    #: latent layout [B, F, C, H, W]
    frame_dim = 1

    def __init__(self, name: str = "cogvideox_test_tiny", pretrained: bool = False, checkpoint: str | None = None,
                 height: int | None = None, width: int | None = None, grad_checkpointing: bool = False,
                 init_seed: int = 0) -> None:
        super().__init__()
        self.name, self.pretrained, self.checkpoint = name, bool(pretrained), checkpoint
        self.grad_checkpointing, self.init_seed = grad_checkpointing, init_seed
        transformer, vae, text, tokenizer, scheduler, size = self._build()
        if transformer.config.patch_size_t is not None:
            raise ConfigError("CogVideoX 1.5 (temporal patches, patch_size_t) is not supported yet; use CogVideoX 1.0 "
                              f"({HUB_IDS[0]}) (backbone.init_args.name)")
        self.model = transformer
        self.vae, self.text_encoder = vae.eval(), text.eval()
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.tokenizer, self.scheduler = tokenizer, scheduler
        if grad_checkpointing:
            self.model.enable_gradient_checkpointing()
        from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

        self._block_names = [n for n, m in self.model.named_modules() if isinstance(m, CogVideoXBlock)]
        self.temporal_factor = int(self.vae.config.temporal_compression_ratio)
        self.spatial_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.max_sequence_length = int(self.model.config.max_text_seq_length)
        multiple = self.spatial_factor * int(self.model.config.patch_size)
        self.height, self.width = frame_size(height or size[0], width or size[1], multiple, self.spatial_factor)

    # --- loading ----------------------------------------------------------------------------------
    def _build(self):
        return build_parts(self, "CogVideoX", TINY_PRESETS, self._load, self._tiny, HUB_IDS[0])

    def _load(self, source: str, key: str):
        from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
        from transformers import AutoTokenizer, T5EncoderModel

        check_pipeline_folder(source, key, "CogVideoXPipeline")
        try:
            transformer = CogVideoXTransformer3DModel.from_pretrained(source, subfolder="transformer")
            vae = AutoencoderKLCogVideoX.from_pretrained(source, subfolder="vae")
            text = T5EncoderModel.from_pretrained(source, subfolder="text_encoder")
            tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
            scheduler = CogVideoXDDIMScheduler.from_pretrained(source, subfolder="scheduler")
        except Exception as e:  # noqa: BLE001 - offline, missing parts, wrong id: one clear error
            raise load_error("CogVideoX", source, e) from None
        return transformer, vae, text, tokenizer, scheduler, (480, 720)

    def _tiny(self, cfg: dict[str, Any]):
        from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
        from transformers import T5Config, T5EncoderModel

        from .causal_lm_presets import tiny_tokenizer

        tokenizer = tiny_tokenizer("chatml")
        torch.manual_seed(self.init_seed)
        transformer = CogVideoXTransformer3DModel(**cfg["transformer"])
        vae = AutoencoderKLCogVideoX(**cfg["vae"])
        text = T5EncoderModel(T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **cfg["text"]))
        return transformer, vae, text, tokenizer, CogVideoXDDIMScheduler(**_DDIM), (cfg["size"], cfg["size"])

    # --- structure --------------------------------------------------------------------------------
    @property
    def blocks(self) -> list[nn.Module]:
        return [self.model.get_submodule(n) for n in self._block_names]

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.num_attention_heads * self.model.config.attention_head_dim)

    def module_name(self, block: int, role: str) -> str:
        if role == "qkv":
            raise ConfigError("CogVideoX attention has separate to_q / to_k / to_v and no fused qkv; target q, k, v "
                              "(model.init_args.method.init_args.targets)")
        if role not in _PATHS:
            raise ConfigError(f"CogVideoX blocks have no role {role!r} (roles: {' '.join(_PATHS)}; text and video "
                              "tokens share one attention, there is no cross-attention)")
        return f"{self._block_names[block]}.{_PATHS[role]}"

    def weight_ref(self, block: int, role: str) -> WeightRef:
        return WeightRef(self.module_name(block, role))

    @property
    def default_lora_targets(self) -> list[str]:
        return ["q", "k", "v", "proj"]

    def norms(self, block: int) -> dict[str, nn.Module]:
        raise ConfigError("CogVideoX's block norms are adaptive (LayerNormZero: one norm applied to the text and "
                          "the video tokens separately, with timestep-dependent gates), so methods placed after a "
                          "block norm (ssf, adaptformer, mosa) do not apply; use lora (or another method on the "
                          "attention / feed-forward linears) (model.init_args.method)")

    def stem(self) -> nn.Module:
        return self.model.patch_embed.proj

    def final_norm(self) -> nn.Module:
        return self.model.norm_final

    # --- frames and latents -------------------------------------------------------------------------
    def latent_frames(self, pixel_frames: int, key: str = "frames") -> int:
        return latent_frame_count(pixel_frames, self.temporal_factor, key)

    def pixel_frames(self, latent_frames: int) -> int:
        return (int(latent_frames) - 1) * self.temporal_factor + 1

    def latent_shape(self, latent_frames: int) -> tuple[int, int, int, int]:
        """(F, C, H, W) of one sample's latents."""
        return (int(latent_frames), int(self.model.config.in_channels), self.height // self.spatial_factor,
                self.width // self.spatial_factor)

    def preprocess_video(self, frames: torch.Tensor) -> torch.Tensor:
        return video_to_vae_input(frames, self.height, self.width)

    @torch.no_grad()
    def posterior(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames (B, 4k + 1, 3, H, W) -> the VAE posterior's mean and std (B, C, k + 1, h, w), raw."""
        self.latent_frames(frames.shape[1], "video frames")
        x = self.preprocess_video(frames).to(dtype=next(self.vae.parameters()).dtype)
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.std

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (B, C, F, h, w) -> the transformer's (B, F, C, h, w) times the VAE's scaling factor."""
        return z.permute(0, 2, 1, 3, 4) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor, sample: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        mean, std = self.posterior(frames)
        if not sample:
            return self.normalise(mean)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.normalise(mean + std * eps)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, F, C, h, w) -> frames (B, 4(F - 1) + 1, 3, height, width) in [0, 1]."""
        z = latents.permute(0, 2, 1, 3, 4).to(next(self.vae.parameters()).dtype) / self.vae.config.scaling_factor
        video = self.vae.decode(z).sample
        return ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.text_encoder.parameters()).device
        embeds, _ = self.pipeline().encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                  max_sequence_length=self.max_sequence_length, device=device)
        return embeds

    # --- DDPM levels ------------------------------------------------------------------------------
    def _steps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def level_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The level of a training timestep: ``(t + 1) / T``."""
        return (timesteps.float() + 1) / self._steps()

    def timesteps(self, levels: torch.Tensor) -> torch.Tensor:
        """The training timestep of a level: ``round(level T) - 1`` (``t = 249`` at 0.25)."""
        return ((levels.float() * self._steps()).round().long() - 1).clamp(0, self._steps() - 1)

    def _alphas(self, levels: torch.Tensor) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(levels.device)[self.timesteps(levels)]

    def train_levels(self, n: int, device: torch.device, logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
        """Levels of ``n`` timesteps drawn uniformly (diffusers' CogVideoX recipe; the logit arguments are Wan's)."""
        return self.level_of(torch.randint(0, self._steps(), (n,), device=device))

    def val_levels(self, count: int) -> list[float]:
        return [float(self.level_of(torch.tensor(int((k + 0.5) * self._steps() / count)))) for k in range(count)]

    def loss_weights(self, levels: torch.Tensor) -> torch.Tensor:
        """``1 / (1 - a_t)`` of diffusers' CogVideoX recipe."""
        return 1.0 / (1.0 - self._alphas(levels).float()).clamp(min=1e-4)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, frame_levels: torch.Tensor) -> torch.Tensor:
        """The scheduler's ``sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` with a timestep per sample and frame (from
        ``frame_levels`` (B, F)); level 0 is ``x_0`` bit for bit."""
        shape = (latents.shape[0], latents.shape[1], 1, 1, 1)
        alphas = self._alphas(frame_levels.reshape(-1)).to(latents.dtype).view(shape)
        mixed = alphas.sqrt() * latents + (1 - alphas).sqrt() * noise
        return torch.where(frame_levels.view(shape) == 0, latents, mixed)

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_0`` (the prediction is turned into ``x_0`` by :meth:`denoise`)."""
        return latents

    def _rotary(self, frames: int, device: torch.device):
        if not self.model.config.use_rotary_positional_embeddings:
            return None
        return self.pipeline()._prepare_rotary_positional_embeddings(self.height, self.width, frames, device)

    def _forward(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.model(hidden_states=latents, encoder_hidden_states=text.to(latents.dtype), timestep=timesteps,
                          image_rotary_emb=self._rotary(latents.shape[1], latents.device), return_dict=False)[0]

    def denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The ``x_0`` prediction: the v-prediction through the scheduler's ``get_velocity(v, x_t, t)``."""
        v = self._forward(latents, timesteps, text)
        return self.scheduler.get_velocity(v, latents, timesteps)

    @torch.no_grad()
    def sample(self, latents: torch.Tensor, text: torch.Tensor, steps: int, negative_text: torch.Tensor | None = None,
               guidance_scale: float = 1.0, keep: Callable[[float], torch.Tensor | None] | None = None) -> torch.Tensor:
        """DDIM sampling as ``CogVideoXPipeline`` does (no dynamic guidance); frames ``keep(level)`` marks at a
        step are re-injected after it (a DDIM step with a zero prediction would move them)."""
        from diffusers import CogVideoXDDIMScheduler

        sched = CogVideoXDDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps, device=latents.device)
        latents = latents * sched.init_noise_sigma
        dtype = self.model.dtype
        for t in sched.timesteps:
            ts = t.expand(latents.shape[0])
            v = self._forward(latents.to(dtype), ts, text.to(dtype)).float()
            if negative_text is not None and guidance_scale != 1.0:
                u = self._forward(latents.to(dtype), ts, negative_text.to(dtype)).float()
                v = u + guidance_scale * (v - u)
            new = sched.step(v, t, latents, return_dict=False)[0]
            mask = keep(float(self.level_of(t))) if keep is not None else None
            if mask is not None and bool(mask.any()):
                held = mask.to(new.device).view(1, -1, 1, 1, 1)
                new = torch.where(held, latents, new)
            latents = new.to(text.dtype)
        return latents

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise ConfigError("CogVideoX is a video generator with no image features; use "
                          "vision_ft.tasks.VideoDiffusionTask (model.class_path)")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        raise ConfigError("CogVideoX takes videos: use preprocess_video / encode_video (frames (B, F, 3, H, W))")

    def pipeline(self, scheduler: Any | None = None):
        """A ``CogVideoXPipeline`` sharing these modules (no copy)."""
        from diffusers import CogVideoXPipeline

        pipe = CogVideoXPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                                 transformer=self.model, scheduler=scheduler or self.scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # --- identity and export -----------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "init_args": {"name": self.name, "pretrained": self.pretrained, "checkpoint": self.checkpoint,
                              "height": self.height, "width": self.width,
                              "grad_checkpointing": self.grad_checkpointing, "init_seed": self.init_seed}}

    def save_native(self, out_dir: str | Path) -> Path:
        """A pipeline folder that ``CogVideoXPipeline.from_pretrained`` loads."""
        out = Path(out_dir)
        self.pipeline().save_pretrained(str(out), safe_serialization=True)
        return out

    def save_lora(self, out_dir: str | Path, layers: dict[str, torch.Tensor]) -> Path:
        """``pytorch_lora_weights.safetensors`` that ``CogVideoXPipeline.load_lora_weights(out_dir)`` loads."""
        from diffusers import CogVideoXPipeline

        return write_lora_file(CogVideoXPipeline, out_dir, layers)
