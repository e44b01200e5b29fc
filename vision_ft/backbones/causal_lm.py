"""Causal language models through transformers ``AutoModelForCausalLM`` (Llama, Qwen2, Phi-3 and the like).

Loading, in order of precedence:

- ``checkpoint``: a local folder written by ``save_pretrained`` (with its tokenizer files), or a ``.gguf``
  file (transformers dequantises GGUF weights on load; needs the ``gguf`` package);
- ``name`` + ``pretrained: true``: a hub id (needs hub access or a filled cache);
- a tiny preset (``llama_test_tiny``, ``qwen2_test_tiny``, ``phi3_test_tiny``): random weights and a
  tokenizer trained offline, for tests and the offline sample.

``quantization: nf4`` loads the weights in 4-bit NF4 with bitsandbytes (double quantisation by default),
the QLoRA set-up; the trainable adapter stays in full precision.

Where a role's weight lives is read from the model's own module names, so any decoder whose layers
have ``self_attn.{q,k,v,o}_proj`` (or a fused ``qkv_proj``) and ``mlp.{gate,up,down}_proj`` (or a fused
``gate_up_proj``, or ``fc1``/``fc2``) works without a per-architecture table. Roles: ``q k v qkv proj``
(attention), ``gate fc1 gate_up fc2`` (MLP: gate, up, the fused pair, down).
"""

from __future__ import annotations

import copy
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
from .causal_lm_presets import TINY_LM_PRESETS, tiny_tokenizer

_KEY = "backbone.init_args.checkpoint"


