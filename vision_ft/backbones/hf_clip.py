"""transformers CLIP and SigLIP models behind the :class:`~vision_ft.backbones.base.Backbone` surface.

:class:`HFCLIP` wraps a ``transformers.CLIPModel`` or ``transformers.SiglipModel`` (kept untouched
in type as ``self.model``) and offers the surface of
:class:`~vision_ft.backbones.open_clip.OpenCLIP`, so CLIP methods (CLIP-LoRA, CoOp...) and the CLIP
task are written once for both libraries.

Block indexing: as in ``OpenCLIP``, ``blocks`` lists the encoder layers of the towers named in
``towers``, visual blocks first, then text blocks; ``tower(i)`` / ``tower_block(i)`` say where
block ``i`` lives.

Roles inside a block: transformers keeps ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as
separate ``nn.Linear`` modules that run their own forward, so :meth:`HFCLIP.weight_ref` names plain
``nn.Linear`` modules for ``q k v proj fc1 fc2`` (sites hook their outputs, peft can target them by
name). There is no packed ``qkv`` module: asking for role ``qkv`` raises a ``ConfigError`` that
says to target ``q``, ``k``, ``v`` instead (SSF then scales q, k and v separately). Presets, known
architectures and the offline tokenizer: :mod:`vision_ft.backbones.hf_clip_presets`.

SigLIP (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023) differs from CLIP
in ways this wrapper follows rather than hides: the image tower has no class token and pools with
an attention-pooling head (its output is the joint embedding, there is no ``visual_projection``),
the text tower attends bidirectionally (no causal mask) and pools the *last* position of the
fixed-length (64) token sequence, and the logits carry a learned bias:
``logits = exp(t) * cos + b``. :meth:`HFCLIP.logit_scale` is ``exp(t)``; the CLIP task's logits
omit ``b`` (exposed as :meth:`HFCLIP.logit_bias`): a constant added to every class's logit changes
neither the softmax over classes nor the argmax, so the task's cross-entropy and predictions are
those of the full SigLIP logits.

Tokenizers (never a download at run time): a checkpoint folder or a hub id uses the model's own
tokenizer through ``AutoTokenizer``. CLIP's BPE is the vocabulary open_clip bundles
(``bpe_simple_vocab_16e6.txt.gz``); the tiny presets, and a CLIP whose tokenizer files are not
reachable, get a ``transformers.CLIPTokenizer`` built in memory from that file (logged). The real
SigLIP tokenizer is SentencePiece (``sentencepiece`` must be installed to read ``spiece.model``);
the tiny SigLIP preset instead tokenizes with CLIP's BPE, its text vocabulary sized to match
(49,408), padded to SigLIP's 64 positions: an architecture smoke test, not SigLIP's vocabulary.

Dense (patch) features, :meth:`HFCLIP.dense_features`: patch tokens projected into the joint
embedding space as Local-Prompt (Zeng et al., NeurIPS 2024) and GL-MCM (Miyai et al., 2023)
compute them for CLIP ViTs (their ``clip_w_local/model.py`` / ``clip/model.py``):
1. the image tower runs as usual through every block but the last;
2. in the last block each token keeps only the value path of attention, no softmax mixing:
   ``u = x + out_proj(v_proj(layer_norm1(x)))``, then the block's MLP with its residual,
   ``u = u + mlp(layer_norm2(u))``;
3. the tower's final norm (``post_layernorm``) and the visual projection, per token;
4. the class token is dropped: ``(B, N_patches, embed_dim)``.
Step 2 is computed by running the last encoder layer of transformers on each token as a sequence of
length one: attention over a single key is exactly its value path (softmax of one logit is 1), with
the layer's own residuals and MLP. For SigLIP (no class token, attention-pooling head instead of a
projection) steps 1-2 are the same, then ``post_layernorm`` and the pooling head applied to each
token alone, i.e. the head's value path (``out_proj`` of the value of the token) followed by its
residual MLP: the analogue of the value-path trick for an attention-pooled tower (an extension of
this kit; Local-Prompt and GL-MCM define it for CLIP only).

Export: :meth:`HFCLIP.save_native` writes ``save_pretrained`` (``config.json`` +
``model.safetensors``), the tokenizer files and ``preprocessor_config.json``, so
``CLIPModel.from_pretrained(OUT)`` / ``SiglipModel.from_pretrained(OUT)``, ``AutoTokenizer`` and
``AutoImageProcessor`` load it natively; ``extra`` goes to ``vision_ft_native.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackboneError, ConfigError
from .base import TwoTowerBackbone, WeightRef, fold_patch_bias
from .hf_clip_loading import HFCLIPLoading
from .hf_clip_presets import (_FAMILY_MEAN_STD, _FAMILY_RESAMPLE, NATIVE_META)

log = logging.getLogger("vision_ft")


class HFCLIP(HFCLIPLoading, TwoTowerBackbone):
    """A transformers CLIP (``CLIPModel``) or SigLIP (``SiglipModel``), both towers exposed.

    Args:
        name: a hub id (``openai/clip-vit-base-patch16``, ``google/siglip-base-patch16-224``...)
            or a tiny preset (``hf_clip_test_tiny``, ``hf_siglip_test_tiny``).
        pretrained: load the hub weights of ``name`` (``from_pretrained``; needs hub access or the
            hub cache). ``false``: random init, no download.
        checkpoint: local weights: a folder written by ``save_pretrained`` (or :meth:`save_native`;
            its own config.json sets the architecture), or a ``.safetensors`` state dict of the
            ``name`` architecture (``.pt``/``.bin`` read with ``torch.load(weights_only=True)``).
            Takes precedence over ``pretrained``.
        towers: the towers whose blocks methods see, in this order of indices (see module doc).
        image_size: override the model's input resolution (loaded position embeddings are
            resampled with transformers' own bicubic interpolation and the config updated, so the
            native export loads at the new size).
        grad_checkpointing: trade compute for activation memory (both towers).
        init_seed: seed of the random initialisation when no weights are loaded, so the frozen
            base is rebuilt identically when an adapter is loaded.
    """

    def __init__(
        self,
        name: str = "openai/clip-vit-base-patch16",
        pretrained: bool = False,
        checkpoint: str | None = None,
        towers: list[str] = ["visual", "text"],  # noqa: B006 - jsonargparse needs a plain list default
        image_size: int | None = None,
        grad_checkpointing: bool = False,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        self.name, self.pretrained, self.checkpoint = name, bool(pretrained), checkpoint
        self.towers = list(towers)
        self.image_size, self.grad_checkpointing, self.init_seed = image_size, grad_checkpointing, init_seed
        self._check_towers(self.towers)
        self._image_cfg: dict[str, Any] = {}
        self.model = self._build()
        self.family = "clip" if type(self.model).__name__ == "CLIPModel" else "siglip"
        if image_size is not None and int(image_size) != self._config_image_size():
            self._resize_positions(int(image_size))
        if grad_checkpointing:  # non-reentrant: frozen inputs need no requires_grad trick
            if hasattr(self.model, "activation_checkpointing_enable"):
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        mean, std = _FAMILY_MEAN_STD[self.family]
        self.mean = tuple(float(v) for v in self._image_cfg.get("image_mean", mean))
        self.std = tuple(float(v) for v in self._image_cfg.get("image_std", std))
        self.resample = int(self._image_cfg.get("resample", _FAMILY_RESAMPLE[self.family]))
        size = self._config_image_size()
        self.input_size = (size, size)
        self.context_length = int(self.model.config.text_config.max_position_embeddings)
        self.tokenizer, self.tokenizer_source = self._load_tokenizer()
        self._index_towers()

    # --- structure -----------------------------------------------------------------
    def _tower_prefix(self, tower: str) -> str:
        return "vision_model.encoder.layers" if tower == "visual" else "text_model.encoder.layers"

    def block_width(self, block: int) -> int:
        return int(self.blocks[block].layer_norm1.normalized_shape[0])

    @property
    def embed_dim(self) -> int:
        """Width of the joint image-text embedding (the pooled features)."""
        if self.family == "clip":
            return int(self.model.config.projection_dim)
        return int(self.model.config.vision_config.hidden_size)  # SigLIP's pooling head keeps the width

    def module_name(self, block: int, role: str) -> str:
        tower, j = self._index[block]
        paths = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                 "proj": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
        if role == "qkv":
            raise ConfigError(
                f"{self._tower_prefix(tower)}.{j}.self_attn has separate q_proj / k_proj / v_proj linears and no "
                "packed qkv module (transformers CLIP/SigLIP); target the roles q, k, v instead "
                "(model.init_args.method.init_args.targets), or use a method that acts per projection")
        if role not in paths:
            raise KeyError(f"unknown role {role!r}; roles: q k v qkv proj fc1 fc2")
        return f"{self._tower_prefix(tower)}.{j}.{paths[role]}"

    def weight_ref(self, block: int, role: str) -> WeightRef:
        return WeightRef(self.module_name(block, role))

    def norms(self, block: int) -> dict[str, nn.Module]:
        b = self.blocks[block]
        return {"norm1": b.layer_norm1, "norm2": b.layer_norm2}

    def stem(self) -> nn.Module:
        return self.model.vision_model.embeddings.patch_embedding

    def final_norm(self) -> nn.Module:
        return self.model.vision_model.post_layernorm

    def tower_parameters(self, tower: str) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` pairs of one tower, names relative to ``self.model`` (the shared
        ``logit_scale`` / ``logit_bias`` belong to neither)."""
        visual = ("vision_model.", "visual_projection.")
        if tower == "visual":
            return [(n, p) for n, p in self.model.named_parameters() if n.startswith(visual)]
        return [(n, p) for n, p in self.model.named_parameters()
                if not n.startswith(visual) and not n.startswith("logit_")]

    # --- compute -------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.input_size:
            mode = "bilinear" if self.resample == 2 else "bicubic"
            images = F.interpolate(images, size=self.input_size, mode=mode, align_corners=False,
                                   antialias=True).clamp(0, 1)
        mean = images.new_tensor(self.mean).view(1, -1, 1, 1)
        std = images.new_tensor(self.std).view(1, -1, 1, 1)
        return (images - mean) / std

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> projected image embeddings (B, embed_dim), not L2-normalised."""
        return self.model.get_image_features(pixel_values=x).pooler_output

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected pooled embedding (B, embed_dim), patch tokens after the final norm (B, N, width)),
        one pass through the image tower."""
        vm = self.model.vision_model
        out = vm(pixel_values=x)
        if self.family == "clip":
            tokens = vm.post_layernorm(out.last_hidden_state[:, 1:])
            return self.model.visual_projection(out.pooler_output), tokens
        return out.pooler_output, out.last_hidden_state  # SigLIP: already normed, no class token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_image(x)

    def dense_features(self, x: torch.Tensor, return_pooled: bool = False
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalised images -> patch features in the joint embedding space (B, N_patches, embed_dim),
        not L2-normalised: the last block's value path only (Local-Prompt / GL-MCM; module doc).
        ``return_pooled``: ``(encode_image(x), patch features)`` from one pass through the blocks
        before the last (the last block then runs both ways)."""
        vm = self.model.vision_model
        h = vm.embeddings(x)
        if self.family == "clip":
            h = vm.pre_layrnorm(h)
        layers = vm.encoder.layers
        for layer in layers[:-1]:  # the vision encoder runs without an attention mask
            h = layer(h, None)
        b, n, d = h.shape
        v = layers[-1](h.reshape(b * n, 1, d), None).reshape(b, n, d)  # one key: attention = value path
        v = vm.post_layernorm(v)
        if self.family == "clip":
            dense = self.model.visual_projection(v[:, 1:])
        else:
            dense = vm.head(v.reshape(b * n, 1, d)).reshape(b, n, -1)
        if not return_pooled:
            return dense
        full = layers[-1](h, None)
        if self.family == "clip":
            return self.model.visual_projection(vm.post_layernorm(full[:, 0])), dense
        return vm.head(vm.post_layernorm(full)), dense

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Texts -> token ids (N, context_length), padded to the full context (CLIP: 77, SigLIP: 64,
        as the models were trained) with the model's tokenizer."""
        tok = self._require_tokenizer()
        ids = tok(list(texts), padding="max_length", max_length=self.context_length, truncation=True,
                  return_tensors="pt").input_ids
        return ids.to(self.model.logit_scale.device)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise BackboneError(f"{self.name}: {self.tokenizer_source}")
        return self.tokenizer

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.text_model.embeddings.token_embedding(tokens)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> projected text embeddings (N, embed_dim), not L2-normalised."""
        return self.model.get_text_features(input_ids=tokens).pooler_output

    def encode_text_embeddings(self, embeds: torch.Tensor, eot_indices: torch.Tensor) -> torch.Tensor:
        """Text tower from token embeddings (N, L, width) (CoOp's learnable prompts): the same
        computation as ``encode_text`` after the token lookup (transformers' own embeddings with
        ``inputs_embeds``, attention mask, encoder, final norm), pooled at ``eot_indices`` (N,),
        then projected (CLIP ``text_projection``, SigLIP text ``head``)."""
        tm = self.model.text_model
        h = tm.embeddings(inputs_embeds=embeds)
        if self.family == "clip":
            from transformers.masking_utils import create_causal_mask

            mask = create_causal_mask(config=tm.config, inputs_embeds=h, attention_mask=None, cache=None)
            h = tm.encoder(inputs_embeds=h, attention_mask=mask, is_causal=True).last_hidden_state
        else:  # SigLIP's text tower attends bidirectionally
            from transformers.masking_utils import create_bidirectional_mask

            mask = create_bidirectional_mask(config=tm.config, inputs_embeds=h, attention_mask=None)
            h = tm.encoder(inputs_embeds=h, attention_mask=mask).last_hidden_state
        h = tm.final_layer_norm(h)
        pooled = h[torch.arange(h.shape[0], device=h.device), eot_indices.to(h.device)]
        return self.model.text_projection(pooled) if self.family == "clip" else tm.head(pooled)

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` without special tokens (CoOp's class-name length)."""
        return len(self._require_tokenizer()(text, add_special_tokens=False).input_ids)

    def eot_indices(self, tokens: torch.Tensor) -> torch.Tensor:
        """The position each row is pooled at, by the model's own rule: CLIP configs with the legacy
        ``eos_token_id == 2`` (the OpenAI hub configs) take the highest id (the end-of-text token),
        others the first ``eos_token_id``; SigLIP pools the last position."""
        if self.family == "siglip":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
        eos = self.model.text_model.eos_token_id
        if eos == 2:
            return tokens.argmax(dim=-1)
        return (tokens == eos).int().argmax(dim=-1)

    def logit_scale(self) -> torch.Tensor:
        """The model's temperature ``exp(logit_scale)`` (100 for the released CLIP weights), a scalar."""
        return self.model.logit_scale.exp().reshape(())

    def logit_bias(self) -> torch.Tensor | None:
        """SigLIP's learned logit bias ``b`` (a scalar), ``None`` for CLIP. Full SigLIP logits are
        ``logit_scale() * cos + logit_bias()``; the bias is the same for every class, so softmax
        over classes and argmax ignore it (the CLIP task leaves it out)."""
        if self.family != "siglip":
            return None
        return self.model.logit_bias.reshape(())

    # --- identity / export -----------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "init_args": dict(name=self.name, pretrained=self.pretrained, checkpoint=self.checkpoint,
                              towers=list(self.towers), image_size=self.image_size,
                              grad_checkpointing=self.grad_checkpointing, init_seed=self.init_seed),
        }

    def image_processor(self):
        """A transformers image processor with this backbone's size, mean, std and resampling."""
        from transformers import CLIPImageProcessor, SiglipImageProcessor

        s = self.input_size[0]
        common = dict(image_mean=list(self.mean), image_std=list(self.std), resample=self.resample)
        if self.family == "clip":
            return CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}, **common)
        return SiglipImageProcessor(size={"height": s, "width": s}, **common)

    def save_native(self, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write a transformers folder (load: ``CLIPModel.from_pretrained(OUT)`` or
        ``SiglipModel.from_pretrained(OUT)``, ``AutoTokenizer`` / ``AutoImageProcessor`` likewise);
        ``extra`` and the source go to ``vision_ft_native.json``. Files are written into a temporary
        folder beside ``out_dir`` and moved in, so a failed write leaves no half-written model."""
        from ..io import atomic_write_text, publish_files

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".hf_clip_", dir=out_dir.parent))
        try:
            state = None
            if self.family == "clip":  # CLIP's patch convolution has no bias: fold a merged shift into positions
                state = fold_patch_bias(self.model.state_dict(), "vision_model.embeddings.patch_embedding.bias",
                                        "vision_model.embeddings.position_embedding.weight", class_token=True)
            self.model.save_pretrained(str(tmp), state_dict=state)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp))
            else:
                log.warning("[vision_ft] %s: no tokenizer to save (%s)", self.name, self.tokenizer_source)
            self.image_processor().save_pretrained(str(tmp))
            publish_files(tmp, out_dir)  # one os.replace per file; safetensors' 0o600 made 0o644 (umask 022)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        doc = {"source_name": self.name, "family": self.family, "tokenizer": self.tokenizer_source,
               "weights_source": self.weights_source, **(extra or {})}
        atomic_write_text(out_dir / NATIVE_META, json.dumps(doc, indent=2, default=str) + "\n")
        return out_dir

    native_classifier_export = True

    def save_classifier(self, out_dir: str | Path, head: nn.Linear, class_names: list[str]) -> Path:
        """The transformers folder (:meth:`save_native`) + ``classifier_head.safetensors`` (``weight``,
        ``bias``): ``logits = get_image_features(pixel_values=x).pooler_output @ weight.T + bias``."""
        from ..io import atomic_save_safetensors
        from .open_clip import CLASSIFIER_HEAD

        out = self.save_native(out_dir, extra={"class_names": list(class_names),
                                               "classifier": {"file": CLASSIFIER_HEAD,
                                                              "input": "get_image_features.pooler_output"}})
        atomic_save_safetensors({k: v.detach().contiguous() for k, v in head.state_dict().items()},
                                out / CLASSIFIER_HEAD, metadata={"format": "pt"})
        return out

    def no_decay_parameter_names(self) -> list[str]:
        """Position embeddings of both towers and the class embedding (what open_clip's CLIP lists)."""
        return [n for n, _ in self.model.named_parameters()
                if n.endswith(("embeddings.position_embedding.weight", "embeddings.class_embedding"))]
