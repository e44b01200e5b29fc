"""Text-to-image fine-tuning of a latent diffusion model (Stable Diffusion) with any registered method.

Training (Rombach et al. 2022, arXiv 2112.10752, eq. 2): images are encoded by the frozen VAE (a draw of
its posterior, times its scaling factor), captions by the frozen text encoder; a timestep ``t`` is drawn
uniformly, the latents are noised by the scheduler (``add_noise``) and the UNet regresses the target of the
scheduler's parameterisation (``eps`` or ``v``; :mod:`.diffusion`) with an MSE, optionally weighted by
min-SNR-gamma. Caption dropout replaces a caption by ``""`` (the unconditional prompt of classifier-free
guidance, Ho & Salimans 2022, arXiv 2207.12598).

Validation: the same loss at ``val_timesteps`` fixed timesteps with noise fixed by (seed, batch, slot) and
the VAE posterior's mean, so two evaluations of the same weights give the same number (``val/loss``,
plotted in ``curves.png``). Sample grids (rows: ``sample_prompts``, columns: ``sample_seeds``) are written to
``<run>/samples/step_<N>.png`` every ``sample_every_n_steps`` optimiser steps and ``samples/final.png`` at
the end. A method that is a LoRA (:meth:`~vision_ft.methods.Method.lora_layers`) is also written as
``pytorch_lora_weights.safetensors`` in the run folder, loadable by the pipeline's ``load_lora_weights``.

Mixed precision: ``trainer.precision: 16-mixed`` / ``bf16-mixed`` keep every weight fp32 (autocast, and a
gradient scaler for fp16); with ``16-true`` / ``bf16-true`` the trainable tensors are cast back to fp32
(diffusers' ``cast_training_params``), so fp16 gradients are never unscaled.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from ..backbones import Backbone
from ..errors import ConfigError
from ..methods import Method
from .base import BaseTask
from .diffusion import (
    fixed_noise,
    min_snr_weights,
    resolve_prediction_type,
    training_target,
    validation_timesteps,
    write_grid,
)

log = logging.getLogger("vision_ft")
LORA_FILE = "pytorch_lora_weights.safetensors"


class TextToImageTask(BaseTask):
    """Fine-tune a text-to-image latent diffusion backbone (:class:`~vision_ft.backbones.StableDiffusion`).

    Args:
        backbone: the diffusion backbone.
        method: registered method name or class_path (``lora``, ``sara``, ``full``...).
        snr_gamma: min-SNR-gamma weighting (5.0 in the paper); ``null``: plain MSE.
        prediction_type: override the scheduler's ``epsilon`` / ``v_prediction``.
        caption_dropout: probability of training a sample with the empty caption (0.1 is usual for CFG).
        cache: keep the VAE posterior of each image (by content) and the embedding of each caption in
            memory, so repeated epochs skip the frozen encoders (exact: the posterior is still sampled).
        val_timesteps: fixed timesteps per validation image.
        sample_prompts / sample_seeds: the sample grid's rows / columns (no prompts: no grids).
        sample_every_n_steps: write a grid every N optimiser steps (0: only at the end).
        sample_steps, guidance_scale: sampling settings (DDIM).
        metrics: optional ``fid``, ``kid``, ``clip_score`` on the test split (need weights; see
            :mod:`vision_ft.metrics.generation`), computed on ``metric_images`` generated test captions.
    """

    task_name = "text_to_image"

    def __init__(
        self,
        backbone: Backbone,
        method: Method | str = "lora",
        snr_gamma: float | None = None,
        prediction_type: Literal["epsilon", "v_prediction"] | None = None,
        caption_dropout: float = 0.0,
        cache: bool = False,
        val_timesteps: int = 4,
        sample_prompts: list[str] | None = None,
        sample_seeds: list[int] = [0, 1],  # noqa: B006 - jsonargparse needs a plain list default
        sample_every_n_steps: int = 0,
        sample_steps: int = 20,
        guidance_scale: float = 7.5,
        metrics: list[str] = [],  # noqa: B006
        metric_images: int = 16,
        inception_weights: str | None = None,
        clip_model: str = "openai/clip-vit-base-patch16",
        seed: int = 0,
        lr: float = 1e-4,
        weight_decay: float = 1e-2,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        warmup_fraction: float = 0.0,
        min_lr_ratio: float = 0.0,
        ema_decay: float = 0.0,
        on_nonfinite: Literal["stop", "skip"] = "stop",
    ) -> None:
        for name, ok in (("caption_dropout", 0.0 <= caption_dropout < 1.0), ("val_timesteps", val_timesteps >= 1),
                         ("sample_every_n_steps", sample_every_n_steps >= 0), ("sample_steps", sample_steps >= 1),
                         ("snr_gamma", snr_gamma is None or snr_gamma > 0)):
            if not ok:
                raise ConfigError(f"model.init_args.{name} is out of range: {locals()[name]!r}")
        if not hasattr(backbone, "denoise"):
            raise ConfigError("TextToImageTask needs a diffusion backbone (vision_ft.backbones.StableDiffusion) "
                              "(model.init_args.backbone.class_path)")
        super().__init__(backbone, method, lr=lr, weight_decay=weight_decay, optimizer=optimizer,
                         warmup_fraction=warmup_fraction, min_lr_ratio=min_lr_ratio, ema_decay=ema_decay,
                         on_nonfinite=on_nonfinite)
        self.kind = resolve_prediction_type(backbone.scheduler, prediction_type)
        self.prediction_override, self.snr_gamma, self.caption_dropout = prediction_type, snr_gamma, caption_dropout
        self.cache, self.val_timesteps, self.seed = cache, int(val_timesteps), int(seed)
        self.sample_prompts, self.sample_seeds = list(sample_prompts or []), list(sample_seeds)
        self.sample_every_n_steps, self.sample_steps, self.guidance_scale = sample_every_n_steps, sample_steps, guidance_scale
        self.metric_names, self.metric_images = list(metrics), int(metric_images)
        self.inception_weights, self.clip_model = inception_weights, clip_model
        self.gen_metrics = None
        if self.metric_names:
            from ..metrics.generation import build_generation_metrics

            self.gen_metrics = build_generation_metrics(self.metric_names, inception_weights, clip_model)
            self.gen_metrics.requires_grad_(False)  # feature networks: never trained, averaged or checkpointed
        self._latent_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._text_cache: dict[str, torch.Tensor] = {}

    def task_metadata(self) -> dict[str, Any]:
        return {"task_args": {"prediction_type": self.prediction_override, "snr_gamma": self.snr_gamma,
                              "sample_prompts": self.sample_prompts, "sample_seeds": self.sample_seeds,
                              "sample_steps": self.sample_steps, "guidance_scale": self.guidance_scale},
                "prediction_type": self.kind, "image_size": self.backbone.image_size}

    # --- encoders (frozen; optionally cached) --------------------------------------------------------
    def latents(self, images: torch.Tensor, sample: bool = True) -> torch.Tensor:
        vae = self.backbone.vae
        if not self.cache:
            return self.backbone.encode_images(images, sample=sample)
        keys = [hashlib.sha1(img.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                for img in images]  # the bytes of any dtype (bf16-true batches have no numpy twin)
        missing = [i for i, k in enumerate(keys) if k not in self._latent_cache]
        if missing:
            with torch.no_grad():
                x = self.backbone.preprocess(images[missing]).to(next(vae.parameters()).dtype)
                dist = vae.encode(x).latent_dist
            for j, i in enumerate(missing):
                self._latent_cache[keys[i]] = (dist.mean[j].detach(), dist.std[j].detach())
        mean = torch.stack([self._latent_cache[k][0] for k in keys])
        std = torch.stack([self._latent_cache[k][1] for k in keys])
        z = mean + std * torch.randn_like(mean) if sample else mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    def text(self, captions: list[str]) -> torch.Tensor:
        if not self.cache:
            return self.backbone.encode_text(captions)
        for c in set(captions) - set(self._text_cache):
            self._text_cache[c] = self.backbone.encode_text([c])[0]
        return torch.stack([self._text_cache[c] for c in captions])

    # --- loss ----------------------------------------------------------------------------------
    def diffusion_loss(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                       weighted: bool = True) -> torch.Tensor:
        sched = self.backbone.scheduler
        noisy = sched.add_noise(latents, noise, timesteps)
        pred = self.backbone.denoise(noisy, timesteps, text.to(noisy.dtype))
        target = training_target(sched, self.kind, latents, noise, timesteps)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.dim())))
        if weighted and self.snr_gamma is not None:
            per_sample = per_sample * min_snr_weights(sched, timesteps, self.snr_gamma, self.kind).to(per_sample.device)
        return per_sample.mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        images, captions = batch["image"], list(batch["caption"])
        if self.caption_dropout > 0:
            drop = torch.rand(len(captions)) < self.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        latents = self.latents(images)
        noise = torch.randn_like(latents)
        steps = self.backbone.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), device=latents.device).long()
        loss = self.diffusion_loss(latents, noise, t, self.text(captions))
        loss = self.add_regularizers(loss, {"inputs": None, "logits": None, "features": None}, batch)
        loss = self.checked_loss(loss)
        if loss is None:
            return None
        self.log_train_loss(loss, batch_idx, batch_size=len(captions))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.fixed_loss(batch, batch_idx)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def fixed_loss(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The loss at the fixed timesteps with fixed noise and the posterior mean (deterministic)."""
        images, captions = batch["image"], list(batch["caption"])
        latents, text = self.latents(images, sample=False), self.text(captions)
        steps = self.backbone.scheduler.config.num_train_timesteps
        losses = []
        for k, t in enumerate(validation_timesteps(steps, self.val_timesteps)):
            noise = fixed_noise(latents.shape, self.seed, batch_idx, k).to(latents.device, latents.dtype)
            ts = torch.full((latents.shape[0],), t, device=latents.device, dtype=torch.long)
            losses.append(self.diffusion_loss(latents, noise, ts, text, weighted=False))
        return torch.stack(losses).mean()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.fixed_loss(batch, batch_idx)
        self.log("test/loss", loss, batch_size=len(batch["caption"]))
        if self.gen_metrics is None or batch_idx * len(batch["caption"]) >= self.metric_images:
            return
        images, captions = batch["image"], list(batch["caption"])
        fake = torch.from_numpy(self.generate(captions, list(range(len(captions))), pair=True)).permute(0, 3, 1, 2)
        fake = fake.to(images.device, images.dtype)
        for name, metric in self.gen_metrics.items():
            if name == "clip_score":
                metric.update((fake * 255).to(torch.uint8), captions)
            else:
                metric.update(images, real=True)
                metric.update(fake, real=False)

    def on_test_epoch_end(self) -> None:
        for name, metric in (self.gen_metrics or {}).items():
            value = metric.compute()
            self.log(f"test/{name}", value[0] if isinstance(value, tuple) else value)

    # --- hooks ---------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        low = [n for n, p in self.backbone.model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
        if low:
            from diffusers.training_utils import cast_training_params

            cast_training_params(self.backbone.model, dtype=torch.float32)
            rank_zero_info(f"[vision_ft] {len(low)} trainable tensors cast to float32 (the frozen weights keep "
                           "the trainer's precision)")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = self.sample_every_n_steps
        if n and self.sample_prompts and self.global_step % n == 0 and self.trainer.is_global_zero \
                and not self.trainer.fast_dev_run:
            self.write_samples(self.run_dir / "samples" / f"step_{self.global_step:06d}.png")

    # --- sampling and outputs ------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], pair: bool = False) -> np.ndarray:
        """Images (N, H, W, 3) in [0, 1]: every prompt x seed (rows x columns), or prompt i with seed i (``pair``)."""
        pairs = list(zip(prompts, seeds)) if pair else [(p, s) for p in prompts for s in seeds]
        was_training = self.backbone.model.training
        self.backbone.model.eval()
        try:
            pipe = self.backbone.pipeline()
            device = next(self.backbone.model.parameters()).device
            gens = [torch.Generator(device="cpu").manual_seed(int(s)) for _, s in pairs]
            size = self.backbone.image_size
            out = pipe([p for p, _ in pairs], num_inference_steps=self.sample_steps, guidance_scale=self.guidance_scale,
                       generator=gens, height=size, width=size, output_type="np",
                       latents=torch.stack([torch.randn(4, size // self.backbone.vae_factor, size // self.backbone.vae_factor,
                                                        generator=g) for g in gens]).to(device, self.backbone.model.dtype))
        finally:
            self.backbone.model.train(was_training)
        return np.asarray(out.images, dtype=np.float32)

    def write_samples(self, path: Path) -> Path | None:
        if not self.sample_prompts:
            return None
        images = self.generate(self.sample_prompts, self.sample_seeds)
        return write_grid(path, images, len(self.sample_prompts), len(self.sample_seeds))

    def write_plots(self, run_dir: Path) -> None:
        """Curves (train and validation loss), the final sample grid and, for a LoRA, diffusers' LoRA file."""
        super().write_plots(run_dir)
        self.write_samples(run_dir / "samples" / "final.png")
        layers = self.method.lora_layers(self.backbone)
        if layers:
            path = self.backbone.save_lora(run_dir, layers)
            rank_zero_info(f"[vision_ft] diffusers LoRA weights written to {path} "
                           "(StableDiffusionPipeline.load_lora_weights(run_dir))")

    def export_native(self, out_dir: str | Path) -> Path:
        leftovers = [k for k in self.backbone.model.state_dict() if self.method.is_own(k)]
        if leftovers:
            raise RuntimeError(f"merge left method tensors behind: {leftovers[:3]}")
        return Path(self.backbone.save_native(out_dir))
