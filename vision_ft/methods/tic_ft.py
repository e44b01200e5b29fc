"""TIC-FT: temporal in-context fine-tuning of a pretrained text-to-video diffusion model (Kim et al., "Temporal
In-Context Fine-Tuning for Versatile Control of Video Diffusion Models", arXiv 2506.00996).

The condition and target clips are placed one after the other on the latent time axis of the unchanged
text-to-video model. Of the condition clip's latents (``1 + 4k`` pixel frames give ``1 + k`` latents) the
first ``C`` stay clean and the last ``B`` are *buffers* that carry intermediate noise, so the sequence passes
smoothly from the clean condition to the noisy target; ``T`` target latents follow (``C + B + T`` = the
clip's latent frames). With one noise level ``sigma`` per sample, drawn as in flow-matching training (the
paper's section 3.2, and :class:`~vision_ft.methods.frame_plan.FramePlan`):

    condition:  x = x_0                                  (bit-identical)
    buffer k:   x = (1 - s_k) x_0 + s_k eps,  s_k = min(sigma, tau_k)
    target:     x = (1 - sigma) x_0 + sigma eps

The transformer gets one scalar timestep per sample (the target's) and the loss is the flow-matching MSE on
the target latents only, so gradients at condition and buffer positions are zero. At inference the condition
is encoded, each buffer is noised to its ``tau_k``, the target starts from pure noise, and at every sampler
step the prediction is zeroed at the condition frames, and at buffer ``k`` while the step's level exceeds
``tau_k`` (the video diffusion task and backbone do this: for Wan's flow-matching Euler a zero velocity leaves
the frame unchanged; CogVideoX's DDIM step would move it, so the held frames are re-injected after each step).

Defaults are the paper's: 3 buffers at ``tau = (0.25, 0.5, 0.75)``, i.e. ``k / (B + 1)``, on the backbone's
level axis (Wan: the flow-matching ``sigma``; CogVideoX: the timestep fraction ``(t + 1) / T``, so the levels
are the paper's ``t = 249, 499, 749`` there); any number of buffers (0 included) and levels can be set. Its I2V setting "c1b3t9" (49 pixel
frames = 13 condition frames, one image repeated, + 36 target frames -> 1 + 3 + 9 latents) follows from the
data. The paper's public code hard-codes three buffers; here the count and the levels are a config, in the
level space the paper writes them in.

TIC-FT changes the noising and the loss, not the weights: the weights are trained by ``adapter``, any
registered method (default ``lora``; the paper: LoRA r = alpha = 128 on ``to_q, to_k, to_v, to_out.0``,
``configs/methods/tic_ft.yaml``). Everything about tensors (what trains, what is saved, merge, the diffusers
LoRA file) is the adapter's, so ``tic_ft`` merges and exports exactly as its adapter does. Tasks that do not
place frames by :meth:`in_context_plan` refuse it (``needs_in_context_task``) rather than train the adapter
alone under another name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import Method
from .frame_plan import FramePlan
from .registry import build_method, register

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import Backbone

_KEY = "model.init_args.method.init_args"


@register
class TICFT(Method):
    """TIC-FT: condition, buffer and target latents on one time axis; weights trained by ``adapter``.

    Args:
        buffers: buffer latents between condition and target (3 in the paper; 0 = none).
        taus: buffer noise levels (the backbone's level axis: Wan's ``sigma``, CogVideoX's timestep fraction),
            one per buffer, each in (0, 1), listed from the condition side (default ``k / (buffers + 1)``:
            0.25, 0.5, 0.75 for three).
        adapter: the weight method, a registered name or ``{class_path, init_args}`` (default ``lora`` with
            its defaults; the paper: ``{class_path: vision_ft.methods.LoRA, init_args: {r: 128, alpha: 128}}``).
    """

    name = "tic_ft"
    needs_in_context_task = True
    #: the class declares the default adapter (LoRA): mergeable, zero at init; an instance takes its
    #: adapter's flags and prefix
    mergeable = True
    zero_init = True
    lora_family = False

    def __init__(self, buffers: int = 3, taus: list[float] | None = None,
                 adapter: str | dict[str, Any] = "lora") -> None:
        if int(buffers) != buffers or buffers < 0:
            raise ConfigError(f"{_KEY}.buffers={buffers!r} must be an integer >= 0")
        self.buffers = int(buffers)
        levels = [(k + 1) / (self.buffers + 1) for k in range(self.buffers)] if taus is None else list(taus)
        if len(levels) != self.buffers:
            raise ConfigError(f"{_KEY}.taus has {len(levels)} levels for buffers={self.buffers}: give one per buffer")
        if any(not 0.0 < float(t) < 1.0 for t in levels):
            raise ConfigError(f"{_KEY}.taus={levels}: each buffer level must be in (0, 1) (0 = clean, 1 = pure noise)")
        self.taus = [float(t) for t in levels]
        inner = build_method(adapter)
        if isinstance(inner, TICFT):
            raise ConfigError(f"{_KEY}.adapter must be a weight method (lora, full, ...), not tic_ft")
        self.inner = inner
        self.adapter = inner.spec()
        # the adapter's flags, read by tasks and contract checks on the instance
        self.prefix = inner.prefix
        self.mergeable, self.zero_init = inner.mergeable, inner.zero_init
        self.requires_data = inner.requires_data
        self.trains_base_weights, self.trains_own_tensors = inner.trains_base_weights, inner.trains_own_tensors

    # --- the in-context layout (what the video diffusion task calls) ----------------------------------
    def in_context_plan(self, context_latents: int, total_latents: int) -> FramePlan:
        """``context_latents`` latents of the condition clip (first ``C`` clean, last ``buffers`` noised) and
        ``total_latents - context_latents`` target latents."""
        c = int(context_latents) - self.buffers
        t = int(total_latents) - int(context_latents)
        if c < 1:
            need = self.buffers + 1
            raise ConfigError(f"tic_ft with buffers={self.buffers} needs at least {need} latent frames of condition "
                              f"(1 + 4*{need - 1} = {1 + 4 * (need - 1)} pixel frames on a 4x temporal VAE); the "
                              f"condition clip gives {context_latents} ({_KEY}.buffers or the data's condition "
                              "frames)")
        if t < 1:
            raise ConfigError(f"tic_ft needs target frames after the condition: the clip has {total_latents} latent "
                              f"frames, {context_latents} of them condition")
        return FramePlan(c, tuple(self.taus), t)

    # --- everything about tensors is the adapter's -----------------------------------------------
    @property
    def needs_image_classification_task(self) -> bool:
        return self.inner.needs_image_classification_task

    def set_class_names(self, class_names) -> None:
        super().set_class_names(class_names)
        self.inner.set_class_names(class_names)

    def apply(self, backbone: Backbone) -> None:
        self.inner.apply(backbone)
        self.frozen_base_weights = self.inner.frozen_base_weights
        self.applied = True

    def prepare(self, task: Any, datamodule: Any) -> None:
        self.inner.prepare(task, datamodule)
        self.prepared = True

    def adjust_loss(self, loss: torch.Tensor, outputs: dict[str, Any], batch: Any) -> torch.Tensor:
        return self.inner.adjust_loss(loss, outputs, batch)

    def regularizer(self, outputs: dict[str, Any], batch: Any) -> dict[str, torch.Tensor]:
        return self.inner.regularizer(outputs, batch)

    def on_train_batch_start(self, task: Any) -> None:
        self.inner.on_train_batch_start(task)

    def on_train_end(self, task: Any) -> None:
        self.inner.on_train_end(task)

    def lora_layers(self, backbone: Backbone) -> dict[str, torch.Tensor] | None:
        return self.inner.lora_layers(backbone)

    def nominal_trainable_parameters(self, backbone: Backbone) -> int | None:
        return self.inner.nominal_trainable_parameters(backbone)

    def merge(self, backbone: Backbone) -> None:
        self.inner.merge(backbone)
        self.merged = True

    def save_peft(self, backbone: Backbone, out_dir: str | Path) -> Path:
        return self.inner.save_peft(backbone, out_dir)

    def is_own(self, name: str) -> bool:
        return self.inner.is_own(name)

    def is_trainable(self, name: str) -> bool:
        return self.inner.is_trainable(name)

    def is_saved(self, name: str) -> bool:
        return self.inner.is_saved(name)

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        return self.inner.no_weight_decay(name, param)

    def adapter_state_dict(self, backbone: Backbone) -> dict[str, torch.Tensor]:
        return self.inner.adapter_state_dict(backbone)

    def load_adapter(self, backbone: Backbone, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_adapter(backbone, state)
        self.prepared = self.inner.prepared

    def peft_twin(self, backbone: Backbone) -> dict[str, Any] | None:
        return self.inner.peft_twin(backbone)
