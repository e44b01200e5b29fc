"""Tiny causal-LM presets built offline: a small byte-level BPE tokenizer trained on an embedded corpus,
each preset's chat template, and model configs of three layouts (Llama: separate projections and a
gated MLP; Qwen2: the same with q/k/v biases; Phi-3: fused ``qkv_proj`` and ``gate_up_proj``).

The weights are random (seeded); they exist so tests and the offline sample run the real transformers
classes end to end. Nothing here is a pretrained language model.
"""

from __future__ import annotations

import functools
from typing import Any

#: ChatML turns (the Qwen2 / Phi-3 style presets): ``<|im_start|>role\\ncontent<|im_end|>\\n``
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: header / end-of-turn turns (the Llama-3 style preset), whose pad token is its end-of-turn token
HEADER_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) "
    "+ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]

# A small corpus for the tokenizer's merges: telecom and everyday words, digits and punctuation.
_CORPUS = """
The user equipment attaches to the network through the radio access network and the core network.
In 5G New Radio the gNB schedules uplink and downlink resources; the AMF handles access and mobility.
The SMF manages sessions and the UPF forwards user plane traffic. LTE uses the eNB and the EPC.
Which protocol carries signalling between the UE and the core? Answer with the option number.
option 1: option 2: option 3: option 4: option 5: the answer is option
Question: Options: Answer: Explanation: category: Standards specifications Research publications Lexicon
HARQ retransmissions, MIMO layers, beamforming, carrier aggregation, numerology, subcarrier spacing,
bandwidth part, physical downlink control channel, PDCCH, PDSCH, PUSCH, PUCCH, RRC, PDCP, RLC, MAC, PHY,
3GPP Release 15 16 17 18 specifies network slicing, QoS flows, latency, throughput, spectrum, frequency.
What is the maximum number of layers? It is defined in the specification of the physical layer.
a an the of to in on for with by from is are was be this that which what when where how why yes no
0 1 2 3 4 5 6 7 8 9 10 100 1000 ms kHz MHz GHz dB dBm % ( ) [ ] : ; , . ? ! - _ / " '
"""


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(_SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()] * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(style: str = "chatml", vocab_size: int = 512) -> Any:
    """A ``PreTrainedTokenizerFast`` trained offline (deterministic) with the preset's chat template.

    ``style="chatml"``: eos ``<|im_end|>``, pad ``<|endoftext|>``. ``style="header"``: bos
    ``<|begin_of_text|>``, eos = pad = ``<|eot_id|>`` (the case where the pad id is the end-of-turn id).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_tokenizer_json(vocab_size))
    if style == "chatml":
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      additional_special_tokens=["<|im_start|>"])
        tok.chat_template = CHATML_TEMPLATE
    elif style == "header":
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                      pad_token="<|eot_id|>",
                                      additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"])
        tok.chat_template = HEADER_TEMPLATE
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")
    tok.model_max_length = 2048
    return tok


_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)

#: preset name -> (transformers model_type, config kwargs, tokenizer style)
TINY_LM_PRESETS: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama_test_tiny": ("llama", dict(_COMMON), "header"),
    "qwen2_test_tiny": ("qwen2", dict(_COMMON), "chatml"),
    "phi3_test_tiny": ("phi3", dict(_COMMON), "chatml"),
}

#: a mid-size random Llama layout for ``bench lm``: 6 layers of width 512 and a 32k vocabulary (about 52M
#: parameters, a third of them in the two embedding matrices); the tokenizer covers only its first ids
TINY_LM_PRESETS["llama_bench_mid"] = ("llama", dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                                                    num_attention_heads=8, num_key_value_heads=4,
                                                    max_position_embeddings=2048, tie_word_embeddings=False,
                                                    vocab_size=32000), "header")
