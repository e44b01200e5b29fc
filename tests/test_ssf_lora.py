"""SSF and LoRA invariants (docs/methods/ssf.md, docs/methods/lora.md) on tiny and on the real ViT-B/16 architecture."""

import pytest
import torch
from torch import nn

from conftest import make_task
from vision_ft.backbones import TimmViT
from vision_ft.methods import SSF, LoRA

X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_ssf_identity_reproduces_base_exactly():
    base = TimmViT("vit_test_tiny").eval()
    bb = TimmViT("vit_test_tiny").eval()
    SSF(init_std=0.0).apply(bb)
    with torch.no_grad():
        assert torch.equal(base(base.preprocess(X)), bb(bb.preprocess(X)))


def test_ssf_placement_matches_paper():
    bb = TimmViT("vit_test_tiny")
    SSF().apply(bb)
    names = sorted(n for n, p in bb.model.named_parameters() if p.requires_grad)
    per_block = {"norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"}
    expected = {f"blocks.{i}.{m}.ssf_{k}" for i in range(2) for m in per_block for k in ("scale", "shift")}
    expected |= {f"patch_embed.proj.ssf_{k}" for k in ("scale", "shift")}
    expected |= {f"norm.ssf_{k}" for k in ("scale", "shift")}
    assert set(names) == expected


def test_ssf_init_distribution():
    bb = TimmViT("vit_base_patch16_224")
    SSF().apply(bb)
    scale = torch.cat([p.flatten() for n, p in bb.model.named_parameters() if n.endswith("ssf_scale")])
    shift = torch.cat([p.flatten() for n, p in bb.model.named_parameters() if n.endswith("ssf_shift")])
    assert abs(scale.mean().item() - 1) < 2e-3 and abs(scale.std().item() - 0.02) < 2e-3
    assert abs(shift.mean().item()) < 2e-3 and abs(shift.std().item() - 0.02) < 2e-3
    # the paper's count, head excluded: 2 * 8448 * 12 + 2 * 1536
    assert sum(p.numel() for p in bb.model.parameters() if p.requires_grad) == 205_824


def test_ssf_merge_folds_layernorm_linear_and_conv():
    task = make_task(SSF(init_std=0.3)).eval()
    with torch.no_grad():
        before = task(X)
        task.method.merge(task.backbone)
        after = task(X)
    assert torch.allclose(before, after, atol=1e-5)
    m = task.backbone.model
    assert not m.patch_embed.proj._forward_hooks and not m.norm._forward_hooks
    assert not any(n for n, _ in m.named_parameters() if "ssf_" in n)


def test_ssf_no_weight_decay_on_its_parameters():
    task = make_task("ssf", weight_decay=0.05)
    ssf_params = {id(p) for n, p in task.backbone.model.named_parameters() if "ssf_" in n}
    groups = task.param_groups()
    assert sum(len(g["params"]) for g in groups) == len(ssf_params) + 2
    for g in groups:
        if any(id(p) in ssf_params for p in g["params"]):
            assert g["weight_decay"] == 0.0
    assert any(g["weight_decay"] == 0.05 and g["params"][0] is task.head.weight for g in groups)


def test_lora_count_on_vit_base_qkv_r8():
    bb = TimmViT("vit_base_patch16_224")
    m = LoRA(r=8, targets=["qkv"])
    m.apply(bb)
    assert m.trainable_parameters(bb) == 8 * (768 + 2304) * 12 == 294_912


def test_lora_zero_at_init_and_merge_restores_plain_linear():
    task = make_task(LoRA(r=4, targets=["qkv", "fc1"])).eval()
    from peft.tuners.lora import Linear as PeftLinear

    assert isinstance(task.backbone.model.blocks[0].attn.qkv, PeftLinear)
    with torch.no_grad():
        for n, p in task.backbone.model.named_parameters():
            if "lora_B" in n:
                p.normal_()
        before = task(X)
        task.method.merge(task.backbone)
        after = task(X)
    assert torch.allclose(before, after, atol=1e-5)
    assert type(task.backbone.model.blocks[0].attn.qkv) is nn.Linear


def test_lora_rejects_unknown_targets():
    from vision_ft.errors import ConfigError

    with pytest.raises(ConfigError, match="method.init_args.targets"):
        LoRA(targets=["gate_proj"])
