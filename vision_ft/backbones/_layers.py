"""Where a role's weight lives inside a transformer layer of a transformers model, read from module names.

Language models (Llama, Qwen2, Mistral, Phi-3...) and the vision towers of vision-language models (CLIP,
SigLIP, DINOv2 and BERT-style ViTs, Qwen-VL's ViTs) name their projections in a handful of ways; reading the names once per layer list
replaces a table per architecture. Roles: ``q k v qkv proj`` (attention) and ``gate fc1 gate_up fc2`` (MLP:
gate, first/up, fused gate+up, second/down). Fused projections expose their parts as row slices.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .base import WeightRef

#: role -> candidate module names inside a layer, first match wins
CANDIDATES: dict[str, tuple[str, ...]] = {
    "q": ("self_attn.q_proj", "attn.q_proj", "attention.q_proj", "attention.attention.query"),
    "k": ("self_attn.k_proj", "attn.k_proj", "attention.k_proj", "attention.attention.key"),
    "v": ("self_attn.v_proj", "attn.v_proj", "attention.v_proj", "attention.attention.value"),
    "qkv": ("self_attn.qkv_proj", "self_attn.query_key_value", "self_attn.W_pack", "attn.qkv"),
    "proj": ("self_attn.o_proj", "self_attn.out_proj", "self_attn.dense", "attn.proj", "attn.o_proj",
             "attention.o_proj", "attention.output.dense"),
    "gate": ("mlp.gate_proj",),
    "fc1": ("mlp.up_proj", "mlp.fc1", "mlp.linear_fc1", "intermediate.dense"),
    "gate_up": ("mlp.gate_up_proj",),
    "fc2": ("mlp.down_proj", "mlp.fc2", "mlp.linear_fc2", "output.dense"),
}
_FUSED = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "fc1": "gate_up"}
_SPLIT = {"qkv": "q k v", "gate_up": "gate fc1"}


def read_layout(layer: nn.Module) -> dict[str, str]:
    """``role -> module name`` (relative to ``layer``) for every role the layer has."""
    have = {n for n, _ in layer.named_modules()}
    return {role: next(n for n in names if n in have) for role, names in CANDIDATES.items()
            if any(n in have for n in names)}


def missing_role(model_name: str, layout: dict[str, str], role: str) -> str:
    """The error text for a role the layer lacks, pointing at the role to use instead."""
    hint = ""
    if role in _SPLIT and all(r in layout for r in _SPLIT[role].split()):
        hint = f": it has separate projections, target {_SPLIT[role]}"
    elif _FUSED.get(role) in layout:
        hint = f": it fuses them, target {_FUSED[role]}"
    return f"{model_name} has no {role!r} projection{hint} (roles here: {' '.join(layout)})"


def weight_ref(layer: nn.Module, prefix: str, layout: dict[str, str], role: str, *, heads: int, kv_heads: int,
               head_dim: int, intermediate: int | None, model_name: str) -> WeightRef:
    """The :class:`WeightRef` of ``role`` in ``layer`` (dotted ``prefix`` inside the model); q/k/v of a fused
    ``qkv`` and gate/up of a fused ``gate_up`` are row slices (q rows, then k, then v; gate, then up)."""
    def bias(rel: str) -> str | None:
        return "bias" if getattr(layer.get_submodule(rel), "bias", None) is not None else None

    if role in layout:
        return WeightRef(f"{prefix}.{layout[role]}", bias=bias(layout[role]))
    if role in ("q", "k", "v") and "qkv" in layout:
        q, kv = heads * head_dim, kv_heads * head_dim
        start, stop = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}[role]
        return WeightRef(f"{prefix}.{layout['qkv']}", bias=bias(layout["qkv"]), start=start, stop=stop, key=role)
    if role in ("gate", "fc1") and "gate_up" in layout and intermediate:
        start, stop = (0, intermediate) if role == "gate" else (intermediate, 2 * intermediate)
        return WeightRef(f"{prefix}.{layout['gate_up']}", bias=bias(layout["gate_up"]), start=start, stop=stop,
                         key=role)
    raise ConfigError(missing_role(model_name, layout, role))
