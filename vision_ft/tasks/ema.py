"""Exponential moving average of a task's trainable tensors (``model.init_args.ema_decay``).

The average starts at the first training batch and is updated right after every optimiser step
that was taken (not after a skipped non-finite batch), before any callback sees the step, so a
checkpoint written at that batch's end holds the matching average. Validation during fit, the
final test, the adapter and exports use the averaged weights; checkpoints keep both the live
weights and the average, so resume is exact.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..errors import ConfigError


class EMAMixin:
    """The EMA state and hooks of :class:`~vision_ft.tasks.base.BaseTask` (mixed into the LightningModule)."""

    ema_decay: float = 0.0
    #: name -> averaged tensor (the live ones while swapped in for validation)
    _ema: dict[str, torch.Tensor] | None = None
    _ema_swapped: bool = False

    def _init_ema(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"model.init_args.ema_decay must be in [0, 1), got {decay}")
        self.ema_decay, self._ema, self._ema_swapped = float(decay), None, False

    def _ema_targets(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self.named_parameters() if p.requires_grad}

    def _start_ema(self) -> None:
        """First training batch: the average starts at the current trainable tensors."""
        if self.ema_decay <= 0 or self._ema is not None:
            return
        if self._sharded():
            raise ConfigError("model.init_args.ema_decay is not supported with FSDP (sharded parameters); "
                              "use ddp or set ema_decay=0")
        self._ema = {k: p.detach().clone() for k, p in self._ema_targets().items()}

    @torch.no_grad()
    def _update_ema(self) -> None:
        targets = self._ema_targets()
        keys = [k for k in self._ema if k in targets]
        for k in keys:
            if self._ema[k].device != targets[k].device:
                self._ema[k] = self._ema[k].to(targets[k].device)
        torch._foreach_lerp_([self._ema[k] for k in keys], [targets[k].detach() for k in keys],
                             1.0 - self.ema_decay)

    @torch.no_grad()
    def _swap_ema(self) -> None:
        targets = self._ema_targets()
        for k, avg in self._ema.items():
            p = targets[k]
            live = p.data
            p.data = avg.to(p.device)
            self._ema[k] = live
        self._ema_swapped = not self._ema_swapped

    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        if self._ema is not None and not self._ema_swapped and self.trainer.state.fn == "fit":
            self._swap_ema()

    def on_validation_model_train(self) -> None:
        if self._ema_swapped:
            self._swap_ema()
        super().on_validation_model_train()

    def _ema_to_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The average under ``checkpoint["vision_ft"]["ema"]``, the live weights in ``state_dict``."""
        if self._ema is None:
            return
        params = dict(self.named_parameters())
        if self._ema_swapped:  # saved during validation: the live weights sit in self._ema
            for k, v in self._ema.items():
                checkpoint["state_dict"][k] = v.detach().clone()
            checkpoint["vision_ft"]["ema"] = {k: params[k].detach().clone() for k in self._ema}
        else:
            checkpoint["vision_ft"]["ema"] = {k: v.detach().clone() for k, v in self._ema.items()}

    def _ema_from_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ema = checkpoint["vision_ft"].get("ema")
        if ema is None or self.ema_decay <= 0:
            return
        if self._trainer is not None and self.trainer.state.fn == "fit":  # resume: the average goes on
            self._ema = {k: v.clone() for k, v in ema.items()}
        else:  # validate/test/predict a checkpoint: evaluate the averaged weights
            checkpoint["state_dict"].update(ema)

    def _ema_into_model(self) -> None:
        """End of training: from here on (test after fit, adapter, export) the average is the model."""
        if self._ema is None:
            return
        if not self._ema_swapped:
            self._swap_ema()
        self._ema, self._ema_swapped = None, False
        rank_zero_info("[vision_ft] EMA weights copied into the model for test and export")
