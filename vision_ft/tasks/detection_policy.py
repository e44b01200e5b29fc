"""Detection's freeze policy: which parts of the detector train besides the method's tensors, and
how that extra trainable state is saved (checkpoints, adapter) and read back.

The policies (all of what trains is the run's trainable state: checkpoints, adapter, EMA):

=================  =================================================================
``freeze``         trained besides the method's tensors
=================  =================================================================
``none``           everything (full fine-tuning; required with ``method: full``)
``backbone``       hybrid encoder + decoder + heads; the CNN backbone frozen
``backbone_encoder`` decoder (incl. query selection and box heads) + class heads
``all``            the class-dependent heads only (class scores, encoder score head,
                   denoising label embedding): the PEFT setting for ``lora``
=================  =================================================================

Default (``freeze: null``), read from the method's declared flags (never its name): ``none``
for a method that trains the base weights (``trains_base_weights``: ``full``, which requires
it), ``backbone`` for a method that adds no tensors (``adds_tensors`` false: ``linear``, the
"no registry method" path, where the policy alone decides), ``all`` for every method that adds
its own tensors (PEFT). A parameter trains when ``method.is_trainable(name)`` or its part is in
the policy's set. Frozen batch norms stay in eval mode, so their statistics never drift;
trainable ones are saved with their statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..errors import AdapterError
from ..methods import Method

FREEZE_POLICIES = {"none": {"backbone", "encoder", "decoder", "class_heads"},
                   "backbone": {"encoder", "decoder", "class_heads"},
                   "backbone_encoder": {"decoder", "class_heads"},
                   "all": {"class_heads"}}
_PREFIX = "backbone.model."


def default_freeze(method: Method) -> str:
    """The freeze policy a method gets when ``freeze`` is unset, from its declared flags: ``none`` when
    it trains the base weights, ``backbone`` when it adds no tensors (the policy alone decides what
    trains), ``all`` (class heads only besides the method's tensors) for a PEFT method."""
    if method.trains_base_weights:
        return "none"
    return "all" if method.adds_tensors else "backbone"


class FreezePolicyMixin:
    """What :class:`~vision_ft.tasks.detection.DetectionTask` trains and saves besides the method's
    tensors (mixed in before :class:`~vision_ft.tasks.base.BaseTask`); needs ``self.freeze``."""

    # --- what trains -------------------------------------------------------------------------
    def _apply_freeze_policy(self) -> None:
        parts = FREEZE_POLICIES[self.freeze]
        for name, p in self.backbone.model.named_parameters():
            if not self.method.is_trainable(name) and self.backbone.part_of(name) in parts:
                p.requires_grad_(True)
        if self.method.adds_tensors and self.freeze != "all":
            rank_zero_warn(f"method {self.method.name!r} adapts layers that freeze={self.freeze!r} also trains "
                           "in full; freeze=all is the usual PEFT setting")
        # trainable state outside the method: canonical parameter names (tied copies once) and the
        # running statistics of batch norms whose affine parameters train
        model = self.backbone.model
        keys = {n for n, p in model.named_parameters() if p.requires_grad and not self.method.is_saved(n)}
        for mname, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(
                    p.requires_grad for p in module.parameters(recurse=False)):
                keys.update(f"{mname}.{b}" for b, _ in module.named_buffers(recurse=False)
                            if not self.method.is_saved(f"{mname}.{b}"))
        self._policy_keys = keys
        # state-dict aliases of tied parameters (class/box heads are shared by two module paths)
        canonical = {id(p): n for n, p in model.named_parameters()}
        self._aliases = {f"{_PREFIX}{n}": f"{_PREFIX}{canonical[id(p)]}"
                         for n, p in model.named_parameters(remove_duplicate=False) if canonical[id(p)] != n}

    def train(self, mode: bool = True) -> Any:
        super().train(mode)
        if mode:
            self._freeze_batch_norm_statistics()
        return self

    def _freeze_batch_norm_statistics(self) -> None:
        """Frozen batch norms run in eval mode, so training never moves their running statistics."""
        for module in self.backbone.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters(recurse=False)):
                module.eval()

    def on_train_start(self) -> None:
        super().on_train_start()
        self._freeze_batch_norm_statistics()  # Lightning 2.6 keeps module modes as they are at fit start

    def on_train_epoch_start(self) -> None:
        self._freeze_batch_norm_statistics()

    def trainable_report(self) -> dict[str, dict[str, int]]:
        """Trainable / total parameters per part of the detector (and the method's own)."""
        report: dict[str, dict[str, int]] = {}
        for name, p in self.backbone.model.named_parameters():
            part = "method" if self.method.is_own(name) else self.backbone.part_of(name)
            row = report.setdefault(part, {"trainable": 0, "total": 0})
            row["total"] += p.numel()
            row["trainable"] += p.numel() if p.requires_grad else 0
        report["all"] = {k: sum(r[k] for r in report.values()) for k in ("trainable", "total")}
        return report

    # --- saved state: method tensors + policy-trained tensors --------------------------------
    def saved_key(self, key: str) -> bool:
        hidden = getattr(self, "_hide_policy", False)
        if key.startswith(_PREFIX) and key[len(_PREFIX):] in self._policy_keys and not hidden:
            return True
        return super().saved_key(key)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        out = super().adapter_tensors()
        state = self.backbone.model.state_dict()
        out.update({f"{_PREFIX}{k}": state[k].detach().clone() for k in sorted(self._policy_keys)})
        return out

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {f"{_PREFIX}{k}" for k in self._policy_keys}
        self._check_policy_tensors(own, {k: v for k, v in tensors.items() if k in own}, "adapter")
        super().load_adapter_tensors({k: v for k, v in tensors.items() if k not in own})
        state = self.backbone.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for k in own:
                state[k[len(_PREFIX):]].copy_(tensors[k])

    def _check_policy_tensors(self, own: set[str], theirs: dict[str, torch.Tensor], what: str) -> None:
        state = self.state_dict()
        missing = sorted(own - set(theirs))
        bad = sorted(k for k in theirs if tuple(theirs[k].shape) != tuple(state[k].shape))
        if missing or bad:
            raise AdapterError(f"{what} does not fit this detector (freeze={self.freeze!r}, {self.num_classes} "
                               f"classes): {len(missing)} missing, {len(bad)} misshapen tensors "
                               f"(first: {(missing or bad)[0]}); was it trained with another freeze policy or data?")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        self._sync_aliases(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        own = {f"{_PREFIX}{k}" for k in self._policy_keys}
        policy = {k: state.pop(k) for k in list(state) if k in own}
        self._check_policy_tensors(own, policy, "checkpoint")
        self._hide_policy = True  # the base checks the method's tensors only
        try:
            super().on_load_checkpoint(checkpoint)
        finally:
            self._hide_policy = False
            for k, v in policy.items():
                state.setdefault(k, v)  # the base may have put averaged (EMA) values there already
        self._sync_aliases(state)

    def _sync_aliases(self, state: dict[str, torch.Tensor]) -> None:
        """Tied tensors appear under two names; both must carry the same value (EMA swaps one)."""
        for alias, canonical in self._aliases.items():
            if canonical in state and alias in state:
                state[alias] = state[canonical]

