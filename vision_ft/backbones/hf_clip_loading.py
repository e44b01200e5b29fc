"""How :class:`~vision_ft.backbones.hf_clip.HFCLIP` builds its model and tokenizer: from a tiny preset, a
known architecture (random init), the hub (``pretrained``) or a local ``save_pretrained`` folder
(``checkpoint``), with position embeddings resized to ``image_size``."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import BackboneError, ConfigError
from .base import first_line
from .hf_clip_presets import (_TOKENIZER_FILES, KNOWN_ARCHITECTURES,
                              TINY_PRESETS, _classes, _family_of, _hub_image_cfg, _read_json,
                              clip_bpe_tokenizer)

log = logging.getLogger("vision_ft")


class HFCLIPLoading:
    """The loading half of :class:`~vision_ft.backbones.hf_clip.HFCLIP` (a mixin: it reads and sets the
    backbone's own attributes)."""

    # --- loading -------------------------------------------------------------------
    def _family_from_name(self) -> str | None:
        """``clip`` / ``siglip`` for a preset or a known architecture, else None (unknown offline)."""
        if self.name in TINY_PRESETS:
            return TINY_PRESETS[self.name][0]
        if self.name in KNOWN_ARCHITECTURES:
            return KNOWN_ARCHITECTURES[self.name][0]
        return None

    def _name_config(self, resize: bool = True):
        """The config of ``name``: a preset, a known architecture, or the hub's config.json
        (``resize``: at ``image_size``)."""
        if self.name in TINY_PRESETS or self.name in KNOWN_ARCHITECTURES:
            family, kwargs = (TINY_PRESETS.get(self.name) or KNOWN_ARCHITECTURES[self.name])
            config_cls, _ = _classes(family)
            cfg = config_cls(**copy.deepcopy(kwargs))
        else:
            from transformers import AutoConfig

            try:
                cfg = AutoConfig.from_pretrained(self.name)
            except Exception as e:  # unknown id, hub unreachable, empty cache
                raise BackboneError(
                    f"cannot read the architecture of {self.name!r} (backbone.init_args.name): "
                    f"{type(e).__name__}: {first_line(e)}. Use a hub id of a CLIP/SigLIP model "
                    f"({sorted(KNOWN_ARCHITECTURES)} need no download), a tiny preset {sorted(TINY_PRESETS)}, "
                    "or offline backbone.init_args.checkpoint=/path/to/save_pretrained_folder") from None
            if _family_of(cfg.model_type) is None:
                raise BackboneError(f"{self.name!r} is a {cfg.model_type!r} model; HFCLIP takes CLIP or SigLIP "
                                    "(backbone.init_args.name)")
        if resize and self.image_size is not None:
            cfg.vision_config.image_size = int(self.image_size)
        return cfg

    def _random(self, resize: bool = True) -> nn.Module:
        cfg = self._name_config(resize)
        _, model_cls = _classes(_family_of(cfg.model_type))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            return model_cls(cfg)

    def _build(self) -> nn.Module:
        if self.checkpoint:
            model = self._from_checkpoint(Path(os.path.expanduser(self.checkpoint)))
            self.weights_source = f"local checkpoint {self.checkpoint}"
            return model
        if self.pretrained:
            if self.name in TINY_PRESETS:
                raise BackboneError(f"the tiny preset {self.name!r} has no pretrained weights; set "
                                    "backbone.init_args.pretrained=false or a real model name")
            from transformers import AutoConfig

            try:
                family = _family_of(AutoConfig.from_pretrained(self.name).model_type)
                if family is None:
                    raise BackboneError(f"{self.name!r} is not a CLIP or SigLIP model (backbone.init_args.name)")
                model = _classes(family)[1].from_pretrained(self.name, dtype=torch.float32)
            except BackboneError:
                raise
            except Exception as e:  # hub unreachable, cache empty, unknown id
                raise BackboneError(
                    f"transformers weights {self.name!r} are not reachable ({type(e).__name__}: {first_line(e)}). "
                    "Offline, set backbone.init_args.checkpoint=/path/to/folder (written by save_pretrained, "
                    "e.g. a snapshot of the hub repository) or backbone.init_args.pretrained=false for random "
                    "init.") from None
            self._image_cfg = _hub_image_cfg(self.name)
            self.weights_source = f"pretrained {self.name} (transformers hub)"
            return model
        model = self._random()
        self.weights_source = (
            f"random init (seed {self.init_seed}): no pretrained weights requested; set "
            "backbone.init_args.checkpoint=... or backbone.init_args.pretrained=true with hub access")
        return model

    def _from_checkpoint(self, path: Path) -> nn.Module:
        key = "backbone.init_args.checkpoint"
        if path.is_dir():
            config_file = path / "config.json"
            if not config_file.is_file():
                raise BackboneError(f"{key}={self.checkpoint!r} is a folder without config.json; give a folder "
                                    "written by transformers' save_pretrained (or vision_ft export)")
            try:
                model_type = json.loads(config_file.read_text()).get("model_type")
            except json.JSONDecodeError as e:
                raise BackboneError(f"{config_file} is not valid JSON ({e}) ({key})") from None
            family, expected = _family_of(model_type), self._family_from_name()
            if family is None or (expected is not None and family != expected):
                raise BackboneError(
                    f"checkpoint {str(path)!r} holds a {model_type!r} model, which does not fit {self.name!r} "
                    f"({key} / backbone.init_args.name; HFCLIP takes CLIP or SigLIP, the name's family: {expected})")
            try:
                model = _classes(family)[1].from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
            except Exception as e:  # missing or truncated weights
                raise BackboneError(f"checkpoint {str(path)!r} cannot be loaded by transformers ({key}): "
                                    f"{type(e).__name__}: {first_line(e)}") from None
            self._image_cfg = _read_json(path / "preprocessor_config.json")
            return model
        if not path.is_file():
            raise BackboneError(f"{key}={self.checkpoint!r}: no such file or folder")
        model = self._random(resize=False)  # the weights' own size; resampled to image_size afterwards
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(str(path), map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
        except Exception as e:  # shape mismatch, missing keys, refused pickle
            raise BackboneError(f"checkpoint {str(path)!r} does not fit transformers model {self.name!r} "
                                f"({key} / backbone.init_args.name): {first_line(e)}") from None
        return model

    def _load_tokenizer(self):
        """(tokenizer or None, description); None: tokenize() raises with the description."""
        source = None
        if self.checkpoint and Path(os.path.expanduser(self.checkpoint)).is_dir():
            folder = Path(os.path.expanduser(self.checkpoint))
            if any((folder / f).is_file() for f in _TOKENIZER_FILES):
                source = str(folder)
        elif self.pretrained:
            source = self.name
        if source is None and self.name in TINY_PRESETS:
            return clip_bpe_tokenizer(self.context_length), "CLIP BPE (open_clip's bundled vocabulary)"
        error = ("no tokenizer files in the checkpoint folder" if self.checkpoint
                 else "random init: the model's tokenizer files are not downloaded")
        if source is not None:
            from transformers import AutoTokenizer

            try:
                return AutoTokenizer.from_pretrained(source), f"AutoTokenizer({source})"
            except Exception as e:  # e.g. SigLIP's SentencePiece model without the sentencepiece package
                error = f"AutoTokenizer({source!r}) failed: {type(e).__name__}: {first_line(e)}"
        if self.family == "clip":
            log.info("[vision_ft] %s: %s; using CLIP's BPE from open_clip's bundled vocabulary (the same BPE)",
                     self.name, error)
            return clip_bpe_tokenizer(self.context_length), "CLIP BPE (open_clip's bundled vocabulary)"
        return None, (f"SigLIP's own SentencePiece tokenizer is needed ({error}); set "
                      "backbone.init_args.checkpoint to a save_pretrained folder with its tokenizer files "
                      "(reading spiece.model needs the sentencepiece package) or pretrained=true with hub access")

    def _config_image_size(self) -> int:
        size = self.model.config.vision_config.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def _resize_positions(self, size: int) -> None:
        """Resample the image tower's position table to ``size`` px with transformers' own
        ``interpolate_pos_encoding`` and update the config, so the native export loads at ``size``."""
        emb = self.model.vision_model.embeddings
        if size % emb.patch_size:
            raise ConfigError(f"backbone.init_args.image_size={size} is not a multiple of the patch size "
                              f"{emb.patch_size}")
        n = (size // emb.patch_size) ** 2
        n_positions = n + (1 if self.family == "clip" else 0)
        with torch.no_grad():
            probe = torch.zeros(1, n_positions, emb.embed_dim)
            table = emb.interpolate_pos_encoding(probe, size, size)[0].clone()
        emb.position_embedding = nn.Embedding.from_pretrained(table, freeze=False)
        emb.image_size, emb.num_patches, emb.num_positions = size, n, n_positions
        emb.position_ids = torch.arange(n_positions).expand((1, -1)).clone()
        for cfg in {id(c): c for c in (self.model.config.vision_config, self.model.vision_model.config,
                                       emb.config)}.values():
            cfg.image_size = size
