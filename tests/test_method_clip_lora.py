"""CLIP-LoRA: placement and count, step-0 = zero-shot, exact merge, dropout path, native export."""

import copy

import pytest
import torch

from clip_helpers import NAMES, X, encode_both, open_clip_export_logits, perturb_trainable
import vision_ft.methods.clip_lora  # noqa: F401 - registers clip_lora
from vision_ft.backbones.open_clip import OpenCLIP
from vision_ft.errors import ConfigError
from vision_ft.methods import sites
from vision_ft.methods.clip_lora import CLIPLoRA
from vision_ft.tasks.clip_classification import CLIPClassificationTask


def test_count_on_vit_b16_both_towers_is_184320():
    backbone = OpenCLIP("ViT-B-16")
    method = CLIPLoRA()
    method.apply(backbone)
    # 2 * (768 + 768) * 3 * 12 (visual) + 2 * (512 + 512) * 3 * 12 (text)
    assert method.trainable_parameters(backbone) == 184_320
    names = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert len(names) == 2 * 3 * 24 and all(".attn.clip_lora_" in n for n in names)


def test_zero_init_is_the_base_model_on_both_towers():
    base = OpenCLIP("open_clip_test_tiny").eval()
    base.requires_grad_(False)  # the frozen zero-shot model (PyTorch's attention kernel depends on requires_grad)
    b = OpenCLIP("open_clip_test_tiny").eval()
    CLIPLoRA().apply(b)
    with torch.no_grad():
        for ref, out in zip(encode_both(base), encode_both(b)):
            assert torch.equal(ref, out)


def test_merge_adds_the_update_into_the_packed_rows_exactly_and_leaves_a_plain_model():
    b = OpenCLIP("open_clip_test_tiny").eval()
    keys = set(b.model.state_dict())
    w0 = b.model.transformer.resblocks[1].attn.in_proj_weight.detach().clone()
    m = CLIPLoRA(targets=["q", "v"])
    m.apply(b)
    perturb_trainable(b.model)
    mha = b.model.transformer.resblocks[1].attn
    expected = w0.clone()
    expected[0:32] += mha.clip_lora_B_q @ mha.clip_lora_A_q * m.scale
    expected[64:96] += mha.clip_lora_B_v @ mha.clip_lora_A_v * m.scale
    with torch.no_grad():
        before = encode_both(b)
        m.merge(b)
        after = encode_both(b)
    for x, y in zip(before, after):
        assert torch.allclose(x, y, atol=1e-5, rtol=0)
    assert torch.allclose(mha.in_proj_weight, expected, atol=1e-6)
    assert torch.equal(mha.in_proj_weight[32:64], w0[32:64])  # k untouched
    assert set(b.model.state_dict()) == keys
    assert type(mha) is torch.nn.MultiheadAttention and "forward" not in mha.__dict__
    assert not sites.owned(b.model, m.prefix)


def test_dropout_path_computes_the_same_attention_as_the_native_one():
    b = OpenCLIP("open_clip_test_tiny")
    METHOD = CLIPLoRA(targets=["q", "k", "v", "o"], dropout=0.25)
    METHOD.apply(b)
    perturb_trainable(b.model)
    with torch.no_grad():
        b.eval()
        native = encode_both(b)
        METHOD.dropout = 1e-12  # own attention path when > 0 in training
        b.train()
        own = encode_both(b)
        METHOD.dropout = 0.9  # own attention path when > 0 in training
        dropped = encode_both(b)
    for x, y in zip(native, own):
        assert torch.allclose(x, y, atol=1e-5)
    assert not torch.allclose(native[0], dropped[0], atol=1e-3)  # dropout really acts in training


def test_both_factors_get_gradients_through_the_packed_weight():
    b = OpenCLIP("open_clip_test_tiny")
    CLIPLoRA(dropout=0.0).apply(b)
    perturb_trainable(b.model)
    img, txt = encode_both(b)
    (img.sum() + txt.sum()).backward()
    grads = {n: p.grad for n, p in b.model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in b.model.parameters() if not p.requires_grad)


def test_encoders_and_blocks_select_the_sites():
    b = OpenCLIP("open_clip_test_tiny")
    m = CLIPLoRA(encoders=["text"], blocks=[1], targets=["q"])
    m.apply(b)
    names = [n for n, p in b.model.named_parameters() if p.requires_grad]
    assert names == ["transformer.resblocks.1.attn.clip_lora_A_q", "transformer.resblocks.1.attn.clip_lora_B_q"]
    with pytest.raises(ConfigError, match="towers"):
        CLIPLoRA().apply(OpenCLIP("open_clip_test_tiny", towers=["visual"]))
    with pytest.raises(ConfigError, match="targets"):
        CLIPLoRA(targets=["qkv"])
    with pytest.raises(ConfigError, match="dropout"):
        CLIPLoRA(dropout=1.0)


def test_adapter_roundtrip_and_merged_export_load_in_open_clip(tmp_path):
    from vision_ft.export import export_merged, load_adapter, save_adapter

    task = CLIPClassificationTask(OpenCLIP("open_clip_test_tiny"), method="clip_lora", num_classes=4,
                                  class_names=NAMES, templates=["a photo of a {}.", "a {} image."]).eval()
    perturb_trainable(task.backbone.model)
    task._cache.clear()
    save_adapter(task, tmp_path / "run")
    loaded = load_adapter(tmp_path / "run")
    with torch.no_grad():
        expected = task(X)
        assert torch.equal(expected, loaded(X))
    out = export_merged(tmp_path / "run", tmp_path / "out")
    logits, text, native = open_clip_export_logits(out, task.backbone.preprocess(X))  # open_clip alone
    assert torch.allclose(logits, expected, atol=1e-4)
    from safetensors.torch import load_file

    head = load_file(out / "class_text_features.safetensors")
    assert torch.allclose(head["text_features"], text, atol=1e-5)
