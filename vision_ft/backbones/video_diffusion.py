"""Text-to-video diffusion (diffusers) behind the :class:`~vision_ft.backbones.base.Backbone` surface: Wan 2.1.

:class:`WanVideo` holds the parts of a Wan 2.1 text-to-video pipeline: the denoiser
``WanTransformer3DModel`` as ``self.model`` (the part methods adapt, untouched in type) and, frozen beside it,
the video VAE ``AutoencoderKLWan`` (``self.vae``), the UMT5 text encoder and its tokenizer, and a
flow-matching Euler scheduler (``FlowMatchEulerDiscreteScheduler``, the checkpoint's shift).

Family facts handled here, so tasks and methods stay generic:

- latent layout ``[B, C, F, H, W]``: the frame axis is :attr:`frame_dim` = 2;
- the VAE compresses time by 4 with a causal first frame: ``4k + 1`` pixel frames give ``k + 1`` latent
  frames (:meth:`latent_frames` refuses any other count with a ConfigError) and 8x in space;
- latent normalisation: the VAE's posterior ``z`` is normalised per channel with the VAE config's
  ``latents_mean`` / ``latents_std`` (``(z - mean) / std``), the inverse of what ``WanPipeline`` applies
  before decoding;
- flow matching (Lipman et al. 2023, arXiv 2210.02747; rectified flow): ``x_s = (1 - s) x_0 + s eps`` at
  noise level ``s`` in [0, 1], the transformer is given the timestep ``1000 s`` and predicts the velocity
  ``eps - x_0``; one Euler step is ``x <- x + (s_next - s) v``, so a zero velocity leaves a frame unchanged.

Blocks are the transformer's ``WanTransformerBlock`` s. Roles: ``q k v proj`` = self-attention
``attn1.to_q/to_k/to_v/to_out.0``, ``cross_q cross_k cross_v cross_proj`` = cross-attention ``attn2.*`` (keys
and values read the text), ``fc1`` / ``fc2`` = ``ffn.net.0.proj`` / ``ffn.net.2``. LoRA's default targets are
``to_q, to_k, to_v, to_out.0`` of both attentions (the TIC-FT / finetrainers recipe).

Loading (never a download unless asked): ``checkpoint`` = a local pipeline folder (``model_index.json`` with
``transformer/ vae/ text_encoder/ tokenizer/ scheduler/``, what ``WanPipeline.save_pretrained`` writes),
``pretrained: true`` = the hub id ``name`` (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``), otherwise the tiny random
preset ``wan_test_tiny`` (tokenizer trained offline). :meth:`save_native` writes a folder
``WanPipeline.from_pretrained`` loads; :meth:`save_lora` writes ``pytorch_lora_weights.safetensors`` that
``WanPipeline.load_lora_weights`` loads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ._diffusers import build_parts, check_pipeline_folder, frame_size, load_error
from .base import Backbone, WeightRef

log = logging.getLogger("vision_ft")

#: role -> module path inside a WanTransformerBlock
_PATHS = {"q": "attn1.to_q", "k": "attn1.to_k", "v": "attn1.to_v", "proj": "attn1.to_out.0",
          "cross_q": "attn2.to_q", "cross_k": "attn2.to_k", "cross_v": "attn2.to_v", "cross_proj": "attn2.to_out.0",
          "fc1": "ffn.net.0.proj", "fc2": "ffn.net.2"}

#: tiny random architectures for tests and the offline sample: 32 x 32 px, 16 latent channels, text width 32
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "wan_test_tiny": {
        "transformer": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                            out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                            qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        "vae": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                    temperal_downsample=[False, True, True]),
        "text": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
        "scheduler": dict(num_train_timesteps=1000, shift=3.0),
        "size": 32,
    },
}
#: a mid-size random transformer for ``bench diffusion`` video rows (tiny VAE and text tower)
TINY_PRESETS["wan_bench_mid"] = {
    **TINY_PRESETS["wan_test_tiny"],
    "transformer": dict(TINY_PRESETS["wan_test_tiny"]["transformer"], num_attention_heads=4, attention_head_dim=64,
                        ffn_dim=1024, num_layers=8),
    "size": 64,
}
#: released checkpoints (``pretrained: true`` or their local pipeline folder)
HUB_IDS = ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers")


def latent_frame_count(pixel_frames: int, temporal_factor: int = 4, key: str = "frames") -> int:
    """``4k + 1`` pixel frames -> ``k + 1`` latent frames; any other count is refused."""
    n = int(pixel_frames)
    if n < 1 or (n - 1) % temporal_factor:
        below = max(1, (n - 1) // temporal_factor * temporal_factor + 1)
        raise ConfigError(f"{key}={n}: the video VAE needs {temporal_factor}k + 1 pixel frames (1, 5, 9, 13, ...; "
                          f"e.g. {below} or {below + temporal_factor})")
    return (n - 1) // temporal_factor + 1


def video_to_vae_input(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Frames (B, F, 3, H, W) in [0, 1] -> a video VAE's input (B, 3, F, height, width) in [-1, 1]."""
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ConfigError(f"video frames must be (B, F, 3, H, W) in [0, 1], got {tuple(frames.shape)}")
    b, f = frames.shape[:2]
    x = frames.reshape(b * f, *frames.shape[2:])
    if x.shape[-2:] != (height, width):
        x = nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return (x * 2.0 - 1.0).reshape(b, f, 3, height, width).permute(0, 2, 1, 3, 4)


