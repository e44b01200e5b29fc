"""The LoRA family and its HF peft twin.

A method in the LoRA family (``Method.lora_family``) names its twin with ``Method.peft_twin``:
``peft``'s own LoRA (``get_peft_model`` on the plain timm model) of the same rank and input dropout
on the same modules. timm fuses q, k, v into one ``qkv`` linear and peft adapts whole modules, so a
method acting on q/k/v slices is compared with peft LoRA on the fused ``qkv``. A new method joins the
comparison from its own module; nothing here changes.
"""

from __future__ import annotations

from typing import Any

from ..backbones import Backbone
from ..methods import Method


def peft_equivalent(method: Method, backbone: Backbone) -> dict[str, Any] | None:
    """The peft LoRA a method is compared with, or None when it is not in the LoRA family."""
    return method.peft_twin(backbone) if type(method).lora_family else None


def in_lora_family(method: Method) -> bool:
    return type(method).lora_family


def build_peft_task(settings: Any, r: int, alpha: float, modules: list[str], dropout: float = 0.0) -> Any:
    """A classification task whose backbone is ``peft.get_peft_model(timm model, LoraConfig(...))``.

    The task's own method is the linear probe (nothing added, everything frozen);
    peft then adds its LoRA and marks only it trainable, exactly as a peft user does.
    """
    from peft import LoraConfig, get_peft_model

    from ..tasks import ImageClassificationTask
    from .common import make_backbone

    task = ImageClassificationTask(make_backbone(settings), method="linear", num_classes=settings.num_classes,
                                   lr=settings.lr)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(modules), lora_dropout=dropout, bias="none")
    task.backbone.model = get_peft_model(task.backbone.model, config)
    task.to(settings.torch_device)
    return task
