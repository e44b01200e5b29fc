"""How a video diffusion task lays out one clip on the latent time axis: clean condition frames, buffer frames
held at bounded noise levels, and target frames (what :meth:`~vision_ft.methods.Method.in_context_plan` returns).

Noise levels are on the backbone's level axis, 0 = clean, 1 = pure noise: the flow-matching ``sigma`` (Wan,
timestep ``1000 sigma``), or the timestep fraction ``(t + 1) / T`` of a DDPM schedule (CogVideoX). For one
sample with noise level ``sigma`` (the target's) a frame is at

- ``0`` when it is a condition frame (the latent stays ``x_0``),
- ``min(sigma, tau_k)`` when it is buffer ``k``,
- ``sigma`` when it is a target frame;

the loss is taken on target frames only. While sampling, the prediction of a condition frame is zeroed at
every step, and that of buffer ``k`` while the step's level is above ``tau_k`` (:meth:`FramePlan.frozen`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FramePlan:
    """``condition`` clean latents, then one buffer per level in ``buffer_levels``, then ``target`` latents."""

    condition: int
    buffer_levels: tuple[float, ...]
    target: int

    @classmethod
    def plain(cls, frames: int) -> FramePlan:
        """Every latent frame is a target (plain text-to-video)."""
        return cls(0, (), int(frames))

    @property
    def buffers(self) -> int:
        return len(self.buffer_levels)

    @property
    def frames(self) -> int:
        return self.condition + self.buffers + self.target

    def frame_sigmas(self, sigma: torch.Tensor) -> torch.Tensor:
        """(B,) target levels -> (B, frames): 0 on condition frames, ``min(sigma, tau_k)`` on buffer ``k``."""
        sigma = sigma.reshape(-1, 1)
        parts = [torch.zeros(sigma.shape[0], self.condition, dtype=sigma.dtype, device=sigma.device)]
        if self.buffers:
            taus = torch.tensor(self.buffer_levels, dtype=sigma.dtype, device=sigma.device).view(1, -1)
            parts.append(torch.minimum(sigma, taus))
        parts.append(sigma.expand(-1, self.target))
        return torch.cat(parts, dim=1)

    def start_sigmas(self) -> torch.Tensor:
        """(frames,) levels a sampler starts from: 0, ``tau_k``, 1."""
        return torch.tensor([0.0] * self.condition + list(self.buffer_levels) + [1.0] * self.target)

    def target_mask(self) -> torch.Tensor:
        """(frames,) bool: the frames in the loss and in the output."""
        mask = torch.zeros(self.frames, dtype=torch.bool)
        mask[self.condition + self.buffers:] = True
        return mask

    def frozen(self, sigma: float) -> torch.Tensor:
        """(frames,) bool: frames whose prediction a sampler zeroes at a step of level ``sigma``."""
        mask = torch.zeros(self.frames, dtype=torch.bool)
        mask[:self.condition] = True
        for k, tau in enumerate(self.buffer_levels):
            mask[self.condition + k] = sigma > tau
        return mask
