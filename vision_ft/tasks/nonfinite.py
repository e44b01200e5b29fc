"""What a NaN/inf training loss does (``model.init_args.on_nonfinite``): ``stop`` with an error that
names the step and the last good checkpoint, or ``skip`` the batch (no optimiser step, no EMA update;
counted, logged as ``train/skipped_batches`` and kept in checkpoints)."""

from __future__ import annotations

import logging

import torch

from ..errors import ConfigError, TrainingError

log = logging.getLogger("vision_ft")


class NonFiniteMixin:
    """The non-finite-loss policy of :class:`~vision_ft.tasks.base.BaseTask` (mixed into the LightningModule)."""

    on_nonfinite: str = "stop"
    skipped_batches: int = 0
    _skip_step: bool = False

    def _init_nonfinite(self, policy: str) -> None:
        if policy not in ("stop", "skip"):
            raise ConfigError(f"model.init_args.on_nonfinite must be 'stop' or 'skip', got {policy!r}")
        self.on_nonfinite, self.skipped_batches, self._skip_step = policy, 0, False

    def _step_was_skipped(self) -> bool:
        """Whether the batch whose optimiser step just ran was skipped; clears the mark."""
        skipped, self._skip_step = self._skip_step, False
        return skipped

    def checked_loss(self, loss: torch.Tensor) -> torch.Tensor | None:
        """``loss`` if finite on every rank; else stop with a clear error, or ``None`` to skip the batch.

        Returning ``None`` from ``training_step`` makes Lightning skip the backward pass and the
        optimiser step. Under DDP all ranks take the same decision (one bad rank skips all),
        so no rank waits on a gradient all-reduce the others skip.
        """
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return loss
        if self.on_nonfinite == "skip":
            self.skipped_batches += 1
            self._skip_step = True
            log.warning("[vision_ft] non-finite training loss at step %d: batch skipped (%d so far)",
                        self.global_step, self.skipped_batches)
            self.log("train/skipped_batches", float(self.skipped_batches))
            return None
        last = None
        if self._trainer is not None:
            for cb in self.trainer.checkpoint_callbacks:
                last = getattr(cb, "last_model_path", None) or getattr(cb, "best_model_path", None) or last
        where = (f"last good checkpoint: {last} (resume with --ckpt_path {last})" if last
                 else "no checkpoint was written yet")
        raise TrainingError(
            f"non-finite training loss ({float(loss.detach().float().reshape(-1)[0])}) at step {self.global_step}, "
            f"epoch {self.current_epoch}; {where}. Lower model.init_args.lr, check the data, or set "
            "model.init_args.on_nonfinite=skip to skip such batches"
        )
