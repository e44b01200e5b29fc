"""timm Vision Transformers behind the :class:`~vision_ft.backbones.base.Backbone` surface."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackboneError
from .base import Backbone, WeightRef, first_line, resolve_checkpoint

log = logging.getLogger("vision_ft")

#: Tiny architectures for tests and the offline sample: name -> (timm architecture, model args).
TINY_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_test_tiny": (
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0),
    ),
    "vit_test_small": (
        "vit_tiny_patch16_224",
        dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0),
    ),
}

_ROLE_PATHS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


class TimmViT(Backbone):
    """A timm ``VisionTransformer`` (any size, patch, image size), loaded from the hub,
    from a local checkpoint, or randomly initialised.

    Args:
        name: timm architecture (``vit_base_patch16_224``, with optional ``.tag``) or a
            tiny preset (``vit_test_tiny``, ``vit_test_small``).
        pretrained: fetch timm's pretrained weights for ``name`` (needs hub access or
            the hub cache).
        checkpoint: local weights in timm's native form: a ``.safetensors`` /
            ``.pth`` state dict or a folder holding ``model.safetensors`` (as written
            by ``export``). Takes precedence over ``pretrained``.
        img_size: input resolution; position embeddings are resampled by timm when
            loading weights trained at another size.
        model_args: extra keyword arguments for ``timm.create_model``.
        drop_path_rate: stochastic depth.
        grad_checkpointing: trade compute for activation memory.
        init_seed: seed of the random initialisation when no weights are loaded, so the
            frozen base is rebuilt identically when an adapter is loaded.
    """

    def __init__(
        self,
        name: str = "vit_base_patch16_224",
        pretrained: bool = False,
        checkpoint: str | None = None,
        img_size: int | None = None,
        model_args: dict[str, Any] | None = None,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        self.name = name
        self.pretrained = pretrained
        self.checkpoint = checkpoint
        self.img_size = img_size
        self.model_args = dict(model_args or {})
        self.drop_path_rate = drop_path_rate
        self.grad_checkpointing = grad_checkpointing
        self.init_seed = init_seed

        arch, args = TINY_PRESETS.get(name, (name, {}))
        args = {**args, **self.model_args}
        if img_size is not None:
            args["img_size"] = img_size
        args["drop_path_rate"] = drop_path_rate
        self.arch, self.create_args = arch, args
        if arch.split(".")[0] not in timm.list_models():
            raise BackboneError(
                f"unknown timm architecture {name!r} (backbone.init_args.name); "
                f"try e.g. vit_base_patch16_224 or a tiny preset {sorted(TINY_PRESETS)}"
            )
        self.model = self._build()
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        cfg = self.model.pretrained_cfg
        self.mean = tuple(cfg.get("mean", (0.5, 0.5, 0.5)))
        self.std = tuple(cfg.get("std", (0.5, 0.5, 0.5)))
        self.input_size = tuple(self.model.patch_embed.img_size)

    # --- loading -------------------------------------------------------------------
    def _build(self) -> nn.Module:
        arch, args = self.arch, self.create_args
        if self.checkpoint:
            path = _resolve_checkpoint(self.checkpoint)
            try:
                model = timm.create_model(
                    arch, pretrained=True, num_classes=0,
                    pretrained_cfg_overlay=dict(file=str(path), custom_load=False), **args,
                )
            except Exception as e:  # shape mismatch, missing keys, refused pickle
                raise BackboneError(
                    f"checkpoint {str(path)!r} does not fit backbone {self.name!r} "
                    f"(backbone.init_args.checkpoint / name): {first_line(e)}"
                ) from None
            self.weights_source = f"local checkpoint {path}"
            return model
        if self.pretrained:
            try:
                model = timm.create_model(arch, pretrained=True, num_classes=0, **args)
            except Exception as e:  # hub unreachable, cache empty, no weights for this name
                raise BackboneError(
                    f"pretrained weights for {arch!r} are not reachable "
                    f"({type(e).__name__}: {first_line(e)}). Offline, set "
                    "backbone.init_args.checkpoint=/path/to/weights.safetensors (timm state "
                    "dict) or backbone.init_args.pretrained=false for random init."
                ) from None
            tag = model.pretrained_cfg.get("tag") or ""
            self.weights_source = f"pretrained {arch}{'.' + tag if tag and '.' not in arch else ''} (timm hub)"
            return model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            model = timm.create_model(arch, pretrained=False, num_classes=0, **args)
        self.weights_source = (
            f"random init (seed {self.init_seed}): no pretrained weights requested; set "
            "backbone.init_args.checkpoint=... or backbone.init_args.pretrained=true with hub access"
        )
        return model

    # --- structure -----------------------------------------------------------------
    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    def module_name(self, block: int, role: str) -> str:
        if role in ("q", "k", "v"):
            role = "qkv"
        if role not in _ROLE_PATHS:
            raise KeyError(f"unknown role {role!r}; roles: q k v qkv proj fc1 fc2")
        return f"blocks.{block}.{_ROLE_PATHS[role]}"

    def weight_ref(self, block: int, role: str) -> WeightRef:
        name = self.module_name(block, role)
        if role in ("q", "k", "v"):  # row blocks of the fused qkv linear (3d x d)
            d = self.model.get_submodule(name).out_features // 3
            i = "qkv".index(role)
            return WeightRef(name, start=i * d, stop=(i + 1) * d, key=role)
        return WeightRef(name)

    def class_token(self) -> tuple[str, str] | None:
        """``cls_token``, seen by ``pos_drop`` (after the position embedding), or by ``norm_pre`` without one."""
        model = self.model
        if getattr(model, "cls_token", None) is None:
            return None
        if getattr(model, "pos_embed", None) is not None and isinstance(getattr(model, "pos_drop", None), nn.Module):
            return "cls_token", "pos_drop"
        if isinstance(getattr(model, "norm_pre", None), nn.Module):
            return "cls_token", "norm_pre"
        return None

    def norms(self, block: int) -> dict[str, nn.Module]:
        b = self.model.blocks[block]
        return {"norm1": b.norm1, "norm2": b.norm2}

    def stem(self) -> nn.Module:
        return self.model.patch_embed.proj

    def final_norm(self) -> nn.Module:
        norm = self.model.norm
        return self.model.fc_norm if isinstance(norm, nn.Identity) else norm

    # --- compute -------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear",
                                   align_corners=False, antialias=True)
        mean = images.new_tensor(self.mean).view(1, -1, 1, 1)
        std = images.new_tensor(self.std).view(1, -1, 1, 1)
        return (images - mean) / std

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model.forward_features(x)
        pooled = self.model.forward_head(tokens, pre_logits=True)
        return pooled, tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0]

    # --- identity ------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "init_args": dict(
                name=self.name, pretrained=self.pretrained, checkpoint=self.checkpoint,
                img_size=self.img_size, model_args=self.model_args,
                drop_path_rate=self.drop_path_rate, grad_checkpointing=self.grad_checkpointing,
                init_seed=self.init_seed,
            ),
        }

    native_classifier_export = True

    def save_classifier(self, out_dir: str | Path, head: nn.Linear, class_names: list[str]) -> Path:
        """The model with ``head`` as its classifier, in timm's hub layout (``model.safetensors`` +
        ``config.json``): ``timm.create_model("local-dir:OUT", pretrained=True)`` loads it alone."""
        import json

        from ..io import atomic_save_safetensors, atomic_write_text

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model, native = self.model, self.native_args()
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
        state.update({f"head.{k}": v for k, v in head.state_dict().items()})
        atomic_save_safetensors(state, out_dir / "model.safetensors", metadata={"format": "pt"})
        cfg = dict(model.pretrained_cfg)
        cfg.update(architecture=native["architecture"], num_classes=len(class_names), label_names=list(class_names))
        for key in ("url", "hf_hub_id", "file"):
            cfg.pop(key, None)
        config = {"architecture": native["architecture"], "num_classes": len(class_names),
                  "num_features": self.embed_dim, "global_pool": getattr(model, "global_pool", "token"),
                  "model_args": native["model_args"], "pretrained_cfg": cfg,
                  "label_names": list(class_names), "timm_version": timm.__version__}
        atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2, default=list) + "\n")
        return out_dir

    def native_args(self) -> dict[str, Any]:
        """Architecture and kwargs for ``timm.create_model`` that rebuild ``self.model``."""
        args = {k: v for k, v in self.create_args.items() if k != "drop_path_rate"}
        return {"architecture": self.arch.split(".")[0], "model_args": args}


def _resolve_checkpoint(checkpoint: str) -> Path:
    return resolve_checkpoint(checkpoint, ("model.safetensors", "pytorch_model.bin", "model.pth"))

