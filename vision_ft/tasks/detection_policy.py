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

from ..methods import Method
from .trained_parts import TrainedPartsMixin

FREEZE_POLICIES = {"none": {"backbone", "encoder", "decoder", "class_heads"},
                   "backbone": {"encoder", "decoder", "class_heads"},
                   "backbone_encoder": {"decoder", "class_heads"},
                   "all": {"class_heads"}}


def default_freeze(method: Method) -> str:
    """The freeze policy a method gets when ``freeze`` is unset, from its declared flags: ``none`` when
    it trains the base weights, ``backbone`` when it adds no tensors (the policy alone decides what
    trains), ``all`` (class heads only besides the method's tensors) for a PEFT method."""
    if method.trains_base_weights:
        return "none"
    return "all" if method.adds_tensors else "backbone"


class FreezePolicyMixin(TrainedPartsMixin):
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
        self._collect_trained_keys()

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

    def policy_description(self) -> str:
        return f"this detector (freeze={self.freeze!r}, {self.num_classes} classes)"
