"""What the transformers-based language backbones (CausalLM, VisionLanguageModel) share: the NF4 (QLoRA)
quantisation config, keeping bitsandbytes' differentiable CPU path, and ``save_pretrained`` with the
generation cache switched back on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError


def nf4_config(double_quant: bool, compute_dtype: str, skip: list[str]) -> Any:
    """bitsandbytes 4-bit NF4 for transformers' ``from_pretrained``; ``skip``: module names kept in full
    precision (matched from the start of module paths, transformers' rule)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("backbone.init_args.quantization=nf4 needs bitsandbytes: pip install "
                          "'vision_ft[qlora]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype), llm_int8_skip_modules=skip)


def keep_differentiable_4bit(model: nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights for its CPU kernel at the first eval-mode forward and from then on
    multiplies through an op without a backward (a warning, then input gradients silently lost): training after
    any validation pass would break. Keep its dequantise-and-matmul path instead."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def save_pretrained(model: nn.Module, out_dir: str | Path, *companions: Any) -> Path:
    """``save_pretrained`` of ``model`` (generation cache on in the written config) and its companions
    (tokenizer, processor)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    try:
        model.save_pretrained(out)
    finally:
        model.config.use_cache = False
    for c in companions:
        c.save_pretrained(out)
    return out
