"""The LoRA family: methods that are a low-rank update of frozen linears, and their HF peft twin.

Each is compared with ``peft``'s own LoRA (``get_peft_model`` on the plain timm
model) of the same rank on the same modules. timm fuses q, k, v into one ``qkv``
linear and peft adapts whole modules, so a method acting on q/k/v slices is
compared with peft LoRA on the fused ``qkv``. A new LoRA-like method joins the
comparison by adding an entry to :data:`EQUIVALENTS`.
"""

from __future__ import annotations

from typing import Any, Callable

from ..backbones import Backbone
from ..methods import PEGO, SNELL, CLIPLoRA, LoRA, Method, SPTLoRA


def _modules(backbone: Backbone, roles: list[str], blocks: list[int] | None = None) -> list[str]:
    blocks = list(range(backbone.num_blocks)) if blocks is None else list(blocks)
    names: list[str] = []
    for i in blocks:
        for role in roles:
            name = backbone.module_name(i, role)  # q / k / v -> the fused qkv
            if name not in names:
                names.append(name)
    return names


def _lora(m: LoRA, backbone: Backbone) -> dict[str, Any]:
    return {"r": m.r, "alpha": m.alpha, "modules": m.target_names(backbone),
            "note": "same rank, alpha and targets"}


def _pego(m: PEGO, backbone: Backbone) -> dict[str, Any]:
    r = m.num_modules * m.r
    return {"r": r, "alpha": float(r), "modules": _modules(backbone, m.targets),
            "note": f"rank N*r = {r} on the fused qkv (PEGO: {m.num_modules} x r={m.r} on {'+'.join(m.targets)} slices)"}


def _snell(m: SNELL, backbone: Backbone) -> dict[str, Any]:
    return {"r": m.r, "alpha": float(m.r), "modules": _modules(backbone, m.targets, m.blocks),
            "note": f"rank {m.r} on {'+'.join(m.targets)} (q/k/v as the fused qkv)"}


def _spt_lora(m: SPTLoRA, backbone: Backbone) -> dict[str, Any] | None:
    from ..methods.spt import STRUCTURED, score_sites

    codes = m.allocation_codes(backbone)
    if codes is None:
        return None
    sites = score_sites(backbone, m.vectors)
    names: list[str] = []
    for site, code in zip(sites, codes):
        if code == STRUCTURED and site.matrix and site.module not in names:
            names.append(site.module)
    if not names:
        return None
    return {"r": m.r, "alpha": float(m.r), "modules": names,
            "note": f"rank {m.r} on the {len(names)} modules SPT gave a LoRA (sparse deltas not in the twin)"}


def _clip_lora(m: CLIPLoRA, backbone: Backbone) -> dict[str, Any]:
    names: list[str] = []
    for site in m.sites(backbone):
        if site.ref.module not in names:
            names.append(site.ref.module)
    return {"r": m.r, "alpha": float(m.r), "modules": names,
            "note": f"rank {m.r} on the fused qkv (CLIP-LoRA: r={m.r} on {'+'.join(m.targets)} slices)"}


#: LoRA-like method class -> (method, backbone) -> rank / alpha / module names of its peft twin
EQUIVALENTS: dict[type[Method], Callable[[Any, Backbone], dict[str, Any] | None]] = {
    LoRA: _lora, PEGO: _pego, SNELL: _snell, SPTLoRA: _spt_lora, CLIPLoRA: _clip_lora,
}


def peft_equivalent(method: Method, backbone: Backbone) -> dict[str, Any] | None:
    """The peft LoRA a method is compared with, or None when it is not in the LoRA family."""
    for cls, fn in EQUIVALENTS.items():
        if isinstance(method, cls):
            return fn(method, backbone)
    return None


def in_lora_family(method: Method) -> bool:
    return any(isinstance(method, cls) for cls in EQUIVALENTS)


def build_peft_task(settings: Any, r: int, alpha: float, modules: list[str]) -> Any:
    """A classification task whose backbone is ``peft.get_peft_model(timm model, LoraConfig(...))``.

    The task's own method is the linear probe (nothing added, everything frozen);
    peft then adds its LoRA and marks only it trainable, exactly as a peft user does.
    """
    from peft import LoraConfig, get_peft_model

    from ..tasks import ImageClassificationTask
    from .common import make_backbone

    task = ImageClassificationTask(make_backbone(settings), method="linear", num_classes=settings.num_classes,
                                   lr=settings.lr)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(modules), lora_dropout=0.0, bias="none")
    task.backbone.model = get_peft_model(task.backbone.model, config)
    task.to(settings.torch_device)
    return task
