"""Causal-LM pieces: the backbone's presets and roles, label masks, packing, the single shift, export."""

from __future__ import annotations

import json

import pytest
import torch

from vision_ft.backbones import CausalLM
from vision_ft.data.chat import IGNORE, collate, pack, shifted_loss, tokenize_all, tokenize_conversation
from vision_ft.errors import BackboneError, ConfigError
from vision_ft.methods import build_method

CONV = [
    {"role": "system", "content": "You are a telecom assistant."},
    {"role": "user", "content": "What does the AMF do?"},
    {"role": "assistant", "content": "Access and mobility management."},
    {"role": "user", "content": "And the SMF?"},
    {"role": "assistant", "content": "option 2: session management"},
]
#: the end-of-turn text each preset's template closes a reply with
END = {"llama_test_tiny": "<|eot_id|>", "qwen2_test_tiny": "<|im_end|>\n", "phi3_test_tiny": "<|im_end|>\n"}


@pytest.fixture(scope="module")
def lms() -> dict[str, CausalLM]:
    return {name: CausalLM(name) for name in END}


def _supervised_pieces(tok, ids, labels) -> list[str]:
    """Decode each maximal run of supervised tokens."""
    pieces, run = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == t  # labels are the ids themselves, not shifted
            run.append(t)
        elif run:
            pieces.append(tok.decode(run))
            run = []
    if run:
        pieces.append(tok.decode(run))
    return pieces


@pytest.mark.parametrize("name", sorted(END))
def test_supervised_tokens_are_exactly_the_replies_and_their_end_of_turn(lms, name):
    tok = lms[name].tokenizer
    ids, labels = tokenize_conversation(tok, CONV)
    replies = [m["content"] for m in CONV if m["role"] == "assistant"]
    assert _supervised_pieces(tok, ids, labels) == [r + END[name] for r in replies]
    ids, labels = tokenize_conversation(tok, CONV, train_on="last")
    assert _supervised_pieces(tok, ids, labels) == [replies[-1] + END[name]]
    assert tok.decode(ids) == tok.apply_chat_template(CONV, tokenize=False)  # the template's own text


def test_pad_equal_to_end_of_turn_keeps_the_end_of_turn_supervised(lms):
    tok = lms["llama_test_tiny"].tokenizer
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|eot_id|>")
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    samples = tokenize_all(tok, [(CONV, "a:1"), (short, "a:2")], max_length=256)
    batch = collate([[(samples.input_ids[1], samples.labels[1])], [(samples.input_ids[0], samples.labels[0])]],
                    pad_id=tok.pad_token_id)
    row = 0  # the short sample, padded with the end-of-turn id
    n = len(samples.input_ids[1])
    assert (batch["input_ids"][row, n:] == tok.pad_token_id).all() and (batch["labels"][row, n:] == IGNORE).all()
    assert batch["labels"][row, n - 1] == tok.eos_token_id  # its own end-of-turn is learned
    assert batch["attention_mask"][row].sum() == n


def test_the_loss_shifts_once_like_transformers(lms):
    lm = lms["qwen2_test_tiny"]
    ids, labels = tokenize_conversation(lm.tokenizer, CONV)
    x, y = torch.tensor([ids]), torch.tensor([labels])
    ours, n = shifted_loss(lm(x), y)
    theirs = lm.model(input_ids=x, labels=y).loss  # transformers shifts internally
    assert n == sum(1 for t in labels[1:] if t != IGNORE)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_packed_samples_do_not_attend_to_each_other(lms):
    lm = lms["llama_test_tiny"]
    tok = lm.tokenizer
    convs = [([{"role": "user", "content": q}, {"role": "assistant", "content": a}], f"f:{i}")
             for i, (q, a) in enumerate([("What is HARQ?", "Retransmission."), ("What is MIMO?", "Many antennas."),
                                          ("Define OFDM.", "Orthogonal subcarriers.")])]
    samples = tokenize_all(tok, convs, max_length=256)
    rows = pack(samples, max_length=256)
    assert rows == [[0, 1, 2]]
    batch = collate([[(samples.input_ids[i], samples.labels[i]) for i in rows[0]]], pad_id=tok.pad_token_id)
    assert "attention_mask" not in batch
    packed = lm(batch["input_ids"], position_ids=batch["position_ids"])
    at = 0
    for ids in samples.input_ids:
        alone = lm(torch.tensor([ids]))
        torch.testing.assert_close(packed[:, at: at + len(ids)], alone, rtol=1e-4, atol=1e-5)
        at += len(ids)
    # and the packed loss is the token-weighted mean of the separate losses
    total = sum(shifted_loss(lm(torch.tensor([i])), torch.tensor([lab]))[0] * shifted_loss(
        lm(torch.tensor([i])), torch.tensor([lab]))[1] for i, lab in zip(samples.input_ids, samples.labels))
    count = sum(sum(1 for t in lab[1:] if t != IGNORE) for lab in samples.labels)
    torch.testing.assert_close(shifted_loss(packed, batch["labels"])[0], total / count, rtol=1e-4, atol=1e-5)


