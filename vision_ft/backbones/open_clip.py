"""open_clip CLIP models behind the :class:`~vision_ft.backbones.base.Backbone` surface, both towers exposed.

Block indexing: ``blocks`` lists the residual blocks of the towers named in ``towers``, visual
blocks first, then text blocks (``towers=["visual", "text"]``, the default: ``num_blocks`` = both
towers' depths). ``tower(i)`` says which tower block ``i`` belongs to and ``tower_block(i)`` its
index inside that tower. A method written for a ViT (``for i in range(num_blocks)``) therefore acts
on every exposed block; set ``towers: [visual]`` to restrict such a method to the image tower.

Roles inside a block: open_clip's default block uses ``torch.nn.MultiheadAttention``, which packs
q/k/v in one ``in_proj_weight`` (3d x d) parameter and reads it, and ``out_proj.weight``, directly
inside ``F.multi_head_attention_forward``: neither projection runs as an ``nn.Linear`` forward, so
a forward hook on them never fires. :meth:`OpenCLIP.weight_ref` therefore names, for ``q k v qkv
proj``, the parameter, its rows and the attention module that reads it (``reader``), so the site layer
wraps that attention; ``fc1``/``fc2`` are plain ``nn.Linear`` modules (``mlp.c_fc``/``mlp.c_proj``).

Export: :meth:`OpenCLIP.save_native` writes ``open_clip_config.json`` (``model_cfg`` +
``preprocess_cfg``) and ``open_clip_model.safetensors``, which
``open_clip.create_model("local-dir:OUT")`` loads natively.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackboneError
from .base import Backbone, TwoTowerBackbone, WeightRef, first_line, fold_patch_bias, resolve_checkpoint

log = logging.getLogger("vision_ft")

#: Tiny CLIP architectures for tests and offline samples (open_clip model-config dicts).
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "open_clip_test_tiny": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
}



class OpenCLIP(TwoTowerBackbone):
    """An open_clip CLIP model (image + text towers).

    Args:
        name: an open_clip model name (``ViT-B-16``, ``ViT-B-16-quickgelu`` for the OpenAI
            weights, ``ViT-L-14``...) or a tiny preset (``open_clip_test_tiny``).
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``...); needs hub
            access or open_clip's cache. ``None``: no download.
        checkpoint: local weights: an open_clip state dict (``.safetensors``, or a ``.pt``/``.bin``
            read with ``torch.load(weights_only=True)``), or a folder written by :meth:`save_native`.
            Takes precedence over ``pretrained``.
        towers: the towers whose blocks methods see, in this order of indices (see module doc).
        image_size: override the model's input resolution (position embeddings are resampled by
            open_clip when loading weights of another size).
        grad_checkpointing: trade compute for activation memory (both towers).
        init_seed: seed of the random initialisation when no weights are loaded, so the frozen
            base is rebuilt identically when an adapter is loaded.
    """

    def __init__(
        self,
        name: str = "ViT-B-16",
        pretrained: str | None = None,
        checkpoint: str | None = None,
        towers: list[str] = ["visual", "text"],  # noqa: B006 - jsonargparse needs a plain list default
        image_size: int | None = None,
        grad_checkpointing: bool = False,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        import open_clip

        self.name, self.pretrained, self.checkpoint = name, pretrained, checkpoint
        self.towers = list(towers)
        self.image_size, self.grad_checkpointing, self.init_seed = image_size, grad_checkpointing, init_seed
        self._check_towers(self.towers)
        if name in TINY_PRESETS:
            cfg = copy.deepcopy(TINY_PRESETS[name])
        else:
            cfg = open_clip.get_model_config(name)
            if cfg is None:
                raise BackboneError(f"unknown open_clip model {name!r} (backbone.init_args.name); e.g. ViT-B-16, "
                                    f"ViT-B-32, ViT-L-14, or a tiny preset {sorted(TINY_PRESETS)}")
            cfg = copy.deepcopy(cfg)
        if image_size is not None:
            cfg["vision_cfg"]["image_size"] = int(image_size)
        self.model_cfg = cfg
        self.model = self._build(open_clip)
        if not hasattr(self.model, "transformer") or not hasattr(self.model.visual, "transformer"):
            raise BackboneError(f"open_clip model {name!r} is not a ViT CLIP with a built-in text transformer; "
                                "only those are supported (backbone.init_args.name)")
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        pp = getattr(self.model.visual, "preprocess_cfg", None) or {}
        self.mean = tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))
        size = self.model.visual.image_size
        self.input_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.context_length = int(self.model.context_length)
        self.tokenizer = open_clip.SimpleTokenizer(context_length=self.context_length)
        self._index_towers()

    # --- loading -------------------------------------------------------------------
    def _random(self, open_clip) -> nn.Module:
        from open_clip.model import CLIP, set_model_preprocess_cfg

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            if self.name in TINY_PRESETS:
                model = CLIP(**copy.deepcopy(self.model_cfg))
                set_model_preprocess_cfg(model, {"size": self.model_cfg["vision_cfg"]["image_size"],
                                                 "mode": "RGB", "mean": open_clip.OPENAI_DATASET_MEAN,
                                                 "std": open_clip.OPENAI_DATASET_STD, "interpolation": "bicubic",
                                                 "resize_mode": "shortest", "fill_color": 0})
            else:
                model = open_clip.create_model(self.name, pretrained=None, force_image_size=self.image_size,
                                               pretrained_text=False)
        return model

    def _build(self, open_clip) -> nn.Module:
        if self.checkpoint:
            path = _resolve_checkpoint(self.checkpoint)
            model = self._random(open_clip)
            try:
                open_clip.load_checkpoint(model, str(path), weights_only=True)
            except Exception as e:  # shape mismatch, missing keys, refused pickle
                raise BackboneError(f"checkpoint {str(path)!r} does not fit open_clip model {self.name!r} "
                                    f"(backbone.init_args.checkpoint / name): {first_line(e)}") from None
            self.weights_source = f"local checkpoint {path}"
            return model
        if self.pretrained:
            if self.name in TINY_PRESETS:
                raise BackboneError(f"the tiny preset {self.name!r} has no pretrained weights; set "
                                    "backbone.init_args.pretrained=null or a real model name")
            try:
                model = open_clip.create_model(self.name, pretrained=self.pretrained,
                                               force_image_size=self.image_size)
            except Exception as e:  # hub unreachable, cache empty, unknown tag
                raise BackboneError(
                    f"open_clip weights {self.name!r} / {self.pretrained!r} are not reachable "
                    f"({type(e).__name__}: {first_line(e)}). Offline, set backbone.init_args.checkpoint="
                    "/path/to/open_clip_model.safetensors (an open_clip state dict) or "
                    "backbone.init_args.pretrained=null for random init.") from None
            self.weights_source = f"pretrained {self.name} / {self.pretrained} (open_clip)"
            return model
        model = self._random(open_clip)
        self.weights_source = (
            f"random init (seed {self.init_seed}): no pretrained weights requested; set "
            "backbone.init_args.checkpoint=... or backbone.init_args.pretrained=<open_clip tag> with hub access")
        return model

    # --- structure -----------------------------------------------------------------
    def _tower_prefix(self, tower: str) -> str:
        return "visual.transformer.resblocks" if tower == "visual" else "transformer.resblocks"

    def block_width(self, block: int) -> int:
        return int(self.blocks[block].ln_1.normalized_shape[0])

    @property
    def embed_dim(self) -> int:
        """Width of the joint image-text embedding (the pooled features)."""
        return int(self.model_cfg["embed_dim"])

    def module_name(self, block: int, role: str) -> str:
        tower, j = self._index[block]
        base = f"{self._tower_prefix(tower)}.{j}"
        paths = {"q": "attn", "k": "attn", "v": "attn", "qkv": "attn", "proj": "attn.out_proj",
                 "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}
        if role not in paths:
            raise KeyError(f"unknown role {role!r}; roles: q k v qkv proj fc1 fc2")
        return f"{base}.{paths[role]}"

    def weight_ref(self, block: int, role: str) -> WeightRef:
        name = self.module_name(block, role)
        if role in ("fc1", "fc2"):
            return WeightRef(name)
        attn = name.removesuffix(".out_proj")
        module = self.model.get_submodule(attn)
        if not isinstance(module, nn.MultiheadAttention) or not module._qkv_same_embed_dim:
            raise NotImplementedError(f"{attn} is a {type(module).__name__}; only nn.MultiheadAttention with a "
                                      "packed in_proj_weight is supported (open_clip's default block)")
        if role == "proj":  # out_proj.weight, read by the attention's forward (no nn.Linear call)
            return WeightRef(name, reader=attn)
        if role == "qkv":
            return WeightRef(attn, "in_proj_weight", "in_proj_bias", reader=attn)
        d = module.embed_dim
        i = "qkv".index(role)
        return WeightRef(attn, "in_proj_weight", "in_proj_bias", i * d, (i + 1) * d, key=role, reader=attn)

    def class_token(self) -> tuple[str, str] | None:
        """The image tower's ``class_embedding``, token 0 of ``patch_dropout``'s input (after the position
        embedding; patch dropout always keeps it); ``None`` when the visual tower is not exposed."""
        visual = self.model.visual
        if "visual" not in self.towers or getattr(visual, "class_embedding", None) is None \
                or not isinstance(getattr(visual, "patch_dropout", None), nn.Module):
            return None
        return "visual.class_embedding", "visual.patch_dropout"

    def norms(self, block: int) -> dict[str, nn.Module]:
        b = self.blocks[block]
        return {"norm1": b.ln_1, "norm2": b.ln_2}

    def stem(self) -> nn.Module:
        return self.model.visual.conv1

    def final_norm(self) -> nn.Module:
        return self.model.visual.ln_post

    def tower_parameters(self, tower: str) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` pairs of one tower, names relative to ``self.model`` (the shared
        ``logit_scale`` belongs to neither)."""
        if tower == "visual":
            return [(n, p) for n, p in self.model.named_parameters() if n.startswith("visual.")]
        return [(n, p) for n, p in self.model.named_parameters()
                if not n.startswith("visual.") and not n.startswith("logit_")]

    # --- compute -------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bicubic", align_corners=False,
                                   antialias=True).clamp(0, 1)
        mean = images.new_tensor(self.mean).view(1, -1, 1, 1)
        std = images.new_tensor(self.std).view(1, -1, 1, 1)
        return (images - mean) / std

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> projected image embeddings (B, embed_dim), not L2-normalised."""
        return self.model.encode_image(x)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.model.visual
        previous = visual.output_tokens
        visual.output_tokens = True
        try:
            pooled, tokens = visual(x)
        finally:
            visual.output_tokens = previous
        return pooled, tokens

    def dense_features(self, x: torch.Tensor, return_pooled: bool = False):
        """Normalised images -> per-patch features (B, N_patches, embed_dim) in the joint image-text space,
        class token dropped, not L2-normalised (GL-MCM / LoCoOp / Local-Prompt local features): with
        ``x`` the input of the last visual block, ``v = x + ls_1(out_proj(W_v ln_1(x) + b_v))``,
        ``v = v + ls_2(mlp(ln_2(v)))`` -- the last block with every token attending only to itself --
        then ``ln_post`` and ``proj``. ``return_pooled``: ``(encode_image(x), dense)`` from one pass."""
        visual = self.model.visual
        last = visual.transformer.resblocks[-1]
        attn = getattr(last, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim or hasattr(last, "ln_1_kv") \
                or getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False) \
                or getattr(visual, "pool_type", "tok") != "tok":
            raise NotImplementedError(f"dense_features needs a class-token open_clip ViT with the default residual "
                                      f"block; {self.name!r} is not one (backbone.init_args.name)")
        seen: list[torch.Tensor] = []
        handle = last.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            out = visual(x)
        finally:
            handle.remove()
        pooled = out[0] if isinstance(out, tuple) else out
        tokens = seen[-1] if getattr(visual.transformer, "batch_first", True) else seen[-1].transpose(0, 1)
        d = attn.embed_dim
        bias = attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None
        v = F.linear(last.ln_1(tokens), attn.in_proj_weight[2 * d:], bias)
        v = tokens + last.ls_1(F.linear(v, attn.out_proj.weight, attn.out_proj.bias))
        v = v + last.ls_2(last.mlp(last.ln_2(v)))
        dense = visual.ln_post(v)[:, 1:]
        if visual.proj is not None:
            dense = dense @ visual.proj
        return (pooled, dense) if return_pooled else dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_image(x)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Texts -> token ids (N, context_length) with open_clip's bundled BPE tokenizer (offline)."""
        return self.tokenizer(texts).to(self.model.logit_scale.device)

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(tokens)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> projected text embeddings (N, embed_dim), not L2-normalised."""
        return self.model.encode_text(tokens)

    def encode_text_embeddings(self, embeds: torch.Tensor, eot_indices: torch.Tensor) -> torch.Tensor:
        """Text tower from token embeddings (N, L, width) (CoOp's learnable prompts): the same
        computation as ``encode_text`` after the token lookup, pooled at ``eot_indices`` (N,)."""
        m = self.model
        x = embeds + m.positional_embedding[: embeds.shape[1]].to(embeds.dtype)
        mask = m.attn_mask[: embeds.shape[1], : embeds.shape[1]] if m.attn_mask is not None else None
        x = m.transformer(x, attn_mask=mask)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_indices]
        if m.text_projection is None:
            return x
        return m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection

    def count_tokens(self, text: str) -> int:
        """Number of BPE tokens of ``text`` without start/end tokens (CoOp's class-name length)."""
        return len(self.tokenizer.encode(text))

    def eot_indices(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position of the end-of-text token of each row (the highest id in CLIP's vocabulary)."""
        return tokens.argmax(dim=-1)

    def logit_scale(self) -> torch.Tensor:
        """The model's temperature ``exp(logit_scale)`` (100 for the released CLIP weights)."""
        return self.model.logit_scale.exp()

    # --- identity / export -----------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "init_args": dict(name=self.name, pretrained=self.pretrained, checkpoint=self.checkpoint,
                              towers=list(self.towers), image_size=self.image_size,
                              grad_checkpointing=self.grad_checkpointing, init_seed=self.init_seed),
        }

    def save_native(self, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the model as open_clip's local-dir layout (load: ``open_clip.create_model("local-dir:OUT")``)."""
        from ..io import atomic_save_safetensors, atomic_write_text

        out_dir = Path(out_dir)
        state = {k: v for k, v in self.model.state_dict().items()}
        if "visual.conv1.bias" in state and "visual.positional_embedding" in state:  # open_clip's conv1 has none
            state = fold_patch_bias(state, "visual.conv1.bias", "visual.positional_embedding",
                                    class_token="visual.class_embedding" in state)
        pp = dict(getattr(self.model.visual, "preprocess_cfg", {}) or {})
        pp = {k: list(v) if isinstance(v, tuple) else v for k, v in pp.items()}
        atomic_save_safetensors(state, out_dir / "open_clip_model.safetensors", metadata={"format": "pt"})
        doc = {"model_cfg": self.model_cfg, "preprocess_cfg": pp, "source_name": self.name, **(extra or {})}
        atomic_write_text(out_dir / "open_clip_config.json", json.dumps(doc, indent=2) + "\n")
        return out_dir

    native_classifier_export = True

    def save_classifier(self, out_dir: str | Path, head: nn.Linear, class_names: list[str]) -> Path:
        """open_clip's local-dir layout (:meth:`save_native`) + ``classifier_head.safetensors``
        (``weight`` (K, D), ``bias`` (K,)): ``logits = encode_image(x) @ weight.T + bias`` with
        ``open_clip.create_model("local-dir:OUT")`` reproduces the task's logits."""
        from ..io import atomic_save_safetensors

        out = self.save_native(out_dir, extra={"class_names": list(class_names),
                                               "classifier": {"file": CLASSIFIER_HEAD, "input": "encode_image"}})
        atomic_save_safetensors({k: v.detach().contiguous() for k, v in head.state_dict().items()},
                                out / CLASSIFIER_HEAD, metadata={"format": "pt"})
        return out


#: linear head of an exported image classifier (CLIP families), beside the model's own files
CLASSIFIER_HEAD = "classifier_head.safetensors"


def build_backbone_for_counts(name: str) -> Backbone:
    """A randomly initialised backbone for parameter counts (``python -m vision_ft methods --backbone``):
    an open_clip model name or tiny preset gives :class:`OpenCLIP`, a transformers CLIP/SigLIP tiny preset
    or known hub id (``openai/clip-vit-base-patch16``, ``google/siglip-base-patch16-224``...) ``HFCLIP``,
    a Stable Diffusion preset or known hub id (``sd_test_tiny``, ``stable-diffusion-v1-5/stable-diffusion-v1-5``)
    ``StableDiffusion``, a video diffusion preset (``wan_test_tiny``, ``cogvideox_test_tiny``) ``WanVideo`` /
    ``CogVideoX``, anything else ``TimmViT``."""
    import open_clip

    from .stable_diffusion import StableDiffusion, is_sd_name

    if is_sd_name(name):
        return StableDiffusion(name)
    from .cogvideox import TINY_PRESETS as COGVIDEOX_PRESETS
    from .video_diffusion import TINY_PRESETS as WAN_PRESETS

    if name in WAN_PRESETS or name in COGVIDEOX_PRESETS:  # video diffusion presets (hub ids need a download)
        from .cogvideox import CogVideoX
        from .video_diffusion import WanVideo

        return WanVideo(name) if name in WAN_PRESETS else CogVideoX(name)
    from .causal_lm_presets import TINY_LM_PRESETS

    if name in TINY_LM_PRESETS:  # causal LM presets (hub ids of language models need a download)
        from .causal_lm import CausalLM

        return CausalLM(name)
    from .vlm_presets import TINY_VLM_PRESETS

    if name in TINY_VLM_PRESETS:  # vision-language presets
        from .vlm import VisionLanguageModel

        return VisionLanguageModel(name)

    if name in TINY_PRESETS or open_clip.get_model_config(name) is not None:
        return OpenCLIP(name)
    from .hf_clip import HFCLIP
    from .hf_clip_presets import is_hf_clip_name

    if is_hf_clip_name(name):
        return HFCLIP(name)
    from .timm_vit import TimmViT

    return TimmViT(name, pretrained=False)


def _resolve_checkpoint(checkpoint: str) -> Path:
    return resolve_checkpoint(checkpoint, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors"))

