"""Base weights a task trains besides the method's tensors -- detection's freeze policy, the parts of a
vision-language model trained in full -- and how they are saved (checkpoints, adapter), read back and checked.

A task using :class:`TrainedPartsMixin` (mixed in before :class:`~vision_ft.tasks.base.BaseTask`) sets
``requires_grad`` on the base parameters it trains, then calls :meth:`TrainedPartsMixin._collect_trained_keys`;
from then on those tensors travel with the method's tensors everywhere the trainable state goes.
The backbone must offer ``part_of(name)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import AdapterError

_PREFIX = "backbone.model."


class TrainedPartsMixin:
    """Saving and loading of base weights trained besides the method's tensors."""

    _policy_keys: set[str] = set()
    _aliases: dict[str, str] = {}

    def policy_description(self) -> str:
        """How the error for an adapter or checkpoint that does not fit names this model."""
        return "this model"

    def _collect_trained_keys(self) -> None:
        """Record the trainable base tensors (after ``requires_grad`` is set) and tied-parameter aliases."""
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

    def trainable_report(self) -> dict[str, dict[str, int]]:
        """Trainable / total parameters per part of the model (and the method's own)."""
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
            raise AdapterError(f"{what} does not fit {self.policy_description()}: {len(missing)} missing, {len(bad)} "
                               f"misshapen tensors (first: {(missing or bad)[0]}); was it trained with other "
                               "trainable parts or data?")

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

