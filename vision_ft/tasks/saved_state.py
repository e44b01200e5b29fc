"""What of a task is saved and read back: adapters (method tensors + heads + metadata) and lean
checkpoints (the trainable state, method buffers, history, RNG and EMA; never the frozen backbone,
which the config names so resume rebuilds it), checked against the method and base weights."""

from __future__ import annotations

from typing import Any

import torch

from ..backbones import Backbone
from ..errors import AdapterError
from ..export import import_class
from .resume import rng_state


class SavedStateMixin:
    """Saving and loading of :class:`~vision_ft.tasks.base.BaseTask` (mixed into the LightningModule).

    Subclasses with more trainable state (detection's freeze policy) extend :meth:`saved_key`,
    :meth:`adapter_tensors` and :meth:`load_adapter_tensors`.
    """

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], backbone_overrides: dict[str, Any] | None = None) -> Any:
        backbone = cls.backbone_from_metadata(meta, backbone_overrides)
        return cls(backbone=backbone, method=meta["method_spec"], **meta.get("task_args", {}))

    @classmethod
    def merge_overrides(cls, meta: dict[str, Any]) -> dict[str, Any]:
        """Backbone overrides for ``export --merge`` (a run trained on quantised weights merges into the
        full-precision ones). Default: none."""
        return {}

    def export_peft(self, out_dir: Any) -> Any:
        """The adapter in HF peft's on-disk format (``export --format peft``); tasks add files their
        library users expect beside it (a language model's tokenizer)."""
        return self.method.save_peft(self.backbone, out_dir)

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
                                            "backbone_fingerprint", "task", "task_args", "class_names",
                                            "input_transform")}  # the last four: `predict --ckpt_path`
        checkpoint["vision_ft"]["history"] = self.history
        checkpoint["vision_ft"]["skipped_batches"] = self.skipped_batches
        checkpoint["vision_ft"]["rng"] = rng_state()
        self._ema_to_checkpoint(checkpoint)

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
        self._ema_from_checkpoint(checkpoint)

