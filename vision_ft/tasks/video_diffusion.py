"""Fine-tuning a text-to-video diffusion model (Wan 2.1) on condition -> target clips with any registered method.

A batch holds ``target`` frames (B, F_t, 3, H, W) in [0, 1], the ``prompt`` s and, for conditioned
generation, ``condition`` frames (B, F_c, 3, H, W): an image repeated (image-to-video) or a clip
(video-to-video). Condition and target are joined on the time axis and encoded once by the frozen video VAE
(``F_c = 1 + 4k`` and ``F_t = 4m`` pixel frames give ``1 + k + m`` latents, ``1 + k`` of them from the
condition); without a condition the target alone is the clip (``4m + 1`` frames).

The method lays the latent clip out (:meth:`~vision_ft.methods.Method.in_context_plan`): TIC-FT keeps
condition latents clean and buffers at bounded levels; any other method sees every latent frame as a
target (plain text-to-video on the whole clip). Training (flow matching, Lipman et al. 2023, arXiv
2210.02747; logit-normal levels, Esser et al. 2024, arXiv 2403.03206, eq. 19): one level ``sigma`` per
sample, logit-normal and shifted as the backbone's sampler is, frames noised to the plan's levels, one
scalar timestep per sample (the target's), MSE to the velocity ``eps - x_0`` on target latents only.

Validation: the same loss at ``val_sigmas`` fixed levels with noise fixed by (seed, batch, slot) and the VAE
posterior's mean: deterministic (``val/loss``). Samples of the first ``num_samples`` validation items are
written at the first validation after every ``sample_every_n_steps`` optimiser steps (pair it with the
trainer's ``val_check_interval``) and at the end: ``samples/<step>_<i>.mp4`` (PyAV)
and a PNG strip of the frames (rows: items). The sampler starts the condition clean, each buffer at its level
and the target from noise, and zeroes the prediction at frames the plan holds (flow-matching Euler leaves
them unchanged). A LoRA is also written as ``pytorch_lora_weights.safetensors`` for
``WanPipeline.load_lora_weights``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from ..backbones import Backbone
from ..errors import ConfigError, DataError
from ..methods import Method
from ..methods.frame_plan import FramePlan
from .base import BaseTask
from .diffusion import fixed_noise, write_grid


class VideoDiffusionTask(BaseTask):
    """Fine-tune a text-to-video diffusion backbone (:class:`~vision_ft.backbones.WanVideo`).

    Args:
        backbone: the video diffusion backbone.
        method: registered method (``tic_ft``: in-context condition -> target; ``lora``: plain).
        logit_mean, logit_std: the logit-normal draw of Wan's training noise level (0, 1: SD3's default).
        caption_dropout: probability of training a sample with the empty prompt.
        cache: keep the VAE posterior of each clip (by content) and the embedding of each prompt in memory, so
            repeated epochs skip the frozen encoders (exact: the posterior is still sampled).
        val_sigmas: fixed noise levels per validation clip.
        num_samples: validation items sampled into videos (0: none).
        sample_every_n_steps: write samples at the first validation after every N optimiser steps (0: only at
            the end).
        sample_steps, guidance_scale, negative_prompt: sampling settings (Euler; guidance 1 = off).
        sample_whole_clip: write condition + target frames, not the target only.
        fps: frame rate of the written MP4s.
    """

    runs_in_context = True

    task_name = "video_diffusion"

    def __init__(
        self,
        backbone: Backbone,
        method: Method | str = "tic_ft",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        caption_dropout: float = 0.0,
        cache: bool = False,
        val_sigmas: int = 4,
        num_samples: int = 2,
        sample_every_n_steps: int = 0,
        sample_steps: int = 20,
        guidance_scale: float = 1.0,
        negative_prompt: str = "",
        sample_whole_clip: bool = False,
        fps: float = 8.0,
        seed: int = 0,
        lr: float = 5e-5,
        weight_decay: float = 1e-4,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        warmup_fraction: float = 0.0,
        min_lr_ratio: float = 1.0,
        ema_decay: float = 0.0,
        on_nonfinite: Literal["stop", "skip"] = "stop",
    ) -> None:
        for name, ok in (("caption_dropout", 0.0 <= caption_dropout < 1.0), ("val_sigmas", val_sigmas >= 1),
                         ("num_samples", num_samples >= 0), ("sample_every_n_steps", sample_every_n_steps >= 0),
                         ("sample_steps", sample_steps >= 1), ("logit_std", logit_std > 0), ("fps", fps > 0)):
            if not ok:
                raise ConfigError(f"model.init_args.{name} is out of range: {locals()[name]!r}")
        if not hasattr(backbone, "encode_video"):
            raise ConfigError("VideoDiffusionTask needs a video diffusion backbone (vision_ft.backbones.WanVideo) "
                              "(model.init_args.backbone.class_path)")
        super().__init__(backbone, method, lr=lr, weight_decay=weight_decay, optimizer=optimizer,
                         warmup_fraction=warmup_fraction, min_lr_ratio=min_lr_ratio, ema_decay=ema_decay,
                         on_nonfinite=on_nonfinite)
        self.logit_mean, self.logit_std, self.caption_dropout = float(logit_mean), float(logit_std), caption_dropout
        self.val_sigmas, self.num_samples = int(val_sigmas), int(num_samples)
        self.sample_every_n_steps = sample_every_n_steps
        self.sample_steps, self.guidance_scale, self.negative_prompt = sample_steps, guidance_scale, negative_prompt
        self.sample_whole_clip, self.fps, self.seed = sample_whole_clip, float(fps), int(seed)
        self.cache = bool(cache)
        self._latent_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._text_cache: dict[str, torch.Tensor] = {}
        self._sample_items: list[tuple[torch.Tensor | None, int, str]] = []
        self._sampled_at = 0

    def task_metadata(self) -> dict[str, Any]:
        return {"task_args": {"logit_mean": self.logit_mean, "logit_std": self.logit_std,
                              "sample_steps": self.sample_steps, "guidance_scale": self.guidance_scale},
                "height": self.backbone.height, "width": self.backbone.width}

    # --- encoders (frozen; optionally cached) --------------------------------------------------------
    def latents(self, frames: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Normalised latents of clips (B, F, 3, H, W): a posterior draw, or its mean."""
        b = self.backbone
        if not self.cache:
            return b.encode_video(frames, sample=sample)
        keys = [hashlib.sha1(clip.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                for clip in frames]  # the bytes of any dtype (bf16 has no numpy twin)
        missing = [i for i, k in enumerate(keys) if k not in self._latent_cache]
        if missing:
            mean, std = b.posterior(frames[missing])
            for j, i in enumerate(missing):
                self._latent_cache[keys[i]] = (mean[j].detach(), std[j].detach())
        mean = torch.stack([self._latent_cache[k][0] for k in keys])
        if not sample:
            return b.normalise(mean)
        std = torch.stack([self._latent_cache[k][1] for k in keys])
        return b.normalise(mean + std * torch.randn_like(mean))

    def text(self, prompts: list[str]) -> torch.Tensor:
        if not self.cache:
            return self.backbone.encode_text(prompts)
        for p in set(prompts) - set(self._text_cache):
            self._text_cache[p] = self.backbone.encode_text([p])[0]
        return torch.stack([self._text_cache[p] for p in prompts])

    # --- layout --------------------------------------------------------------------------------
    def clip_frames(self, condition: int, target: int) -> tuple[int, int]:
        """(context latents, total latents) of a condition / target pair of pixel frame counts."""
        b = self.backbone
        if not condition:
            return 0, b.latent_frames(target, "target frames (no condition: 4k + 1)")
        context = b.latent_frames(condition, "condition frames")
        if target < 1 or target % b.temporal_factor:
            raise DataError(f"target frames={target}: after a condition clip the target needs a multiple of "
                            f"{b.temporal_factor} frames (4, 8, ..., 36 for the paper's 49 = 13 + 36)")
        return context, context + target // b.temporal_factor

    def plan(self, context: int, total: int) -> FramePlan:
        return self.method.in_context_plan(context, total) or FramePlan.plain(total)

    def clip(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """The pixel clip (condition then target) and its count of condition latents."""
        target, condition = batch["target"], batch.get("condition")
        fc = 0 if condition is None else condition.shape[1]
        context, _ = self.clip_frames(fc, target.shape[1])
        frames = target if condition is None else torch.cat([condition.to(target.dtype), target], dim=1)
        return frames, context

    # --- loss ----------------------------------------------------------------------------------
    def flow_loss(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, text: torch.Tensor,
                  plan: FramePlan) -> torch.Tensor:
        """MSE to the backbone's training target (Wan: the velocity ``eps - x_0``) on the plan's target latents,
        frames noised to the plan's levels, weighted per sample as the backbone's recipe says (Wan: 1)."""
        b = self.backbone
        noisy = b.add_noise(latents, noise, plan.frame_sigmas(sigmas))
        pred = b.denoise(noisy, b.timesteps(sigmas), text)
        keep = plan.target_mask().nonzero().flatten().to(latents.device)
        target = b.training_target(latents, noise)
        err = (pred.index_select(b.frame_dim, keep).float() - target.index_select(b.frame_dim, keep).float()) ** 2
        per_sample = err.mean(dim=list(range(1, err.dim())))
        return (per_sample * b.loss_weights(sigmas).to(per_sample)).mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        prompts = list(batch["prompt"])
        if self.caption_dropout > 0:
            drop = torch.rand(len(prompts)) < self.caption_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        frames, context = self.clip(batch)
        latents = self.latents(frames)
        plan = self.plan(context, latents.shape[self.backbone.frame_dim])
        sigmas = self.backbone.train_levels(latents.shape[0], latents.device, self.logit_mean,
                                            self.logit_std).to(latents.dtype)
        loss = self.flow_loss(latents, torch.randn_like(latents), sigmas, self.text(prompts), plan)
        loss = self.add_regularizers(loss, {"inputs": None, "logits": None, "features": None}, batch)
        loss = self.checked_loss(loss)
        if loss is None:
            return None
        self.log_train_loss(loss, batch_idx, batch_size=len(prompts))
        return loss

    def fixed_loss(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The loss at fixed levels with fixed noise and the posterior mean (deterministic)."""
        frames, context = self.clip(batch)
        latents = self.latents(frames, sample=False)
        plan = self.plan(context, latents.shape[self.backbone.frame_dim])
        text = self.text(list(batch["prompt"]))
        losses = []
        for k, sigma in enumerate(self.backbone.val_levels(self.val_sigmas)):
            noise = fixed_noise(latents.shape, self.seed, batch_idx, k).to(latents.device, latents.dtype)
            sigmas = torch.full((latents.shape[0],), float(sigma), device=latents.device, dtype=latents.dtype)
            losses.append(self.flow_loss(latents, noise, sigmas, text, plan))
        return torch.stack(losses).mean()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.fixed_loss(batch, batch_idx)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))
        room = self.num_samples - len(self._sample_items)
        if room > 0 and not self.trainer.sanity_checking:
            condition = batch.get("condition")
            for i in range(min(room, len(batch["prompt"]))):
                cond = None if condition is None else condition[i].detach().cpu()
                self._sample_items.append((cond, int(batch["target"].shape[1]), str(batch["prompt"][i])))
        return loss

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("test/loss", self.fixed_loss(batch, batch_idx), batch_size=len(batch["prompt"]))

    # --- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[str], target_frames: int, condition: torch.Tensor | None = None,
                 seeds: list[int] | None = None, whole_clip: bool = False) -> torch.Tensor:
        """Frames (N, F, 3, H, W) in [0, 1]: the target part (or the whole clip) sampled for each prompt."""
        b = self.backbone
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts) or (condition is not None and condition.shape[0] != len(prompts)):
            raise ConfigError(f"generate: {len(prompts)} prompts need as many seeds and condition clips (got "
                              f"{len(seeds)} and {'none' if condition is None else condition.shape[0]})")
        device = next(b.model.parameters()).device
        context, total = self.clip_frames(0 if condition is None else condition.shape[1], target_frames)
        plan = self.plan(context, total)
        shape = b.latent_shape(total)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        noise = noise.to(device)
        x0 = torch.zeros_like(noise)
        if condition is not None:
            ctx = self.latents(condition.to(device), sample=False).to(noise.dtype)
            x0 = x0.narrow(b.frame_dim, context, total - context)
            x0 = torch.cat([ctx, x0], dim=b.frame_dim)
        start = b.add_noise(x0, noise, plan.start_sigmas().to(device, noise.dtype).expand(len(seeds), -1))
        text = self.text(prompts)
        negative = self.text([self.negative_prompt] * len(prompts)) if self.guidance_scale != 1.0 else None
        held = plan.condition + plan.buffers > 0
        was_training = b.model.training
        b.model.eval()
        try:
            latents = b.sample(start, text, self.sample_steps, negative, self.guidance_scale,
                               keep=plan.frozen if held else None)
        finally:
            b.model.train(was_training)
        video = b.decode_latents(latents)
        first = plan.condition + plan.buffers
        if whole_clip or first == 0:
            return video
        return video[:, b.pixel_frames(first):]

    def write_samples(self, stem: str) -> list[Path]:
        """``samples/<stem>_<i>.mp4`` per item and ``samples/<stem>.png`` (one row per item)."""
        if not self._sample_items:
            return []
        from ..data.video import write_video

        rows, paths = [], []
        for i, (cond, target_frames, prompt) in enumerate(self._sample_items):
            frames = self.generate([prompt], target_frames, None if cond is None else cond[None], seeds=[self.seed + i],
                                   whole_clip=self.sample_whole_clip)[0]
            pixels = (frames.permute(0, 2, 3, 1).clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
            path = self.run_dir / "samples" / f"{stem}_{i}.mp4"
            tmp = path.with_name(f".{path.name}.tmp.mp4")
            write_video(tmp, pixels, self.fps)
            os.replace(tmp, path)
            paths.append(path)
            rows.append(frames.permute(0, 2, 3, 1).cpu().numpy())
        count = min(r.shape[0] for r in rows)
        strip = np.concatenate([r[:count] for r in rows])
        paths.append(write_grid(self.run_dir / "samples" / f"{stem}.png", strip, len(rows), count))
        return paths

    # --- hooks -----------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        low = [n for n, p in self.backbone.model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
        if low:
            from diffusers.training_utils import cast_training_params

            cast_training_params(self.backbone.model, dtype=torch.float32)
            rank_zero_info(f"[vision_ft] {len(low)} trainable tensors cast to float32")

    def on_validation_epoch_end(self) -> None:
        """Samples at the first validation at or after every ``sample_every_n_steps`` optimiser steps."""
        n = self.sample_every_n_steps
        if not n or self.trainer.sanity_checking or self.trainer.fast_dev_run or self.global_step < n:
            return
        due = self.global_step // n * n
        if due > self._sampled_at and self.trainer.is_global_zero:
            self.write_samples(f"step_{self.global_step:06d}")
        self._sampled_at = due

    def write_plots(self, run_dir: Path) -> None:
        """Curves, the final samples and, for a LoRA, diffusers' LoRA file."""
        super().write_plots(run_dir)
        self.write_samples("final")
        layers = self.method.lora_layers(self.backbone)
        if layers:
            path = self.backbone.save_lora(run_dir, layers)
            rank_zero_info(f"[vision_ft] diffusers LoRA weights written to {path} "
                           "(WanPipeline.load_lora_weights(run_dir))")

    def export_native(self, out_dir: str | Path) -> Path:
        leftovers = [k for k in self.backbone.model.state_dict() if self.method.is_own(k)]
        if leftovers:
            raise RuntimeError(f"merge left method tensors behind: {leftovers[:3]}")
        return Path(self.backbone.save_native(out_dir))
