"""transformers CLIP / SigLIP family knowledge: tiny presets, released architectures, default
normalisation, the offline CLIP BPE tokenizer and which names belong to the family."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

from ..errors import first_line

log = logging.getLogger("vision_ft")


#: CLIP's BPE special tokens (ids in the 49,408-entry vocabulary).
_SOT, _EOT = 49406, 49407

#: Tiny architectures for tests and offline samples: name -> (family, config kwargs). Sizes mirror
#: ``open_clip_test_tiny``: joint embedding 32, image tower 2 blocks of width 32 at 32 px, patch 8,
#: text tower 2 blocks of width 32, CLIP's BPE vocabulary.
TINY_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "hf_clip_test_tiny": ("clip", {
        "projection_dim": 32,
        "text_config": {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "max_position_embeddings": 77,
                        "bos_token_id": _SOT, "eos_token_id": _EOT, "pad_token_id": _EOT},
        "vision_config": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    }),
    "hf_siglip_test_tiny": ("siglip", {
        "text_config": {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "max_position_embeddings": 64, "projection_size": 32,
                        "bos_token_id": _SOT, "eos_token_id": _EOT, "pad_token_id": _EOT},
        "vision_config": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    }),
}

#: Architectures of released checkpoints, written out so that a random init (``pretrained:
#: false``) and ``methods --backbone <hub id>`` need no download. Weights still come only from
#: ``pretrained: true`` or ``checkpoint``, which read the checkpoint's own config.json.
_OPENAI_TEXT = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}  # as in the hub config.json files
KNOWN_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "openai/clip-vit-base-patch32": ("clip", {"projection_dim": 512, "text_config": dict(_OPENAI_TEXT),
                                              "vision_config": {"patch_size": 32}}),
    "openai/clip-vit-base-patch16": ("clip", {"projection_dim": 512, "text_config": dict(_OPENAI_TEXT),
                                              "vision_config": {"patch_size": 16}}),
    "openai/clip-vit-large-patch14": ("clip", {
        "projection_dim": 768,
        "text_config": {**_OPENAI_TEXT, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "patch_size": 14}}),
    # transformers' SiglipConfig defaults are this checkpoint's architecture
    "google/siglip-base-patch16-224": ("siglip", {"text_config": {}, "vision_config": {}}),
}

#: the library's default image normalisation per family (used when no preprocessor config exists)
_FAMILY_MEAN_STD = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
_FAMILY_RESAMPLE = {"clip": 3, "siglip": 2}  # PIL codes: 3 bicubic, 2 bilinear
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")
NATIVE_META = "vision_ft_native.json"


def _classes(family: str):
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    return (CLIPConfig, CLIPModel) if family == "clip" else (SiglipConfig, SiglipModel)


def _family_of(model_type: str | None) -> str | None:
    return {"clip": "clip", "siglip": "siglip"}.get(str(model_type))


def clip_bpe_tokenizer(context_length: int = 77):
    """A ``transformers.CLIPTokenizer`` built offline from open_clip's bundled CLIP BPE
    (``bpe_simple_vocab_16e6.txt.gz``): the vocabulary and merges of OpenAI CLIP's tokenizer."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    units = list(bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=context_length)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        log.warning("[vision_ft] %s is not valid JSON; using the default image normalisation", path)
        return {}


def _hub_image_cfg(name: str) -> dict[str, Any]:
    """The hub repository's (or local folder's) preprocessor_config.json (mean, std, resampling),
    {} if unreachable."""
    if Path(name).is_dir():
        return _read_json(Path(name) / "preprocessor_config.json")
    try:
        from huggingface_hub import hf_hub_download

        return _read_json(Path(hf_hub_download(name, "preprocessor_config.json")))
    except Exception as e:  # noqa: BLE001 - optional file: fall back to the family defaults
        log.info("[vision_ft] %s: no preprocessor_config.json (%s); using the library's default normalisation",
                 name, first_line(e))
        return {}


def is_hf_clip_name(name: str) -> bool:
    """Whether ``name`` is an HFCLIP tiny preset or a known transformers CLIP/SigLIP architecture."""
    return name in TINY_PRESETS or name in KNOWN_ARCHITECTURES
