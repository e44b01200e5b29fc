"""LoRA (Hu et al., ICLR 2022) through HF peft on the backbone's linear layers.

``h = W x + (alpha / r) B A x`` with ``A`` Kaiming-uniform and ``B = 0``, so the
model is unchanged at init. Targets are roles (``qkv proj fc1 fc2``) resolved to
module names by the backbone, and peft injects its ``lora.Linear`` layers in
place: the model keeps its type. Merge goes through peft's ``merge_and_unload``.

Anchor (docs/methods/lora.md): LoRA-8 FGVC 86.0 / VTAB group 74.9. On ViT-B/16 with r=8
on the fused qkv of all 12 blocks: ``8 * (768 + 2304) * 12 = 294,912`` parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft import LoraConfig
from peft.tuners.lora import LoraModel

from ..errors import ConfigError
from .base import Method
from .registry import register

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import Backbone

_PEFT_ROLES = ("qkv", "q", "k", "v", "proj", "fc1", "fc2", "gate", "gate_up", "cross_q", "cross_k", "cross_v",
               "cross_proj")


@register
class LoRA(Method):
    """LoRA via HF peft.

    Args:
        r: rank (8 in the VTAB/FGVC baseline tables).
        alpha: scaling numerator; the update is scaled by ``alpha / r``.
        dropout: dropout on the LoRA input path.
        targets: roles to adapt, any of ``qkv q k v proj fc1 fc2 gate gate_up``; ``q``/``k``/``v`` need a
            backbone with separate projections (transformers models, the D-FINE detector), ``qkv``
            one with a fused projection (timm ViTs, Phi-3); ``gate`` the gate of a gated MLP (Llama,
            Qwen2), ``gate_up`` a fused gate+up projection (Phi-3), ``cross_q cross_k cross_v cross_proj``
            a cross-attention (the Stable Diffusion UNet's ``attn2``). Default: the backbone's own default
            targets (every projection of a language model; ``to_q, to_k, to_v, to_out.0`` of self- and
            cross-attention on Stable Diffusion, the diffusers convention; ``qkv`` on a ViT).
        blocks: indices of blocks to adapt (default: all).
        towers: adapt only blocks of these towers (``visual``/``text`` of CLIP, ``vision``/``language`` of a
            vision-language model); default: all, or the backbone's default towers when ``targets`` is unset.
    """

    name = "lora"
    prefix = "lora_"
    mergeable = True
    zero_init = True

    def __init__(
        self,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        targets: list[str] | None = None,
        blocks: list[int] | None = None,
        towers: list[str] | None = None,
    ) -> None:
        bad = [t for t in targets or [] if t not in _PEFT_ROLES]
        if bad:
            raise ConfigError(
                f"lora targets {bad} unknown (method.init_args.targets); choose from {list(_PEFT_ROLES)}"
            )
        if r < 1:
            raise ConfigError("method.init_args.r must be >= 1")
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.targets, self.blocks = None if targets is None else list(targets), blocks
        self.towers = None if towers is None else list(towers)
        self._tuner: LoraModel | None = None

    def roles(self, backbone: Backbone) -> list[str]:
        """``targets``, or the backbone's default LoRA targets when unset."""
        if self.targets is not None:
            return list(self.targets)
        return list(backbone.default_lora_targets)

    def target_names(self, backbone: Backbone) -> list[str]:
        blocks = range(backbone.num_blocks) if self.blocks is None else self.blocks
        towers = self.towers
        if towers is None and self.targets is None:  # the backbone's defaults: its targets in its towers
            towers = getattr(backbone, "default_lora_towers", None)
        if towers is not None:
            unknown = sorted(set(towers) - set(backbone.tower_names()))
            if unknown:
                raise ConfigError(f"lora towers {unknown} unknown (method.init_args.towers); this backbone has "
                                  f"{backbone.tower_names() or 'one tower'}")
            blocks = [i for i in blocks if backbone.tower(i) in towers]
        names = []
        for i in blocks:
            for role in self.roles(backbone):
                ref = backbone.weight_ref(i, role)
                if ref.reader is not None:
                    raise ConfigError(f"lora (HF peft) adapts modules that compute their own output; {ref.module} "
                                      f"({ref.param}) is read directly by {ref.reader}, so peft cannot adapt target "
                                      f"{role!r} (method.init_args.targets). Use clip_lora (or pego, snell) for it")
                if ref.key:
                    fused = "gate_up" if role in ("gate", "fc1") else "qkv"
                    raise ConfigError(f"lora target {role!r} is a slice of this backbone's fused {fused} projection "
                                      f"{ref.module} (method.init_args.targets); use {fused!r}")
                if ref.module not in names:
                    names.append(ref.module)
        return names

    lora_family = True
    bench_notes = {
        "time": "our lora is HF peft's own LoraModel, and measures the same as the peft twin (x peft twin column): "
                "a miss of the full-fine-tuning goal is peft LoRA's own cost on this machine, not one the kit adds.",
        "peft": "our lora is HF peft's own LoraModel injected in place, the same layers as the twin: the gap is "
                "timing noise (compare the spread column).",
    }

    def peft_twin(self, backbone: Backbone) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "modules": self.target_names(backbone),
                "note": "same rank, alpha, dropout and targets"}

    def peft_config(self, backbone: Backbone) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_names(backbone), bias="none")

    def apply(self, backbone: Backbone) -> None:
        # LoraModel injects in place; it is kept off the module tree so state-dict names
        # stay those of the library model.
        self._tuner = LoraModel(backbone.model, self.peft_config(backbone), "default")
        self.freeze_and_mark(backbone)
        self.applied = True

    def lora_layers(self, backbone: Backbone) -> dict[str, Any]:
        """peft's factors by module name, ``alpha / r`` folded into ``lora_B`` (dropout is a training-time
        input transform only, so the inference update is exactly ``B A x`` scaled)."""
        assert self._tuner is not None, "apply() first"
        scale = self.alpha / self.r
        out = {}
        for name, module in backbone.model.named_modules():
            a, b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
            if a is None or b is None or "default" not in a:
                continue
            out[f"{name}.lora_A.weight"] = a["default"].weight.detach().clone()
            out[f"{name}.lora_B.weight"] = (b["default"].weight.detach() * scale).clone()
        return out

    def save_peft(self, backbone: Backbone, out_dir: str | Path) -> Path:
        """peft's own files: the LoraConfig and the factors under PeftModel's key names (``base_model.model.``
        + the module path), so ``PeftModel.from_pretrained(base_model, out_dir)`` rebuilds this model."""
        assert self._tuner is not None, "apply() first"
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = self.peft_config(backbone)
        config.base_model_name_or_path = backbone.spec()["init_args"].get("name")
        config.save_pretrained(str(out))
        state = get_peft_model_state_dict(backbone.model, adapter_name="default")
        save_file({f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in state.items()},
                  str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        return out

    def merge(self, backbone: Backbone) -> None:
        assert self._tuner is not None, "apply() first"
        backbone.model = self._tuner.merge_and_unload()
        if hasattr(backbone.model, "peft_config"):
            del backbone.model.peft_config
        self._tuner = None
        self.merged = True
