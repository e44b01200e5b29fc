"""What every task shares: backbone + method wiring, optimisation, lean checkpoints, run artifacts.

Adapters and lean checkpoints (:mod:`.saved_state`), the EMA (:mod:`.ema`), the non-finite-loss
policy (:mod:`.nonfinite`), tensor digests and rank checks (:mod:`.digests`), RNG / loader resume
state (:mod:`.resume`) and the optimiser and schedule (:mod:`.optim`) live in their own modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric

from ..backbones import Backbone
from ..errors import ConfigError
from ..export import save_adapter
from ..methods import Method, build_method
from .digests import RankSafetyMixin, tensor_digest
from .ema import EMAMixin
from .nonfinite import NonFiniteMixin
from .optim import make_optimizer, warmup_cosine
from .resume import restore_loader_states, set_rng_state
from .saved_state import SavedStateMixin

__all__ = ["BaseTask", "refuse_without_native_classifier", "tensor_digest"]


def refuse_without_native_classifier(backbone: Any, task: str) -> None:
    """Refuse, before anything trains, a backbone whose family cannot export "model + linear head on
    pooled features" natively (what ``export --merge`` of an image/frame classifier writes)."""
    if isinstance(backbone, Backbone) and not backbone.native_classifier_export:
        raise ConfigError(f"{task} with backbone {type(backbone).__name__}: this family has no native export "
                          "of an image classifier, so a trained run could not be exported; use a timm, open_clip "
                          "or transformers CLIP/SigLIP backbone (model.init_args.backbone.class_path)")