def write_lora_file(pipeline_cls: Any, out_dir: str | Path, layers: dict[str, torch.Tensor]) -> Path:
    """``pytorch_lora_weights.safetensors`` for ``pipeline_cls.load_lora_weights`` from
    :meth:`~vision_ft.methods.Method.lora_layers` (keys ``transformer.<module>.lora_A/B.weight``; scaling
    folded into ``lora_B``, so the file's alpha is its rank)."""
    ranks = {k.rsplit(".lora_A", 1)[0]: v.shape[0] for k, v in layers.items() if ".lora_A." in k}
    if not ranks:
        raise ConfigError("no LoRA factors to write")
    r = max(ranks.values())
    metadata = {"r": r, "lora_alpha": r, "target_modules": sorted(ranks),
                "rank_pattern": {k: v for k, v in ranks.items() if v != r},
                "alpha_pattern": {k: v for k, v in ranks.items() if v != r}}
    state = {k: v.detach().float().contiguous() for k, v in layers.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(str(out), transformer_lora_layers=state, safe_serialization=True,
                                   transformer_lora_adapter_metadata=metadata)
    return out / "pytorch_lora_weights.safetensors"


class WanVideo(Backbone):
    """A Wan 2.1 text-to-video pipeline; methods adapt the transformer.

    Args:
        name: hub id (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``) or the tiny preset ``wan_test_tiny``.
        pretrained: load ``name`` from the hub with ``from_pretrained`` (needs hub access or the cache).
        checkpoint: a local pipeline folder (``save_pretrained`` layout); takes precedence.
        attention: which attentions LoRA adapts by default: ``self`` (``attn1``), ``cross`` (``attn2``).
        height, width: training / sampling resolution in pixels (default: the preset's, 480 x 832 for hub
            checkpoints); multiples of the VAE's spatial factor times the patch size.
        flow_shift: the flow-matching shift of the sampler and of the training noise levels (default: the
            checkpoint scheduler's ``shift`` / ``flow_shift``).
        max_sequence_length: text tokens given to the transformer (Wan uses 512).
        grad_checkpointing: activation checkpointing of the transformer blocks.
        init_seed: seed of the tiny preset's random initialisation.
    """

    #: latent layout [B, C, F, H, W]
    frame_dim = 2

    def __init__(self, name: str = "wan_test_tiny", pretrained: bool = False, checkpoint: str | None = None,
                 attention: list[str] = ["self", "cross"],  # noqa: B006 - jsonargparse needs a plain list default
                 height: int | None = None, width: int | None = None, flow_shift: float | None = None,
                 max_sequence_length: int = 512, grad_checkpointing: bool = False, init_seed: int = 0) -> None:
        super().__init__()
        bad = [a for a in attention if a not in ("self", "cross")]
        if bad or not attention:
            raise ConfigError(f"backbone.init_args.attention={attention!r}: choose from ['self', 'cross']")
        if max_sequence_length < 1:
            raise ConfigError(f"backbone.init_args.max_sequence_length={max_sequence_length} must be >= 1")
        self.name, self.pretrained, self.checkpoint = name, bool(pretrained), checkpoint
        self.attention, self.grad_checkpointing, self.init_seed = list(attention), grad_checkpointing, init_seed
        self.max_sequence_length = int(max_sequence_length)
        transformer, vae, text_encoder, tokenizer, scheduler_config, size = self._build()
        self.model = transformer
        self.vae, self.text_encoder = vae.eval(), text_encoder.eval()
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.tokenizer = tokenizer
        from diffusers import FlowMatchEulerDiscreteScheduler

        shift = flow_shift if flow_shift is not None else scheduler_config.get("shift",
                                                                                scheduler_config.get("flow_shift", 1.0))
        if not shift or shift <= 0:
            raise ConfigError(f"backbone.init_args.flow_shift={shift} must be > 0")
        self.flow_shift = float(shift)
        self.scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)), shift=self.flow_shift)
        if grad_checkpointing:
            self.model.enable_gradient_checkpointing()
        from diffusers.models.transformers.transformer_wan import WanTransformerBlock

        self._block_names = [n for n, m in self.model.named_modules() if isinstance(m, WanTransformerBlock)]
        self.temporal_factor = int(self.vae.config.scale_factor_temporal)
        self.spatial_factor = int(self.vae.config.scale_factor_spatial)
        multiple = self.spatial_factor * int(self.model.config.patch_size[1])
        self.height, self.width = frame_size(height or size[0], width or size[1], multiple, self.spatial_factor)

    # --- loading ----------------------------------------------------------------------------------
    def _build(self):
        return build_parts(self, "Wan", TINY_PRESETS, self._load, self._tiny, HUB_IDS[0])

    def _load(self, source: str, key: str):
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        check_pipeline_folder(source, key, "WanPipeline")
        try:
            transformer = WanTransformer3DModel.from_pretrained(source, subfolder="transformer")
            vae = AutoencoderKLWan.from_pretrained(source, subfolder="vae")
            text = UMT5EncoderModel.from_pretrained(source, subfolder="text_encoder")
            tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
            from diffusers import FlowMatchEulerDiscreteScheduler

            config = dict(FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler"))
        except Exception as e:  # noqa: BLE001 - offline, missing parts, wrong id: one clear error
            raise load_error("Wan", source, e) from None
        return transformer, vae, text, tokenizer, config, (480, 832)

    def _tiny(self, cfg: dict[str, Any]):
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        from .causal_lm_presets import tiny_tokenizer

        tokenizer = tiny_tokenizer("chatml")
        torch.manual_seed(self.init_seed)
        transformer = WanTransformer3DModel(**cfg["transformer"])
        vae = AutoencoderKLWan(**cfg["vae"])
        text = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                           **cfg["text"]))
        return transformer, vae, text, tokenizer, dict(cfg["scheduler"]), (cfg["size"], cfg["size"])

    # --- structure --------------------------------------------------------------------------------
    @property
    def blocks(self) -> list[nn.Module]:
        return [self.model.get_submodule(n) for n in self._block_names]

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.num_attention_heads * self.model.config.attention_head_dim)

    def module_name(self, block: int, role: str) -> str:
        if role == "qkv":
            raise ConfigError("Wan attention has separate to_q / to_k / to_v and no fused qkv; target q, k, v "
                              "(and cross_q, cross_k, cross_v for the cross-attention) "
                              "(model.init_args.method.init_args.targets)")
        if role not in _PATHS:
            raise ConfigError(f"Wan blocks have no role {role!r} (roles: {' '.join(_PATHS)})")
        return f"{self._block_names[block]}.{_PATHS[role]}"

    def weight_ref(self, block: int, role: str) -> WeightRef:
        return WeightRef(self.module_name(block, role))

    @property
    def default_lora_targets(self) -> list[str]:
        """``to_q, to_k, to_v, to_out.0`` of the attentions named in ``attention`` (TIC-FT's targets)."""
        roles = []
        if "self" in self.attention:
            roles += ["q", "k", "v", "proj"]
        if "cross" in self.attention:
            roles += ["cross_q", "cross_k", "cross_v", "cross_proj"]
        return roles

    def norms(self, block: int) -> dict[str, nn.Module]:
        """The norms before the self-attention (``norm1``) and the feed-forward (``norm3``), the ViT block's
        ``norm1`` / ``norm2``; Wan's cross-attention norm sits between them."""
        b = self.blocks[block]
        return {"norm1": b.norm1, "norm2": b.norm3}

    def stem(self) -> nn.Module:
        return self.model.patch_embedding

    def final_norm(self) -> nn.Module:
        raise ConfigError("Wan's output norm has no affine weights to adapt (elementwise_affine=False)")

    # --- frames and latents -------------------------------------------------------------------------
    def latent_frames(self, pixel_frames: int, key: str = "frames") -> int:
        """Latent frames of a clip of ``pixel_frames`` frames (``4k + 1`` -> ``k + 1``; ConfigError otherwise)."""
        return latent_frame_count(pixel_frames, self.temporal_factor, key)

    def pixel_frames(self, latent_frames: int) -> int:
        return (int(latent_frames) - 1) * self.temporal_factor + 1

    def latent_shape(self, latent_frames: int) -> tuple[int, int, int, int]:
        """(C, F, H, W) of one sample's latents."""
        return (int(self.model.config.in_channels), int(latent_frames), self.height // self.spatial_factor,
                self.width // self.spatial_factor)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def preprocess_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (B, F, 3, H, W) in [0, 1] -> the VAE's input (B, 3, F, height, width) in [-1, 1]."""
        return video_to_vae_input(frames, self.height, self.width)

    @torch.no_grad()
    def posterior(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames (B, 4k + 1, 3, H, W) in [0, 1] -> the VAE posterior's mean and std (B, C, k + 1, h, w), raw."""
        self.latent_frames(frames.shape[1], "video frames")
        x = self.preprocess_video(frames).to(dtype=next(self.vae.parameters()).dtype)
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.std

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the transformer's latents: ``(z - latents_mean) / latents_std`` per channel."""
        mean, std = self._stats(z)
        return (z - mean) / std

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor, sample: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Frames (B, 4k + 1, 3, H, W) in [0, 1] -> normalised latents (B, C, k + 1, h, w): a draw from the
        posterior, or its mean."""
        mean, std = self.posterior(frames)
        if not sample:
            return self.normalise(mean)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.normalise(mean + std * eps)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, F, h, w) -> frames (B, 4(F - 1) + 1, 3, height, width) in [0, 1]."""
        z = latents.to(next(self.vae.parameters()).dtype)
        mean, std = self._stats(z)
        video = self.vae.decode(z * std + mean, return_dict=False)[0]
        return ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> UMT5 hidden states (B, max_sequence_length, D), padding positions zeroed as in WanPipeline."""
        device = next(self.text_encoder.parameters()).device
        embeds, _ = self.pipeline().encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                  max_sequence_length=self.max_sequence_length, device=device)
        return embeds

    # --- flow matching ------------------------------------------------------------------------------
    def timesteps(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep of noise level ``sigma`` (one per sample): ``num_train_timesteps * sigma``."""
        return sigmas * self.scheduler.config.num_train_timesteps

    def shift_sigmas(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The scheduler's shift ``s' = shift s / (1 + (shift - 1) s)`` (identity at shift 1)."""
        k = self.flow_shift
        return sigmas if k == 1.0 else k * sigmas / (1 + (k - 1) * sigmas)

    def train_levels(self, n: int, device: torch.device, logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
        """``n`` training noise levels: logit-normal (Esser et al. 2024, eq. 19, diffusers'
        ``compute_density_for_timestep_sampling``), then shifted as the sampler's levels are."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling("logit_normal", n, logit_mean=logit_mean, logit_std=logit_std,
                                                  device=device)
        return self.shift_sigmas(u)

    def val_levels(self, count: int) -> list[float]:
        """``count`` fixed validation levels: the middles of ``count`` equal bins, shifted."""
        return [float(self.shift_sigmas(torch.tensor((k + 0.5) / count))) for k in range(count)]

    def loss_weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights: 1 (plain flow-matching MSE)."""
        return torch.ones_like(sigmas)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, frame_sigmas: torch.Tensor) -> torch.Tensor:
        """``(1 - s) x_0 + s eps`` with a level per sample and frame (``frame_sigmas`` (B, F)); a frame at level 0
        is ``x_0`` itself, bit for bit."""
        s = frame_sigmas.to(latents.dtype).view(latents.shape[0], 1, latents.shape[2], 1, 1)
        return torch.where(s == 0, latents, (1 - s) * latents + s * noise)

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The flow-matching velocity ``eps - x_0`` the transformer regresses."""
        return noise - latents

    def denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The transformer's prediction; ``timesteps`` (B,): one scalar per sample."""
        return self.model(hidden_states=latents, timestep=timesteps, encoder_hidden_states=text.to(latents.dtype),
                          return_dict=False)[0]

    @torch.no_grad()
    def sample(self, latents: torch.Tensor, text: torch.Tensor, steps: int, negative_text: torch.Tensor | None = None,
               guidance_scale: float = 1.0, keep: Callable[[float], torch.Tensor | None] | None = None) -> torch.Tensor:
        """Flow-matching Euler sampling from ``latents`` (already noised), as ``WanPipeline`` does.

        ``keep(sigma)`` -> a bool mask (F,) of frames whose prediction is zeroed at a step of noise level
        ``sigma`` (after classifier-free guidance): an Euler step with zero velocity leaves them unchanged.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps, device=latents.device)
        sched.set_begin_index(0)
        dtype = self.model.dtype
        text = text.to(dtype)
        for i, t in enumerate(sched.timesteps):
            ts = t.expand(latents.shape[0])
            v = self.model(hidden_states=latents.to(dtype), timestep=ts, encoder_hidden_states=text,
                           return_dict=False)[0]
            if negative_text is not None and guidance_scale != 1.0:
                u = self.model(hidden_states=latents.to(dtype), timestep=ts,
                               encoder_hidden_states=negative_text.to(dtype), return_dict=False)[0]
                v = u + guidance_scale * (v - u)
            mask = keep(float(sched.sigmas[i])) if keep is not None else None
            if mask is not None and bool(mask.any()):
                v = v.masked_fill(mask.to(v.device).view(1, 1, -1, 1, 1), 0.0)
            latents = sched.step(v, t, latents, return_dict=False)[0]
        return latents

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise ConfigError("Wan is a video generator with no image features; use "
                          "vision_ft.tasks.VideoDiffusionTask (model.class_path)")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        raise ConfigError("Wan takes videos: use preprocess_video / encode_video (frames (B, F, 3, H, W))")

    def pipeline(self, scheduler: Any | None = None):
        """A ``WanPipeline`` sharing these modules (no copy)."""
        from diffusers import WanPipeline

        pipe = WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                           scheduler=scheduler or self.scheduler, transformer=self.model)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # --- identity and export -----------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "init_args": {"name": self.name, "pretrained": self.pretrained, "checkpoint": self.checkpoint,
                              "attention": list(self.attention), "height": self.height, "width": self.width,
                              "flow_shift": self.flow_shift, "max_sequence_length": self.max_sequence_length,
                              "grad_checkpointing": self.grad_checkpointing, "init_seed": self.init_seed}}

    def save_native(self, out_dir: str | Path) -> Path:
        """A pipeline folder (``model_index.json`` + parts) that ``WanPipeline.from_pretrained`` loads."""
        out = Path(out_dir)
        self.pipeline().save_pretrained(str(out), safe_serialization=True)
        return out

    def save_lora(self, out_dir: str | Path, layers: dict[str, torch.Tensor]) -> Path:
        """``pytorch_lora_weights.safetensors`` in diffusers' layout (``transformer.<module>.lora_A/B.weight``) from
        :meth:`~vision_ft.methods.Method.lora_layers`; ``WanPipeline.load_lora_weights(out_dir)`` loads it
        (scaling folded into ``lora_B``, so the file's alpha is its rank)."""
        from diffusers import WanPipeline

        return write_lora_file(WanPipeline, out_dir, layers)
