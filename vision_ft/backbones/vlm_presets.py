"""Tiny vision-language presets built offline: transformers' LLaVA, LLaVA-OneVision and Qwen-VL (2, 2.5, 3) classes at toy sizes,
with the byte-level BPE tokenizer of the causal-LM presets extended by each family's image tokens, its chat
template and its processor. Random weights: they exist so tests and the offline sample run the real classes.
"""

from __future__ import annotations

import copy
from typing import Any

from .causal_lm_presets import tiny_tokenizer

#: Qwen-style turns; content is a string or a list of ``{"type": "image"}`` / ``{"type": "text", "text"}`` parts
QWEN_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: LLaVA-style turns with an ``<image>`` placeholder per image
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}"
)

#: LLaVA-OneVision's turns (Qwen2 chat markup) with an ``<image>`` placeholder per image
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% elif part['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=4096)
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}

#: preset -> (model_type, family kwargs)
TINY_VLM_PRESETS: dict[str, str] = {
    "qwen2_vl_test_tiny": "qwen2_vl",
    "qwen2_5_vl_test_tiny": "qwen2_5_vl",
    "qwen3_vl_test_tiny": "qwen3_vl",
    "llava_test_tiny": "llava",
    "llava_onevision_test_tiny": "llava_onevision",
    "qwen2_5_vl_bench_mid": "qwen2_5_vl",
}
#: presets at other sizes than the toy one: text-model and vision-tower overrides (``bench vlm``'s mid-size
#: model: a 6-layer 512-wide language model, as ``llama_bench_mid``, and a 4-block 256-wide vision tower)
_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "qwen2_5_vl_bench_mid": {
        "text": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                     num_key_value_heads=4, vocab_size=32000, rope_parameters={**_MROPE, "mrope_section": [8, 12, 12]}),
        "vision": dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=512,
                       fullatt_block_indexes=[3]),
    },
}
#: LLaVA-OneVision's any-resolution grid at toy size: 56 px tiles, up to 2 x 2
_ONEVISION_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def tiny_vl_tokenizer(family: str) -> Any:
    tok = tiny_tokenizer("chatml")
    if family == "llava":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<image>"]})
        tok.chat_template = LLAVA_TEMPLATE
    elif family == "llava_onevision":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<image>", "<video>"]})
        tok.chat_template = ONEVISION_TEMPLATE
    else:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *_QWEN_TOKENS]})
        tok.chat_template = QWEN_TEMPLATE
    return tok


def tiny_vl_config(family: str, tok: Any, preset: str | None = None) -> Any:
    """The model config of a preset, its special-token ids taken from ``tok``."""
    sizes = _SIZES.get(preset or "", {})
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_TOKENS} if not family.startswith("llava") else {}
    text = dict(copy.deepcopy(_TEXT), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=None)
    special = dict(image_token_id=ids.get("<|image_pad|>"), video_token_id=ids.get("<|video_pad|>"),
                   vision_start_token_id=ids.get("<|vision_start|>"), vision_end_token_id=ids.get("<|vision_end|>"))
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, mlp_ratio=2)
        return Qwen2VLConfig(text_config={**text, "rope_parameters": dict(_MROPE)}, vision_config=vision, **special)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1])
        text_config = {**text, "rope_parameters": dict(_MROPE)}
        text_config.update(copy.deepcopy(sizes.get("text", {})))
        vision.update(copy.deepcopy(sizes.get("vision", {})))
        return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision, **special)
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        return Qwen3VLConfig(text_config={**text, "head_dim": 16, "rope_parameters": rope}, vision_config=vision,
                             **special)
    if family == "llava":
        from transformers import LlavaConfig

        vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32)
        return LlavaConfig(vision_config=vision, text_config={**text, "model_type": "llama"},
                           image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16,
                           vision_feature_layer=-2, vision_feature_select_strategy="default")
    if family == "llava_onevision":
        from transformers import LlavaOnevisionConfig

        vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, image_size=56, patch_size=14)
        return LlavaOnevisionConfig(vision_config=vision, text_config={**text, "model_type": "qwen2"},
                                    image_token_index=tok.convert_tokens_to_ids("<image>"),
                                    video_token_index=tok.convert_tokens_to_ids("<video>"),
                                    image_grid_pinpoints=copy.deepcopy(_ONEVISION_PINPOINTS), vision_feature_layer=-1,
                                    vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    raise ValueError(f"unknown family {family!r}")


def tiny_vl_processor(family: str, tok: Any, min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
    """The family's processor around ``tok`` (Qwen: pixel bounds as the image processor's ``size``)."""
    if family == "llava":
        from transformers import CLIPImageProcessor, LlavaProcessor

        ip = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
        return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                              image_token="<image>", num_additional_image_tokens=1, chat_template=tok.chat_template)
    if family == "llava_onevision":
        from transformers import (LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                                  LlavaOnevisionVideoProcessor)

        tile = {"height": 56, "width": 56}
        ip = LlavaOnevisionImageProcessor(size=dict(tile), crop_size=dict(tile),
                                          image_grid_pinpoints=copy.deepcopy(_ONEVISION_PINPOINTS))
        return LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok,
                                       video_processor=LlavaOnevisionVideoProcessor(size=dict(tile), do_sample_frames=False),
                                       num_image_tokens=16, vision_feature_select_strategy="full",
                                       chat_template=tok.chat_template, vision_aspect_ratio="anyres_max_9")
    from transformers import Qwen2VLImageProcessor

    size = {"shortest_edge": min_pixels or 56 * 56, "longest_edge": max_pixels or 112 * 112}
    if family == "qwen3_vl":
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        size = {"shortest_edge": min_pixels or 64 * 64, "longest_edge": max_pixels or 128 * 128}
        ip = Qwen2VLImageProcessor(size=size, patch_size=16, merge_size=2)
        # Qwen3-VL's video pixel budget covers the whole clip: at toy size, about four 64 x 64 frames
        vp = Qwen3VLVideoProcessor(size={"shortest_edge": 32 * 32, "longest_edge": 4 * 64 * 64}, patch_size=16,
                                   merge_size=2, temporal_patch_size=2)
        return Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template)
    from transformers import Qwen2VLVideoProcessor

    ip = Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2)
    vp = Qwen2VLVideoProcessor(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56}, patch_size=14, merge_size=2,
                               temporal_patch_size=2)  # per frame, at toy size
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor

        return Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template)
    from transformers import Qwen2VLProcessor

    return Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template)
