"""Vision-language models through transformers: LLaVA (and LLaVA-OneVision) and Qwen-VL (2, 2.5, 3).

Loading, in order of precedence: ``checkpoint`` (a local ``save_pretrained`` folder with its processor files),
``name`` + ``pretrained: true`` (a hub id), or a tiny preset (``qwen2_vl_test_tiny``, ``qwen2_5_vl_test_tiny``,
``qwen3_vl_test_tiny``, ``llava_test_tiny``, ``llava_onevision_test_tiny``: random weights, tokenizer trained offline, the family's
processor). ``AutoModelForImageTextToText`` picks the class from the folder's config, so a LLaVA folder may
hold any vision tower and language model transformers' LLaVA accepts.

Parts, named the same for every family: ``vision_tower``, ``projector`` (Qwen's ``visual.merger`` and
Qwen3-VL's deep-stack mergers; LLaVA's ``multi_modal_projector``), ``language_model`` (with ``lm_head``).
Blocks are the vision tower's layers then the language model's, in two towers ``vision`` and ``language``,
so the kit's methods select either with ``towers``. Roles are read from module names (see
:mod:`vision_ft.backbones._layers`): Qwen's fused vision ``attn.qkv`` exposes q/k/v as row slices.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import BackboneError, ConfigError, first_line
from ._transformers import keep_differentiable_4bit, nf4_config, save_pretrained
from ._layers import missing_role, read_layout, weight_ref
from .base import Backbone, WeightRef
from .vlm_presets import TINY_VLM_PRESETS, tiny_vl_config, tiny_vl_processor, tiny_vl_tokenizer

_KEY = "backbone.init_args.checkpoint"
PARTS = ("vision_tower", "projector", "language_model")
#: model_type -> dotted prefixes (inside the model) of each part; the projector is matched first
_PART_PREFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    "qwen": {"projector": ("model.visual.merger", "model.visual.deepstack_merger_list"),
             "vision_tower": ("model.visual",), "language_model": ("model.language_model", "lm_head")},
    # LLaVA-NeXT / OneVision's learned row separator ``image_newline`` joins the projector's output: a connector
    "llava": {"projector": ("model.multi_modal_projector", "model.image_newline"),
              "vision_tower": ("model.vision_tower",), "language_model": ("model.language_model", "lm_head")},
}
FAMILIES = {"qwen2_vl": "qwen", "qwen2_5_vl": "qwen", "qwen3_vl": "qwen", "llava": "llava",
            "llava_onevision": "llava"}
#: where each family's grounding coordinates live (rescaled to the original image by the grounding metrics)
COORDINATE_FRAMES = {"qwen2_vl": "0-1000", "qwen3_vl": "0-1000", "qwen2_5_vl": "resized-pixels",
                     "llava": "0-1000", "llava_onevision": "0-1000"}


class VisionLanguageModel(Backbone):
    """A transformers image-text-to-text model and its processor.

    Args:
        name: a tiny preset or a hub id (``Qwen/Qwen2.5-VL-3B-Instruct``, ``llava-hf/llava-1.5-7b-hf``...).
        pretrained: load the hub id's weights (hub access or a filled cache).
        checkpoint: local ``save_pretrained`` folder with the processor files (wins over ``name``).
        min_pixels / max_pixels: Qwen image resolution bounds in pixels (the image processor's ``size``).
        quantization: ``none`` or ``nf4`` (QLoRA); the vision tower and projector stay in full precision
            unless ``quantize_vision``.
        gradient_checkpointing: recompute activations in the backward pass; the input embeddings are made
            to require grad so adapters inside checkpointed frozen parts still receive gradients.
        chat_template: a Jinja template replacing the processor's.
        coordinate_frame: the frame of grounding coordinates in answers (``0-1000``, ``0-1``, ``pixels``,
            ``resized-pixels``); default the family's: Qwen2-VL / Qwen3-VL ``0-1000``, Qwen2.5-VL
            ``resized-pixels`` (pixels of the image as its processor resized it), LLaVA ``0-1000``.
    """

    def __init__(
        self,
        name: str = "qwen2_5_vl_test_tiny",
        pretrained: bool = False,
        checkpoint: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        quantization: Literal["none", "nf4"] = "none",
        double_quant: bool = True,
        compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        quantize_vision: bool = False,
        gradient_checkpointing: bool = False,
        chat_template: str | None = None,
        coordinate_frame: str | None = None,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        if quantization not in ("none", "nf4"):
            raise ConfigError(f"backbone.init_args.quantization={quantization!r}: choose none or nf4")
        self.name, self.pretrained, self.checkpoint = name, pretrained, checkpoint
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.quantization, self.double_quant, self.compute_dtype = quantization, double_quant, compute_dtype
        self.quantize_vision, self.gradient_checkpointing = quantize_vision, gradient_checkpointing
        self.chat_template_override, self.init_seed = chat_template, init_seed
        from ..metrics.grounding import FRAMES

        if coordinate_frame is not None and coordinate_frame not in FRAMES:
            raise ConfigError(f"backbone.init_args.coordinate_frame={coordinate_frame!r}: choose from {list(FRAMES)}")
        self.coordinate_frame_override = coordinate_frame
        self.model, self.processor = self._build()
        self.model_type = self.model.config.model_type
        if self.model_type not in FAMILIES:
            raise BackboneError(f"{self.model_type!r} models are not supported (backbone.init_args.name); "
                                f"supported: {sorted(FAMILIES)}")
        self.family = FAMILIES[self.model_type]
        tok = self.tokenizer
        if chat_template:
            tok.chat_template = chat_template
            self.processor.chat_template = chat_template
        if not getattr(tok, "chat_template", None) and getattr(self.processor, "chat_template", None):
            tok.chat_template = self.processor.chat_template
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self._bounds()
        vp = getattr(self.processor, "video_processor", None)
        if vp is not None and hasattr(vp, "cap_pixels_per_frame"):
            vp.cap_pixels_per_frame = True  # Qwen-VL: each frame's pixels capped as in the reference Qwen code
        self.model.config.use_cache = False
        keep_differentiable_4bit(self.model)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        self._towers = self._find_towers()

    # --- loading --------------------------------------------------------------------------------
    def _build(self) -> tuple[nn.Module, Any]:
        if self.checkpoint:
            path = Path(os.path.expanduser(self.checkpoint))
            if not path.is_dir():
                raise BackboneError(f"{_KEY}={self.checkpoint!r}: no such folder (a save_pretrained folder with "
                                    "its processor files)")
            if not (path / "config.json").is_file():
                raise BackboneError(f"{_KEY}={self.checkpoint!r} has no config.json; give a folder written by "
                                    "save_pretrained (or vision_ft export --merge)")
            self.weights_source = f"local checkpoint {self.checkpoint}"
            return self._from_pretrained(str(path), local_files_only=True)
        if self.name in TINY_VLM_PRESETS:
            if self.pretrained:
                raise BackboneError(f"the tiny preset {self.name!r} has no pretrained weights; set "
                                    "backbone.init_args.pretrained=false or a hub id as backbone.init_args.name")
            self.weights_source = (f"random init (seed {self.init_seed}) of the tiny preset {self.name!r}: not a "
                                   f"trained model; set {_KEY}=/path/to/folder or backbone.init_args.name=<hub id> "
                                   "with pretrained=true")
            return self._preset()
        if not self.pretrained:
            raise BackboneError(f"{self.name!r} (backbone.init_args.name) is not a tiny preset "
                                f"({sorted(TINY_VLM_PRESETS)}); set backbone.init_args.pretrained=true, or "
                                f"{_KEY}=/path/to/save_pretrained_folder")
        self.weights_source = f"pretrained {self.name} (transformers hub)"
        return self._from_pretrained(self.name, local_files_only=False)

    def _quantization_config(self) -> Any:
        if self.quantization == "none":
            return None
        # matched from the start of module names (transformers' rule); both module layouts of each family
        vision = ["model.visual", "model.vision_tower", "model.multi_modal_projector", "visual", "vision_tower",
                  "multi_modal_projector"]
        skip = ["lm_head"] if self.quantize_vision else ["lm_head", *vision]
        return nf4_config(self.double_quant, self.compute_dtype, skip)

    def _from_pretrained(self, where: str, local_files_only: bool) -> tuple[nn.Module, Any]:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(where, local_files_only=local_files_only)
            model = AutoModelForImageTextToText.from_pretrained(
                where, dtype=torch.float32, local_files_only=local_files_only,
                quantization_config=self._quantization_config())
        except (ConfigError, BackboneError):
            raise
        except Exception as e:  # hub unreachable, not an image-text model, missing processor files
            hint = (f"Offline, set {_KEY}=/path/to/folder (written by save_pretrained with its processor)"
                    if not local_files_only else f"check {_KEY}")
            raise BackboneError(f"cannot load the vision-language model {where!r}: {type(e).__name__}: "
                                f"{first_line(e)}. {hint}") from None
        return model.eval(), processor

    def _preset(self) -> tuple[nn.Module, Any]:
        from transformers import AutoModelForImageTextToText

        family = TINY_VLM_PRESETS[self.name]
        tok = tiny_vl_tokenizer(family)
        cfg = tiny_vl_config(family, tok, self.name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        processor = tiny_vl_processor(family, tok, self.min_pixels, self.max_pixels)
        if self.quantization == "none":
            return model.eval(), processor
        with tempfile.TemporaryDirectory() as tmp:  # the real path: quantised on load by transformers
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            return self._from_pretrained(tmp, local_files_only=True)

    def _bounds(self) -> None:
        """Apply ``min_pixels`` / ``max_pixels`` to a Qwen image processor's ``size`` (pixel counts)."""
        if self.min_pixels is None and self.max_pixels is None:
            return
        ip = getattr(self.processor, "image_processor", None)
        if self.family != "qwen" or ip is None:
            raise ConfigError("backbone.init_args.min_pixels / max_pixels apply to Qwen-VL image processors")
        size = dict(getattr(ip, "size", None) or {})
        if self.min_pixels is not None:
            size["shortest_edge"] = int(self.min_pixels)
        if self.max_pixels is not None:
            size["longest_edge"] = int(self.max_pixels)
        if size.get("shortest_edge", 0) > size.get("longest_edge", float("inf")):
            raise ConfigError(f"backbone.init_args.min_pixels={size['shortest_edge']} > max_pixels="
                              f"{size['longest_edge']}")
        ip.size = size

    # --- parts and structure ------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def part_of(self, name: str) -> str:
        """The part (``vision_tower``, ``projector``, ``language_model``) of a parameter name of ``self.model``."""
        prefixes = _PART_PREFIXES[self.family]
        for part in ("projector", "vision_tower", "language_model"):
            if any(name == p or name.startswith(p + ".") for p in prefixes[part]):
                return part
        return "language_model"

    def _find_towers(self) -> dict[str, str]:
        """Dotted names of the vision tower's and the language model's layer lists."""
        lm = "model.language_model.layers"
        if not isinstance(self.model.get_submodule(lm), nn.ModuleList):
            raise BackboneError(f"{type(self.model).__name__}: no language-model layer list at {lm}")
        root = _PART_PREFIXES[self.family]["vision_tower"][0]
        lists = [(n, m) for n, m in self.model.get_submodule(root).named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) and read_layout(m[0])]
        if not lists:
            raise BackboneError(f"{type(self.model).__name__}: no transformer layer list found in the vision tower")
        name = max(lists, key=lambda nm: len(nm[1]))[0]
        return {"vision": f"{root}.{name}", "language": lm}

    def tower_names(self) -> list[str]:
        return ["vision", "language"]

    def _index(self) -> list[tuple[str, int]]:
        return [(t, j) for t in ("vision", "language") for j in range(len(self.model.get_submodule(self._towers[t])))]

    @property
    def blocks(self) -> list[nn.Module]:
        return [self.model.get_submodule(self._towers[t])[j] for t, j in self._index()]

    @property
    def num_blocks(self) -> int:
        return len(self._index())

    def tower(self, block: int) -> str | None:
        return self._index()[block][0]

    def tower_block(self, block: int) -> int:
        return self._index()[block][1]

    def tower_blocks(self, tower: str) -> list[int]:
        """Indices (into ``blocks``) of one tower's blocks."""
        return [i for i, (t, _) in enumerate(self._index()) if t == tower]

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    def block_width(self, block: int) -> int:
        if self.tower(block) == "language":
            return self.embed_dim
        vc = self.model.config.vision_config
        return int(getattr(vc, "embed_dim", None) or vc.hidden_size)

    def _config_of(self, tower: str) -> Any:
        return self.model.config.get_text_config() if tower == "language" else self.model.config.vision_config

    def _layout(self, block: int) -> dict[str, str]:
        return read_layout(self.blocks[block])

    def module_name(self, block: int, role: str) -> str:
        layout = self._layout(block)
        if role not in layout:
            raise ConfigError(missing_role(f"the {self.tower(block)} tower", layout, role))
        tower, j = self._index()[block]
        return f"{self._towers[tower]}.{j}.{layout[role]}"

    def weight_ref(self, block: int, role: str) -> WeightRef:
        tower, j = self._index()[block]
        cfg = self._config_of(tower)
        heads = getattr(cfg, "num_attention_heads", None) or cfg.num_heads
        width = self.block_width(block)
        return weight_ref(self.blocks[block], f"{self._towers[tower]}.{j}", self._layout(block), role, heads=heads,
                          kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                          head_dim=getattr(cfg, "head_dim", None) or width // heads,
                          intermediate=getattr(cfg, "intermediate_size", None), model_name=f"the {tower} tower")

    #: ``lora`` without targets adapts the language model (the vision tower only when asked)
    default_lora_towers = ("language",)

    @property
    def default_lora_targets(self) -> list[str]:
        """Every whole projection of the language model's layers."""
        return list(read_layout(self.blocks[self.tower_blocks("language")[0]]))

    def norms(self, block: int) -> dict[str, nn.Module]:
        b = self.blocks[block]
        pairs = (("input_layernorm", "post_attention_layernorm"), ("layer_norm1", "layer_norm2"), ("norm1", "norm2"))
        for a, c in pairs:
            if hasattr(b, a) and hasattr(b, c):
                return {"norm1": getattr(b, a), "norm2": getattr(b, c)}
        raise ConfigError(f"no pre-norms found in block {block} of the {self.tower(block)} tower")

    def stem(self) -> nn.Module:
        raise ConfigError("a vision-language model's stems (patch embedding, token embedding) are not adapted by "
                          "stem-based methods here")

    def final_norm(self) -> nn.Module:
        return self.model.get_submodule("model.language_model.norm")

    def stem_parameter_names(self) -> list[str]:
        return []

    @property
    def coordinate_frame(self) -> str:
        return self.coordinate_frame_override or COORDINATE_FRAMES[self.model_type]

    def resized_size(self, image: Any) -> tuple[int, int]:
        """(width, height) of ``image`` as the processor feeds it to the model (Qwen: its grid of patches)."""
        ip = self.processor.image_processor
        if self.family == "qwen":
            thw = ip(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
            patch = int(ip.patch_size)
            return int(thw[2]) * patch, int(thw[1]) * patch
        size = getattr(ip, "crop_size", None) or ip.size
        return int(size.get("width") or size.get("shortest_edge")), int(size.get("height") or size.get("shortest_edge"))

    # --- compute ----------------------------------------------------------------------------------
    def forward(self, **inputs: Any) -> torch.Tensor:
        """Logits (B, L, V) of a processor batch (``input_ids``, ``attention_mask``, pixel inputs...)."""
        if self.model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl") and "pixel_values" in inputs \
                and "mm_token_type_ids" not in inputs:
            raise ConfigError("a Qwen-VL batch with images needs mm_token_type_ids from the processor (without it "
                              "Qwen2.5-VL silently drops its 3-D positions); keep it in the collator")
        return self.model(**inputs, use_cache=False).logits

    def vision_pass(self) -> torch.Tensor:
        """The sum of the image features (the vision tower and projector's outputs) of one blank image at the
        processor's smallest size. ``0 x`` this added to a text-only batch's loss makes every rank run the
        vision side at every step, which sharded strategies need: under ZeRO-3 or FSDP with the vision tower
        sharded, each of its modules gathers its weights from all ranks when it runs."""
        import inspect

        from PIL import Image

        ip = self.processor.image_processor
        side = int(getattr(ip, "patch_size", 14) or 14) * int(getattr(ip, "merge_size", 1) or 1) * 2
        enc = ip(images=[Image.new("RGB", (side, side))], return_tensors="pt")
        inner = self.model.model
        accepted = inspect.signature(inner.get_image_features).parameters
        device = next(self.model.parameters()).device
        out = inner.get_image_features(**{k: v.to(device) for k, v in enc.items() if k in accepted})

        def tensors(o: Any) -> list[torch.Tensor]:
            if torch.is_tensor(o):
                return [o] if o.is_floating_point() else []
            if isinstance(o, (list, tuple)):
                return [t for x in o for t in tensors(x)]
            if hasattr(o, "values"):
                return [t for x in o.values() for t in tensors(x)]
            return []

        return sum((t.float().sum() for t in tensors(out)), torch.zeros((), device=device))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        raise ConfigError("vision-language models take processor batches (vision_ft.data.ConversationData)")

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise ConfigError("vision-language models have no pooled image features here")

    # --- identity and export ------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        args = dict(name=self.name, pretrained=self.pretrained, checkpoint=self.checkpoint, min_pixels=self.min_pixels,
                    max_pixels=self.max_pixels, quantization=self.quantization, double_quant=self.double_quant,
                    compute_dtype=self.compute_dtype, quantize_vision=self.quantize_vision,
                    gradient_checkpointing=self.gradient_checkpointing, chat_template=self.chat_template_override,
                    coordinate_frame=self.coordinate_frame_override, init_seed=self.init_seed)
        return {"class_path": f"{__name__}.VisionLanguageModel", "init_args": args}

    def fingerprint(self) -> str:
        base = super().fingerprint()
        return f"{base}-nf4" if self.quantization != "none" else base

    def save_native(self, out_dir: str | Path) -> Path:
        """``save_pretrained`` of the model and the processor (tokenizer, image processor, chat template)."""
        self.processor.chat_template = self.tokenizer.chat_template
        return save_pretrained(self.model, out_dir, self.processor)