def test_overlength_policies(lms):
    tok = lms["qwen2_test_tiny"].tokenizer
    convs = [(CONV, "f:1")]
    full = len(tokenize_conversation(tok, CONV)[0])
    assert tokenize_all(tok, convs, max_length=full).input_ids  # fits exactly
    dropped = tokenize_all(tok, convs, max_length=full - 1)
    assert not dropped.input_ids and dropped.dropped == ["f:1"]
    cut = tokenize_all(tok, convs, max_length=full - 1, on_overlength="truncate")
    assert len(cut.input_ids[0]) == full - 1 and cut.truncated == 1
    with pytest.raises(Exception, match="f:1: .* > max_length"):
        tokenize_all(tok, convs, max_length=full - 1, on_overlength="error")


def test_roles_follow_the_module_names(lms):
    llama, phi3 = lms["llama_test_tiny"], lms["phi3_test_tiny"]
    assert llama.roles() == ["q", "k", "v", "proj", "gate", "fc1", "fc2"]
    assert phi3.roles() == ["qkv", "proj", "gate_up", "fc2"]
    cfg = phi3.model.config
    q = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    ref = phi3.weight_ref(1, "k")  # a row slice of the fused projection
    assert (ref.module, ref.start, ref.key) == ("model.layers.1.self_attn.qkv_proj", q, "k")
    assert phi3.weight_ref(0, "fc1").start == cfg.intermediate_size  # up rows follow the gate rows
    with pytest.raises(ConfigError, match="separate projections, target q k v"):
        llama.weight_ref(0, "qkv")
    with pytest.raises(ConfigError, match="fuses them, target gate_up"):
        phi3.module_name(0, "gate")


@pytest.mark.parametrize("name,targets,expected", [
    ("llama_test_tiny", None, 7), ("phi3_test_tiny", None, 4), ("phi3_test_tiny", ["qkv", "gate_up"], 2)])
def test_peft_lora_targets_whole_projections(name, targets, expected):
    lm = CausalLM(name)
    method = build_method({"class_path": "vision_ft.methods.LoRA", "init_args": {"r": 2, "targets": targets}})
    assert len(method.target_names(lm)) == expected * lm.num_blocks
    with pytest.raises(ConfigError, match="slice of this backbone's fused"):
        build_method({"class_path": "vision_ft.methods.LoRA", "init_args": {"targets": ["q"]}}).target_names(
            CausalLM("phi3_test_tiny"))


def test_loading_errors_name_the_key(tmp_path):
    with pytest.raises(BackboneError, match="not a tiny preset .*pretrained=true"):
        CausalLM("someone/unknown-lm")
    with pytest.raises(BackboneError, match="no such file"):
        CausalLM(checkpoint=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="without config.json"):
        CausalLM(checkpoint=str(tmp_path / "empty"))
    with pytest.raises(BackboneError, match="no pretrained weights"):
        CausalLM("qwen2_test_tiny", pretrained=True)


def test_local_folder_round_trip(lms, tmp_path):
    lm = lms["phi3_test_tiny"]
    lm.save_native(tmp_path / "m")
    again = CausalLM(checkpoint=str(tmp_path / "m"))
    x = torch.randint(0, 500, (1, 9))
    torch.testing.assert_close(again(x), lm(x))
    assert again.tokenizer.chat_template == lm.tokenizer.chat_template
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "phi3"


def _write_gguf(lm: CausalLM, path) -> None:
    """A GGUF file as llama.cpp's converter writes one (qwen2 architecture, fp32 tensors, BPE vocabulary)."""
    gguf = pytest.importorskip("gguf")
    cfg, tok = lm.model.config, lm.tokenizer
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers)
    for name, t in lm.model.state_dict().items():
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_loads_through_transformers(lms, tmp_path):
    lm = lms["qwen2_test_tiny"]
    _write_gguf(lm, tmp_path / "tiny.gguf")
    again = CausalLM(checkpoint=str(tmp_path / "tiny.gguf"))
    x = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again(x), lm(x))
    assert again.tokenizer.chat_template == lm.tokenizer.chat_template
    text = "option 2: the AMF handles mobility"
    assert again.tokenizer.decode(again.tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert again.weights_source.startswith("local checkpoint")
