"""What every task shares: backbone + method wiring, optimisation, lean checkpoints, run artifacts."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric

from ..backbones import Backbone
from ..errors import AdapterError, ConfigError, TrainingError
from ..export import import_class, save_adapter
from ..methods import Method, build_method

log = logging.getLogger("vision_ft")


class BaseTask(pl.LightningModule):
    """Base LightningModule: owns the backbone, the PEFT method and the optimiser.

    Args:
        backbone: a :class:`~vision_ft.backbones.Backbone` (``class_path`` in YAML).
        method: a registered method name (``ssf``, ``lora``, ``linear``, ``full``...)
            or a ``class_path`` with ``init_args``.
        lr: peak learning rate (after warm-up).
        weight_decay: AdamW weight decay; 1-D parameters and those the method
            exempts get none.
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
        if not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"model.init_args.ema_decay must be in [0, 1), got {ema_decay}")
        if on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"model.init_args.on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        self.ema_decay, self.on_nonfinite = float(ema_decay), on_nonfinite
        self._ema: dict[str, torch.Tensor] | None = None  # name -> averaged tensor (or live ones while swapped)
        self._ema_swapped = False
        self._skip_step = False
        self.skipped_batches = 0

    def _check_method_fits(self) -> None:
        """Refuse a method whose declared needs this task cannot serve, before it is applied."""
        m, task = self.method, type(self).__name__
        if m.requires_text_tower and not self.has_text_head:
            raise ConfigError(f"method {m.name!r} needs a CLIP backbone with a text tower and a task with a text head "
                              f"(vision_ft.tasks.CLIPClassificationTask or CLIPOODTask); {task} has none "
                              "(model.class_path / model.init_args.method)")
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

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], backbone_overrides: dict[str, Any] | None = None) -> "BaseTask":
        backbone = cls.backbone_from_metadata(meta, backbone_overrides)
        return cls(backbone=backbone, method=meta["method_spec"], **meta.get("task_args", {}))

    @staticmethod
    def backbone_from_metadata(meta: dict[str, Any], backbone_overrides: dict[str, Any] | None = None) -> Backbone:
        """The run's base model as it was before training (checked against its fingerprint)."""
        spec = meta["backbone"]
        init_args = {**spec.get("init_args", {}), **(backbone_overrides or {})}
        backbone = import_class(spec["class_path"])(**init_args)
        if backbone.fingerprint() != meta.get("backbone_fingerprint") and not backbone_overrides:
            raise AdapterError(
                f"the base weights rebuilt from {spec['init_args'].get('name')!r} differ from those the "
                "adapter was trained on (fingerprint mismatch); pass the original weights via "
                "backbone overrides (e.g. {'checkpoint': ...})"
            )
        return backbone

    # --- what is trained and saved -----------------------------------------------------
    def saved_key(self, key: str) -> bool:
        """Whether a key of ``self.state_dict()`` belongs in checkpoints and adapters."""
        if key.startswith("backbone.model."):
            return self.method.is_saved(key[len("backbone.model."):])
        return any(key.startswith(f"{name}.") for name in self.head_modules())

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"backbone.model.{k}": v for k, v in self.method.adapter_state_dict(self.backbone).items()}
        for name, module in self.head_modules().items():
            out.update({f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
        return out

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        prefix = "backbone.model."
        self.method.load_adapter(self.backbone, {k[len(prefix):]: v for k, v in tensors.items()
                                                 if k.startswith(prefix)})
        for name, module in self.head_modules().items():
            sub = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
            try:
                module.load_state_dict(sub, strict=True)
            except RuntimeError as e:
                raise AdapterError(f"adapter {name} does not fit this task: {str(e).splitlines()[0]} "
                                   "(different number of classes?)") from None

    def adapter_metadata(self) -> dict[str, Any]:
        return {
            "task": f"{type(self).__module__}.{type(self).__qualname__}",
            "method": self.method.name,
            "method_spec": self.method.spec(),
            "method_version": self.method.version,
            "backbone": self.backbone.spec(),
            "backbone_fingerprint": self.base_fingerprint,
            "weights_source": self.backbone.weights_source,
            "trainable_params": self.method.trainable_parameters(self.backbone),
            "head_params": sum(p.numel() for m in self.head_modules().values() for p in m.parameters()),
            **self._training_world(),
            **self.task_metadata(),
        }

    def _training_world(self) -> dict[str, Any]:
        if self._trainer is None:
            return {}
        out: dict[str, Any] = {"world_size": self.trainer.world_size}
        if getattr(self, "_trained_digest", None):
            out["weights_identical_on_all_ranks"] = True
            out["weights_digest"] = self._trained_digest
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self.saved_key(k)}
        checkpoint["vision_ft"] = {k: v for k, v in self.adapter_metadata().items()
                                   if k in ("method", "method_spec", "method_version", "backbone",
                                            "backbone_fingerprint")}
        checkpoint["vision_ft"]["history"] = self.history
        checkpoint["vision_ft"]["skipped_batches"] = self.skipped_batches
        checkpoint["vision_ft"]["rng"] = _rng_state()
        if self._ema is not None:
            params = dict(self.named_parameters())
            if self._ema_swapped:  # saved during validation: the live weights sit in self._ema
                for k, v in self._ema.items():
                    checkpoint["state_dict"][k] = v.detach().clone()
                checkpoint["vision_ft"]["ema"] = {k: params[k].detach().clone() for k in self._ema}
            else:
                checkpoint["vision_ft"]["ema"] = {k: v.detach().clone() for k, v in self._ema.items()}

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
        strategy, rank0 = self.trainer.strategy, self.trainer.is_global_zero
        digest = tensor_digest(self.method.adapter_state_dict(self.backbone))
        reference = strategy.broadcast(digest, src=0)
        if not strategy.reduce_boolean_decision(reference != digest, all=False):
            return
        state = strategy.broadcast(self.method.adapter_state_dict(self.backbone) if rank0 else None, src=0)
        if not rank0:
            self.method.load_adapter(self.backbone, state)
        rank_zero_info(f"[vision_ft] {self.method.name}: data-dependent set-up differed between ranks "
                       "(each saw its own data shard); rank 0's was sent to all ranks")
        self._require_same_on_all_ranks(
            self.method.adapter_state_dict(self.backbone),
            f"method {self.method.name!r} set-up still differs between ranks after syncing rank 0's")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("vision_ft")
        if info is None:
            raise AdapterError("checkpoint was not written by vision_ft (no 'vision_ft' section)")
        if info["method"] != self.method.name or info.get("method_version") != self.method.version:
            raise AdapterError(f"checkpoint is for method {info['method']!r} v{info.get('method_version')}, "
                               f"this model uses {self.method.name!r} v{self.method.version}")
        if info["backbone_fingerprint"] != self.base_fingerprint:
            raise AdapterError(
                f"checkpoint was trained on other base weights ({info['backbone']['init_args'].get('name')!r}, "
                f"fingerprint {info['backbone_fingerprint']} != {self.base_fingerprint}); "
                "set model.init_args.backbone to the backbone it was trained with"
            )
        # the method rebuilds what it created from data (e.g. SPT's allocation) and checks shapes
        prefix = "backbone.model."
        self.method.load_adapter(self.backbone, {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items()
                                                 if k.startswith(prefix)})
        self.method.prepared = True
        own = {k: v.shape for k, v in self.state_dict().items() if self.saved_key(k)}
        theirs = checkpoint["state_dict"]
        missing, extra = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
        bad = sorted(k for k in set(own) & set(theirs) if tuple(own[k]) != tuple(theirs[k].shape))
        if missing or extra or bad:
            first = (missing or extra or bad)[0]
            raise AdapterError(f"checkpoint does not fit this model: {len(missing)} missing, {len(extra)} "
                               f"unexpected, {len(bad)} misshapen tensors (first: {first})")
        self.history = info.get("history", {})
        fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        self._loader_states = fit_state.get("combined_loader") or []
        self._rng_to_restore = info.get("rng")
        self.skipped_batches = int(info.get("skipped_batches", 0))
        ema = info.get("ema")
        if ema is not None and self.ema_decay > 0:
            fitting = self._trainer is not None and self.trainer.state.fn == "fit"
            if fitting:  # resume: the average goes on from where it was
                self._ema = {k: v.clone() for k, v in ema.items()}
            else:  # validate/test/predict a checkpoint: evaluate the averaged weights
                checkpoint["state_dict"].update(ema)

    # --- rank safety -------------------------------------------------------------------
    def _require_same_on_all_ranks(self, tensors: dict[str, torch.Tensor], message: str) -> str:
        """Digest of ``tensors``; raises :class:`TrainingError` on every rank if any rank's differs."""
        digest = tensor_digest(tensors)
        if self._trainer is not None and self.trainer.world_size > 1:
            reference = self.trainer.strategy.broadcast(digest, src=0)
            if self.trainer.strategy.reduce_boolean_decision(reference != digest, all=False):
                raise TrainingError(f"{message} (rank {self.trainer.global_rank}: {digest}, rank 0: {reference})")
        return digest

    def _sharded(self) -> bool:
        from lightning.pytorch.strategies import FSDPStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)

    def _full_parameters(self):
        """Context in which every parameter holds its full value on every rank (FSDP), else a no-op.

        Under FSDP each rank holds a shard: reading the adapter's tensors outside this
        context would write a silently sharded (or empty) adapter.
        """
        import contextlib

        if not self._sharded():
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(self.trainer.strategy.model, writeback=False)

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
        groups = self.param_groups()
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(groups, lr=self.lr, momentum=0.9, nesterov=True)
        else:
            opt = torch.optim.AdamW(groups, lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_fraction * total)
        floor = self.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

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
        where = f"last good checkpoint: {last} (resume with --ckpt_path {last})" if last else "no checkpoint was written yet"
        raise TrainingError(
            f"non-finite training loss ({float(loss.detach().float().reshape(-1)[0])}) at step {self.global_step}, "
            f"epoch {self.current_epoch}; {where}. Lower model.init_args.lr, check the data, or set "
            "model.init_args.on_nonfinite=skip to skip such batches"
        )

    # --- exponential moving average of the trainable tensors ---------------------------
    def _ema_targets(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self.named_parameters() if p.requires_grad}

    def on_train_start(self) -> None:
        """Hand the checkpoint's position inside the epoch to resumable training loaders.

        Lightning 2.6 restores loader states only when the loaders are built after the
        checkpoint is read, but ``estimated_stepping_batches`` (our LR schedule) builds them
        first; the loaders' iterators are lazy, so passing the state here is still in time.
        """
        rng = getattr(self, "_rng_to_restore", None)
        if rng:  # dropout, drop-path, MoSA's expert draws... continue the interrupted stream
            _set_rng_state(rng)
            self._rng_to_restore = None
        states = getattr(self, "_loader_states", None)
        if not states:
            return
        loaders = self.trainer.train_dataloader
        flat = loaders if isinstance(loaders, (list, tuple)) else (
            list(loaders.values()) if isinstance(loaders, dict) else [loaders])
        stateful = [dl for dl in flat if hasattr(dl, "load_state_dict") and hasattr(dl, "state_dict")]
        for loader, state in zip(stateful, states):
            loader.load_state_dict(state)
        self._loader_states = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.ema_decay > 0 and self._ema is None and self._sharded():
            raise ConfigError("model.init_args.ema_decay is not supported with FSDP (sharded parameters); "
                              "use ddp or set ema_decay=0")
        if self.ema_decay > 0 and self._ema is None:
            self._ema = {k: p.detach().clone() for k, p in self._ema_targets().items()}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then the EMA update (before any callback sees the step, so a
        checkpoint written at this batch's end holds the matching average)."""
        super().optimizer_step(*args, **kwargs)
        if self._ema is not None and not self._skip_step:
            self._update_ema()
        self._skip_step = False

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
        if self._ema is not None:  # from here on (test after fit, adapter, export) the average is the model
            if not self._ema_swapped:
                self._swap_ema()
            self._ema, self._ema_swapped = None, False
            rank_zero_info("[vision_ft] EMA weights copied into the model for test and export")
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

    def write_plots(self, run_dir: Path) -> None:
        """Subclasses add their plots; the base writes the curves."""
        from ..plots import plot_curves

        if self.history:
            plot_curves(self.history, run_dir / "curves.png", title=f"{self.method.name}")


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (16 hex digits) over names, shapes, dtypes and exact values."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain containers (loadable with ``weights_only=True``)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                       float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
