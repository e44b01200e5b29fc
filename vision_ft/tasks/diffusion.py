"""Pieces every diffusion fine-tuning task shares (images now, video next): the training target of the
scheduler's parameterisation, min-SNR-gamma weights, the fixed noise of a deterministic validation loss,
sample grids on disk and LoRA files for diffusers.

- Targets (Ho et al. 2020, arXiv 2006.11239; Salimans & Ho 2022, arXiv 2202.00512): with
  ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` the model predicts ``eps`` (``epsilon``) or
  ``v = sqrt(a_t) eps - sqrt(1 - a_t) x_0`` (``v_prediction``), as the scheduler's config says.
- Min-SNR-gamma (Hang et al. 2023, arXiv 2303.09556, eq. 12 and its v form): per-sample weights
  ``min(SNR, gamma) / SNR`` for epsilon, ``min(SNR, gamma) / (SNR + 1)`` for v, ``SNR = a_t / (1 - a_t)``
  from ``diffusers.training_utils.compute_snr``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..io import atomic_save_png


def resolve_prediction_type(scheduler: Any, override: str | None = None) -> str:
    kind = override or getattr(scheduler.config, "prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        raise ConfigError(f"prediction type {kind!r} is not supported (model.init_args.prediction_type: epsilon or "
                          "v_prediction)")
    return kind


def training_target(scheduler: Any, kind: str, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the denoiser regresses: ``eps`` or the velocity ``v``."""
    if kind == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float, kind: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (see the module doc)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=gamma)
    return clipped / snr if kind == "epsilon" else clipped / (snr + 1.0)


def fixed_noise(shape: Sequence[int], seed: int, batch_idx: int, k: int) -> torch.Tensor:
    """Noise that depends only on (seed, validation batch, timestep slot): the validation loss is deterministic."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(batch_idx) * 101 + int(k))
    return torch.randn(tuple(shape), generator=g)


def validation_timesteps(num_train_timesteps: int, count: int) -> list[int]:
    """``count`` timesteps evenly spread over the schedule (the middle of ``count`` equal bins)."""
    return [int((i + 0.5) * num_train_timesteps / count) for i in range(count)]


def image_grid(images: np.ndarray, rows: int, cols: int, pad: int = 2) -> np.ndarray:
    """``(rows * cols, H, W, 3)`` floats in [0, 1] -> one uint8 image, row-major, ``pad`` white pixels apart."""
    n, h, w, c = images.shape
    if n != rows * cols:
        raise ValueError(f"{n} images for a {rows} x {cols} grid")
    grid = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, c), 255, dtype=np.uint8)
    pixels = (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = pixels[i]
    return grid


def write_grid(path: str | Path, images: np.ndarray, rows: int, cols: int) -> Path:
    return atomic_save_png(image_grid(images, rows, cols), path)