class CausalLM(Backbone):
    """A decoder-only language model and its tokenizer.

    Args:
        name: a tiny preset or a hub id (``Qwen/Qwen2.5-0.5B-Instruct``, ``meta-llama/Llama-3.2-1B-Instruct``...).
        pretrained: load the hub id's weights (hub access or a filled cache).
        checkpoint: local ``save_pretrained`` folder or ``.gguf`` file (wins over ``name``).
        quantization: ``none`` or ``nf4`` (bitsandbytes 4-bit, the QLoRA set-up).
        double_quant: quantise the NF4 scales again (QLoRA's double quantisation).
        compute_dtype: dtype of the 4-bit layers' matmuls (``float32``, ``bfloat16``, ``float16``).
        skip_modules: module names kept out of quantisation (``lm_head`` always is).
        gradient_checkpointing: recompute activations in the backward pass (memory for time).
        chat_template: a Jinja chat template replacing the tokenizer's (needed where it has none).
        init_seed: seed of the random initialisation (presets, ``pretrained: false``).
    """

    def __init__(
        self,
        name: str = "qwen2_test_tiny",
        pretrained: bool = False,
        checkpoint: str | None = None,
        quantization: Literal["none", "nf4"] = "none",
        double_quant: bool = True,
        compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        skip_modules: list[str] | None = None,
        gradient_checkpointing: bool = False,
        chat_template: str | None = None,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        if quantization not in ("none", "nf4"):
            raise ConfigError(f"backbone.init_args.quantization={quantization!r}: choose none or nf4")
        self.name, self.pretrained, self.checkpoint = name, pretrained, checkpoint
        self.quantization, self.double_quant, self.compute_dtype = quantization, double_quant, compute_dtype
        self.skip_modules = list(skip_modules or [])
        self.gradient_checkpointing, self.init_seed = gradient_checkpointing, init_seed
        self.chat_template_override = chat_template
        self.model, self.tokenizer = self._build()
        if chat_template:
            self.tokenizer.chat_template = chat_template
        if self.tokenizer.pad_token is None:  # padding needs an id; masks never derive from it
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.use_cache = False
        keep_differentiable_4bit(self.model)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._layout = self._read_layout()

    # --- loading --------------------------------------------------------------------------------
    def _build(self) -> tuple[nn.Module, Any]:
        if self.checkpoint:
            path = Path(os.path.expanduser(self.checkpoint))
            model, tok = self._from_local(path)
            self.weights_source = f"local checkpoint {self.checkpoint}"
            return model, tok
        if self.name in TINY_LM_PRESETS:
            if self.pretrained:
                raise BackboneError(f"the tiny preset {self.name!r} has no pretrained weights; set "
                                    "backbone.init_args.pretrained=false or a hub id as backbone.init_args.name")
            model, tok = self._preset()
            self.weights_source = (f"random init (seed {self.init_seed}) of the tiny preset {self.name!r}: not a "
                                   "trained language model; set backbone.init_args.checkpoint=/path/to/folder or "
                                   "backbone.init_args.name=<hub id> with pretrained=true")
            return model, tok
        if not self.pretrained:
            raise BackboneError(f"{self.name!r} (backbone.init_args.name) is not a tiny preset "
                                f"({sorted(TINY_LM_PRESETS)}); set backbone.init_args.pretrained=true to load its "
                                f"weights, or {_KEY}=/path/to/save_pretrained_folder")
        model, tok = self._from_pretrained(self.name, local_files_only=False)
        self.weights_source = f"pretrained {self.name} (transformers hub)"
        return model, tok

    def _quantization_config(self) -> Any:
        if self.quantization == "none":
            return None
        return nf4_config(self.double_quant, self.compute_dtype, ["lm_head", *self.skip_modules])

    def _from_pretrained(self, where: str, local_files_only: bool, gguf_file: str | None = None) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        extra = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            tok = AutoTokenizer.from_pretrained(where, local_files_only=local_files_only, **extra)
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=torch.float32, local_files_only=local_files_only,
                quantization_config=self._quantization_config(), **extra)
        except (ConfigError, BackboneError):
            raise
        except Exception as e:  # hub unreachable, not a causal LM, truncated weights, gguf missing
            hint = (f"Offline, set {_KEY}=/path/to/folder (written by save_pretrained, e.g. a snapshot of the "
                    "hub repository)" if not local_files_only else f"check {_KEY}")
            raise BackboneError(f"cannot load the causal LM {where!r}{' (' + gguf_file + ')' if gguf_file else ''}: "
                                f"{type(e).__name__}: {first_line(e)}. {hint}") from None
        return model.eval(), tok

    def _from_local(self, path: Path) -> tuple[Any, Any]:
        if path.is_file() and path.suffix == ".gguf":
            try:
                import gguf  # noqa: F401
            except ImportError:
                raise ConfigError(f"{_KEY}={self.checkpoint!r} is a GGUF file: pip install gguf") from None
            return self._from_pretrained(str(path.parent), local_files_only=True, gguf_file=path.name)
        if path.is_file():
            raise BackboneError(f"{_KEY}={self.checkpoint!r} is a file; give a save_pretrained folder or a .gguf file")
        if not path.is_dir():
            raise BackboneError(f"{_KEY}={self.checkpoint!r}: no such file or folder")
        if not (path / "config.json").is_file():
            raise BackboneError(f"{_KEY}={self.checkpoint!r} is a folder without config.json; give a folder written "
                                "by transformers' save_pretrained (or vision_ft export --merge)")
        return self._from_pretrained(str(path), local_files_only=True)

    def _preset(self) -> tuple[Any, Any]:
        from transformers import AutoConfig, AutoModelForCausalLM

        model_type, kwargs, style = TINY_LM_PRESETS[self.name]
        tok = tiny_tokenizer(style)
        kwargs = copy.deepcopy(kwargs)
        vocab = max(len(tok), kwargs.pop("vocab_size", 0))
        cfg = AutoConfig.for_model(model_type, vocab_size=vocab, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        if self.quantization == "none":
            return model.eval(), tok
        with tempfile.TemporaryDirectory() as tmp:  # the real path: quantised on load by transformers
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            return self._from_pretrained(tmp, local_files_only=True)

    # --- structure ------------------------------------------------------------------------------
    def _read_layout(self) -> dict[str, str]:
        return read_layout(self.model.get_submodule(f"{self._layers_path()}.0"))

    def _layers_path(self) -> str:
        for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
            try:
                sub = self.model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(sub, nn.ModuleList):
                return path
        raise BackboneError(f"{type(self.model).__name__}: no decoder layer list found (model.layers, ...)")

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.model.get_submodule(self._layers_path()))

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def roles(self) -> list[str]:
        """The roles this model's layers have (``q k v proj gate fc1 fc2`` for Llama, ``qkv proj gate_up fc2``
        for Phi-3)."""
        return list(self._layout)

    @property
    def default_lora_targets(self) -> list[str]:
        """Every projection of attention and MLP as whole modules (what ``lora`` adapts without ``targets``)."""
        return list(self._layout)

    def module_name(self, block: int, role: str) -> str:
        if role not in self._layout:
            raise ConfigError(missing_role(type(self.model).__name__, self._layout, role))
        return f"{self._layers_path()}.{block}.{self._layout[role]}"

    def weight_ref(self, block: int, role: str) -> WeightRef:
        cfg = self.model.config
        heads = cfg.num_attention_heads
        return weight_ref(self.blocks[block], f"{self._layers_path()}.{block}", self._layout, role, heads=heads,
                          kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                          head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                          intermediate=getattr(cfg, "intermediate_size", None), model_name=type(self.model).__name__)

    def norms(self, block: int) -> dict[str, nn.Module]:
        b = self.blocks[block]
        return {"norm1": b.input_layernorm, "norm2": b.post_attention_layernorm}

    def stem(self) -> nn.Module:
        raise ConfigError(f"{type(self.model).__name__} is a language model: it has no patch-embedding stem (its "
                          "token embedding is a lookup table, not adapted by stem-based methods such as ssf)")

    def stem_parameter_names(self) -> list[str]:
        """The token embedding (what ``train_patch_embed: false`` keeps frozen under full fine-tuning)."""
        own = {id(p) for p in self.model.get_input_embeddings().parameters()}
        return [n for n, p in self.model.named_parameters() if id(p) in own]

    def final_norm(self) -> nn.Module:
        decoder = self.model.get_decoder()
        norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None)
        if norm is None:
            raise ConfigError(f"{type(self.model).__name__}: no final norm found")
        return norm

    # --- compute --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V). Packed rows pass ``position_ids`` restarting at each sample and no
        ``attention_mask``: transformers then builds a block-diagonal causal mask (no attention across samples)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        raise ConfigError("a causal language model takes token ids, not images (use a text task: "
                          "vision_ft.tasks.CausalLMSFTTask)")

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise ConfigError("a causal language model has no image features (use vision_ft.tasks.CausalLMSFTTask)")

    # --- identity and export ------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        args = dict(name=self.name, pretrained=self.pretrained, checkpoint=self.checkpoint,
                    quantization=self.quantization, double_quant=self.double_quant,
                    compute_dtype=self.compute_dtype, skip_modules=self.skip_modules,
                    gradient_checkpointing=self.gradient_checkpointing, chat_template=self.chat_template_override,
                    init_seed=self.init_seed)
        return {"class_path": f"{__name__}.CausalLM", "init_args": args}

    def fingerprint(self) -> str:
        if self.quantization != "none":  # the packed 4-bit bytes differ in layout; the spec still names the weights
            return f"{super().fingerprint()}-nf4"
        return super().fingerprint()

    def save_native(self, out_dir: str | Path) -> Path:
        """``save_pretrained`` of the model and the tokenizer (with the chat template in use)."""
        return save_pretrained(self.model, out_dir, self.tokenizer)
