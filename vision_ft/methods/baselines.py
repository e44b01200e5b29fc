"""Reference rows every comparison needs: linear probe and full fine-tuning."""

from __future__ import annotations

import torch

from ..backbones import Backbone
from .base import Method
from .registry import register


@register
class LinearProbe(Method):
    """Linear probe: the backbone is frozen, only the task head trains.

    Anchor (METHODS.md): FGVC 79.3 / VTAB group mean 57.6 on ViT-B/16 in21k.
    Nothing is added to the backbone, so there is nothing to merge and the
    output is the base model's at init.
    """

    name = "linear"
    prefix = ""
    mergeable = True
    zero_init = True

    def __init__(self) -> None:
        pass

    def apply(self, backbone: Backbone) -> None:
        self.freeze_and_mark(backbone)
        self.applied = True

    def merge(self, backbone: Backbone) -> None:
        self.merged = True


@register
class FullFineTuning(Method):
    """Full fine-tuning: every backbone parameter trains.

    Anchor (METHODS.md): FGVC 88.5 / VTAB group 69.0, 85.8M parameters on ViT-B/16.
    The adapter is the whole backbone state dict; "merge" is the identity.

    Args:
        train_patch_embed: also train the patch embedding (default true).
    """

    name = "full"
    prefix = ""
    mergeable = True
    zero_init = True

    def __init__(self, train_patch_embed: bool = True) -> None:
        self.train_patch_embed = train_patch_embed

    def is_trainable(self, name: str) -> bool:
        return self.train_patch_embed or not name.startswith("patch_embed.")

    def is_saved(self, name: str) -> bool:
        return True

    def apply(self, backbone: Backbone) -> None:
        self.freeze_and_mark(backbone)
        self.applied = True

    def merge(self, backbone: Backbone) -> None:
        self.merged = True

    def no_weight_decay(self, name: str, param: torch.nn.Parameter) -> bool:
        return param.ndim <= 1 or name in ("cls_token", "pos_embed", "reg_token")
