"""Reference rows every comparison needs: linear probe and full fine-tuning.

Neither adds a tensor (empty ``prefix``); they differ only in the trainability flag the base
:class:`~vision_ft.methods.base.Method` reads: the probe trains no base weight, full
fine-tuning trains all of them (``trains_base_weights``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Method
from .registry import register

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import Backbone


@register
class LinearProbe(Method):
    """Linear probe: the backbone is frozen, only the task head trains.

    Anchor: FGVC 79.3 / VTAB group mean 57.6 on ViT-B/16 in21k (the linear-probing rows of the VTAB-1k tables).
    Nothing is added to the backbone, so there is nothing to merge and the
    output is the base model's at init. A task with its own policy for the base
    model (detection's ``freeze``) decides alone what else trains.
    """

    name = "linear"
    prefix = ""
    mergeable = True
    zero_init = True

    def __init__(self) -> None:
        pass

    def paper_parameters(self) -> dict[str, Any]:
        return {"value": 0, "precision": 1, "text": "0 (head only)", "compare": "trainable",
                "source": "linear probe row"}

    def apply(self, backbone: Backbone) -> None:
        self.freeze_and_mark(backbone)
        self.applied = True

    def merge(self, backbone: Backbone) -> None:
        self.merged = True


@register
class FullFineTuning(Method):
    """Full fine-tuning: every backbone parameter trains.

    Anchor: FGVC 88.5 / VTAB group 69.0, 85.8M parameters on ViT-B/16 (the full fine-tuning rows of the
    VTAB-1k tables).
    The adapter is the whole backbone state dict; "merge" is the identity. No weight
    decay on 1-D tensors and on what the backbone names (position embeddings, class
    tokens: ``Backbone.no_decay_parameter_names``).

    Args:
        train_patch_embed: also train the patch embedding, the backbone's stem
            (``Backbone.stem_parameter_names``; default true).
    """

    name = "full"
    prefix = ""
    mergeable = True
    zero_init = True
    trains_base_weights = True

    def __init__(self, train_patch_embed: bool = True) -> None:
        self.train_patch_embed = train_patch_embed

    def paper_parameters(self) -> dict[str, Any]:
        return {"value": 85_800_000, "precision": 100_000, "text": "85.8M", "compare": "trainable",
                "source": "full fine-tuning row of the VTAB-1k tables (SSF, SPT papers)"}

    def is_saved(self, name: str) -> bool:
        return True

    def apply(self, backbone: Backbone) -> None:
        if not self.train_patch_embed:
            self.frozen_base_weights = frozenset(backbone.stem_parameter_names())
        self.freeze_and_mark(backbone)
        self.applied = True

    def merge(self, backbone: Backbone) -> None:
        self.merged = True