class BaseTask(SavedStateMixin, EMAMixin, NonFiniteMixin, RankSafetyMixin, pl.LightningModule):
    """Base LightningModule: owns the backbone, the PEFT method and the optimiser.

    Args:
        backbone: a :class:`~vision_ft.backbones.Backbone` (``class_path`` in YAML).
        method: a registered method name (``ssf``, ``lora``, ``linear``, ``full``...)
            or a ``class_path`` with ``init_args``.
        lr: peak learning rate (after warm-up).
        weight_decay: AdamW weight decay; 1-D parameters, those the method exempts and
            the backbone's ``no_decay_parameter_names`` (position embeddings, class tokens) get none.
        head_lr: learning rate of the task head (default: ``lr``).
        optimizer: ``adamw`` or ``sgd`` (nesterov, momentum 0.9).
        warmup_fraction: fraction of all optimiser steps spent in linear warm-up.
        min_lr_ratio: cosine decays to ``lr * min_lr_ratio``.
        ema_decay: exponential moving average of the trainable tensors (0 = off; 0.999
            or 0.9999 are usual). Validation during fit, the final test, the adapter and
            exports use the averaged weights; checkpoints keep both, so resume is exact.
        on_nonfinite: what a NaN/inf training loss does: ``stop`` (a clear error naming
            the step and the last checkpoint) or ``skip`` the batch (no optimiser step;
            counted and logged as ``train/skipped_batches``).
        class_names: the task's class names in label order, passed to the method
            (:meth:`~vision_ft.methods.Method.set_class_names`) before it is applied.
    """

    #: dotted path written to adapter.json; subclasses inherit it
    task_name = "base"
    #: the task has a CLIP text head built from class names (methods with ``requires_text_tower`` need it)
    has_text_head: ClassVar[bool] = False
    #: image batches, one normalised image per logits row in ``outputs["inputs"]``, a linear ``head`` on
    #: pooled features: what methods with ``needs_image_classification_task`` read
    is_image_classification: ClassVar[bool] = False
    #: noising, loss and sampling follow the method's ``in_context_plan`` (what ``needs_in_context_task`` needs)
    runs_in_context: ClassVar[bool] = False

    def __init__(
        self,
        backbone: Backbone,
        method: Method | str = "ssf",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        head_lr: float | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.0,
        ema_decay: float = 0.0,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise ConfigError("model.init_args.backbone must be a vision_ft Backbone (class_path)")
        self.backbone = backbone
        self.base_fingerprint = backbone.fingerprint()
        self.method = build_method(method)
        self._check_method_fits()
        if class_names is not None:
            self.method.set_class_names(class_names)
        self.method.apply(backbone)
        #: base parameters exempt from weight decay (position embeddings, class tokens), told by the backbone
        self.no_decay_names = frozenset(backbone.no_decay_parameter_names())
        self.lr, self.weight_decay, self.head_lr = lr, weight_decay, head_lr
        self.optimizer_name, self.warmup_fraction, self.min_lr_ratio = optimizer, warmup_fraction, min_lr_ratio
        self.strict_loading = False  # checkpoints hold the trainable state only
        self.train_loss_epoch = MeanMetric()
        self.history: dict[str, list[tuple[float, float]]] = {}
        self._init_ema(ema_decay)
        self._init_nonfinite(on_nonfinite)

    def _check_method_fits(self) -> None:
        """Refuse a method whose declared needs this task cannot serve, before it is applied."""
        m, task = self.method, type(self).__name__
        if m.requires_text_tower and not self.has_text_head:
            raise ConfigError(f"method {m.name!r} needs a CLIP backbone with a text tower and a task with a text head "
                              f"(vision_ft.tasks.CLIPClassificationTask or CLIPOODTask); {task} has none "
                              "(model.class_path / model.init_args.method)")
        if m.needs_in_context_task and not self.runs_in_context:
            raise ConfigError(f"method {m.name!r} places condition, buffer and target frames on a video model's time "
                              f"axis and needs vision_ft.tasks.VideoDiffusionTask; {task} would train its adapter "
                              "alone: use the adapter itself (model.init_args.method: lora)")
        if m.needs_image_classification_task and not self.is_image_classification:
            raise ConfigError(f"method {m.name!r} needs image batches and an image classification head "
                              f"(ImageClassificationTask); {task} has neither: use another method "
                              "(model.init_args.method: ssf, lora, adapter, adaptformer, pego, snell, linear, full)")

    # --- subclasses ---------------------------------------------------------------------
    def head_modules(self) -> dict[str, nn.Module]:
        """Task-owned trainable modules (heads), saved with the adapter."""
        return {}

    def task_metadata(self) -> dict[str, Any]:
        return {}

    def setup(self, stage: str) -> None:
        """Run the method's data-dependent preparation once, before the optimiser exists."""
        self._run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # all ranks, see run_dir
        if stage == "fit" and not self.method.prepared and self.trainer.ckpt_path is None:
            self._prepare_method()

    def _prepare_method(self) -> None:
        """``method.prepare`` once per run. Under DDP every rank prepares (a method may use
        collectives inside, as SPT does), but each rank's training loader holds a different
        shard: where the results differ, rank 0's set-up is sent to the others through
        ``load_adapter`` (the path resume uses) and checked equal on every rank."""
        datamodule = self.trainer.datamodule
        self.method.prepare(self, datamodule)
        if self.trainer.world_size == 1:
            return
        if not self._differs_from_rank_zero(self.method.adapter_state_dict(self.backbone)):
            return
        rank0 = self.trainer.is_global_zero
        state = self.trainer.strategy.broadcast(self.method.adapter_state_dict(self.backbone) if rank0 else None,
                                                src=0)
        if not rank0:
            self.method.load_adapter(self.backbone, state)
        rank_zero_info(f"[vision_ft] {self.method.name}: data-dependent set-up differed between ranks "
                       "(each saw its own data shard); rank 0's was sent to all ranks")
        self._require_same_on_all_ranks(
            self.method.adapter_state_dict(self.backbone),
            f"method {self.method.name!r} set-up still differs between ranks after syncing rank 0's")

    # --- optimisation -------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups: backbone/head x decay/no-decay (1-D, method-exempt and backbone-named tensors)."""
        decay, no_decay = [], []
        for name, p in self.backbone.model.named_parameters():
            if p.requires_grad:
                (no_decay if self.no_weight_decay(name, p) else decay).append(p)
        head_decay, head_no_decay = [], []
        for module in self.head_modules().values():
            for p in module.parameters():
                if p.requires_grad:
                    (head_no_decay if p.ndim <= 1 else head_decay).append(p)
        head_lr = self.head_lr or self.lr
        groups = [g for g in (
            {"params": decay, "weight_decay": self.weight_decay, "lr": self.lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": self.lr},
            {"params": head_decay, "weight_decay": self.weight_decay, "lr": head_lr},
            {"params": head_no_decay, "weight_decay": 0.0, "lr": head_lr},
        ) if g["params"]]
        return groups

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """Whether the backbone parameter ``name`` is exempt from weight decay: the method's rule (1-D
        tensors, its own exemptions) or the backbone's ``no_decay_parameter_names``."""
        return self.method.no_weight_decay(name, param) or name in self.no_decay_names

    def configure_optimizers(self):
        opt = make_optimizer(self.param_groups(), self.optimizer_name, self.lr)
        factor = warmup_cosine(self.trainer.estimated_stepping_batches, self.warmup_fraction, self.min_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def add_regularizers(self, loss: torch.Tensor, outputs: dict[str, Any], batch: Any) -> torch.Tensor:
        """The method's loss adjustment and named regularisers, each logged as ``train/<name>``."""
        outputs = {**outputs, "task": self}
        loss = self.method.adjust_loss(loss, outputs, batch)
        for name, value in self.method.regularizer(outputs, batch).items():
            self.log(f"train/{name}", value)
            loss = loss + value
        return loss

    # --- training loop --------------------------------------------------------------------
    def log_train_loss(self, loss: torch.Tensor, batch_idx: int, batch_size: int | None = None) -> None:
        """``train/loss`` on the progress bar, the epoch mean, and every 10th step in the history."""
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.train_loss_epoch.update(loss.detach())
        if self.global_step % 10 == 0:
            steps = max(1, self.trainer.num_training_batches)
            self.record("train/loss_step", loss.item(), x=self.current_epoch + batch_idx / steps)

    def on_train_start(self) -> None:
        """Continue an interrupted run's RNG streams and hand the loaders their position in the epoch."""
        rng = getattr(self, "_rng_to_restore", None)
        if rng:  # dropout, drop-path, MoSA's expert draws... continue the interrupted stream
            set_rng_state(rng)
            self._rng_to_restore = None
        states = getattr(self, "_loader_states", None)
        if states:
            restore_loader_states(self.trainer.train_dataloader, states)
            self._loader_states = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._start_ema()
        self.method.on_train_batch_start(self)
        if self._ema is not None:  # a method resized its tensors (SaRA's re-masking): their average restarts
            for name, p in self._ema_targets().items():
                if name in self._ema and self._ema[name].shape != p.shape:
                    self._ema[name] = p.detach().clone()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then the EMA update (before any callback sees the step, so a
        checkpoint written at this batch's end holds the matching average)."""
        super().optimizer_step(*args, **kwargs)
        if not self._step_was_skipped() and self._ema is not None:
            self._update_ema()

    # --- history and artifacts ---------------------------------------------------------
    def record(self, key: str, value: float, x: float | None = None) -> None:
        x = float(self.current_epoch) if x is None else x
        self.history.setdefault(key, []).append((x, float(value)))

    def on_fit_start(self) -> None:
        trainable = self.method.trainable_parameters(self.backbone)
        heads = sum(p.numel() for m in self.head_modules().values() for p in m.parameters())
        rank_zero_info(f"[vision_ft] backbone weights: {self.backbone.weights_source}")
        rank_zero_info(f"[vision_ft] method {self.method!r}: {trainable:,} trainable backbone "
                       f"parameters + {heads:,} head parameters")

    def on_train_epoch_end(self) -> None:
        if self.train_loss_epoch.update_called:
            self.record("train/loss", self.train_loss_epoch.compute().item())
        self.train_loss_epoch.reset()

    def on_validation_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        for key, value in self.trainer.callback_metrics.items():
            if key.startswith("val/") and value.numel() == 1:
                self.record(key, value.item())

    @property
    def run_dir(self) -> Path:
        """The run's output folder. Resolved in :meth:`setup` on every rank: ``trainer.log_dir``
        is a collective (a broadcast) under DDP, so rank-0-only code must not call it."""
        cached = getattr(self, "_run_dir", None)
        if cached is None:
            cached = self._run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        return cached

    def final_metrics(self, prefix: str) -> dict[str, float]:
        return {k: round(float(v), 6) for k, v in self.trainer.callback_metrics.items()
                if k.startswith(prefix) and v.numel() == 1}

    def on_train_end(self) -> None:
        self._ema_into_model()
        self.method.on_train_end(self)
        with self._full_parameters():  # FSDP: gather the shards on every rank (a collective)
            tensors = {k: v.detach().clone() for k, v in self.adapter_tensors().items()}
        if self.trainer.world_size > 1 and not self._sharded():
            # DDP keeps replicas in step; prove it before writing one of them
            self._trained_digest = self._require_same_on_all_ranks(
                tensors, "trained weights differ between ranks: the replicas diverged (a rank-dependent "
                "operation outside DDP's gradient sync?)")
        if self.trainer.fast_dev_run:
            rank_zero_info("[vision_ft] fast_dev_run: no adapter or plots written")
            return
        if self.trainer.is_global_zero:
            out = save_adapter(self, self.run_dir, self.final_metrics("val/"), tensors=tensors)
            self.write_plots(out)
            rank_zero_info(f"[vision_ft] adapter written to {out}")

    def export_native(self, out_dir: str | Path) -> Path:
        """The (merged) model in its library's native format (``export --merge``); tasks override."""
        from ..errors import AdapterError

        raise AdapterError(f"{type(self).__name__} has no native export; use vision_ft.load_adapter(RUN) instead")

    def write_plots(self, run_dir: Path) -> None:
        """Subclasses add their plots; the base writes the curves."""
        from ..plots import plot_curves

        if self.history:
            plot_curves(self.history, run_dir / "curves.png", title=f"{self.method.name}")

