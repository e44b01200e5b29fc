"""Block-LoRA: count r(d_out + d_in/n), Delta W = 0 at init, identical column blocks, branch = B A_s sum_j x_j,
exact merge, native export, n must divide d_in."""


import pytest
import torch

from clip_helpers import NAMES, X, encode_both, open_clip_export_logits, perturb_trainable
import vision_ft.methods.block_lora  # noqa: F401 - registers block_lora
from vision_ft.backbones import TimmViT
from vision_ft.backbones.open_clip import OpenCLIP
from vision_ft.errors import ConfigError
from vision_ft.methods import sites
from vision_ft.methods.block_lora import BlockLoRA
from vision_ft.tasks.clip_classification import CLIPClassificationTask


def _sites(backbone):
    return sites.owned(backbone.model, "block_lora_")


def _task(**kw):
    method = {"class_path": "vision_ft.methods.block_lora.BlockLoRA", "init_args": kw}
    return CLIPClassificationTask(OpenCLIP("open_clip_test_tiny"), method=method, num_classes=4, class_names=NAMES,
                                  templates=["a photo of a {}.", "a {} image."]).eval()


def _formula(r, n, widths_and_blocks, targets=3):
    """The paper's count under the input-block reading: r (d_out + d_in / n) per adapted square projection."""
    return sum(r * (d + d // n) * targets * blocks for d, blocks in widths_and_blocks)


def test_count_on_vit_b16_both_towers_follows_r_dout_plus_din_over_n():
    backbone = OpenCLIP("ViT-B-16")
    method = BlockLoRA()
    method.apply(backbone)
    assert (method.r, method.n) == (2, 8)
    # 2 * (768 + 768 / 8) * 3 * 12 (visual) + 2 * (512 + 512 / 8) * 3 * 12 (text) = 62,208 + 41,472
    assert method.trainable_parameters(backbone) == _formula(2, 8, [(768, 12), (512, 12)]) == 103_680
    shapes = {n.rsplit(".", 1)[1]: tuple(p.shape) for n, p in backbone.model.named_parameters()
              if p.requires_grad and n.startswith("visual.")}
    assert shapes == {f"block_lora_{x}_{t}": s for t in "qkv" for x, s in (("A", (2, 96)), ("B", (768, 2)))}
    vit = TimmViT("vit_base_patch16_224", pretrained=False)  # fused qkv: the q/k/v row blocks of one linear
    m = BlockLoRA()
    m.apply(vit)
    assert m.trainable_parameters(vit) == _formula(2, 8, [(768, 12)]) == 62_208


def test_zero_at_init_and_step_zero_is_the_zero_shot_model():
    base = OpenCLIP("open_clip_test_tiny").eval()
    base.requires_grad_(False)
    b = OpenCLIP("open_clip_test_tiny").eval()
    torch.manual_seed(0)
    m = BlockLoRA()
    m.apply(b)
    for site in _sites(b):
        assert torch.equal(m.site_delta(site), torch.zeros(32, 32))
    # only B is zero; A_s ~ U(+-1/sqrt(d_in)): CLIP-LoRA's Kaiming bound for the dense r x d_in A, not A_s's own
    a = torch.cat([site.get("block_lora_", "A").flatten() for site in _sites(b)])
    assert a.numel() == 12 * 2 * 4 and 0.9 * 32 ** -0.5 < a.abs().max() <= 32 ** -0.5
    with torch.no_grad():
        for ref, out in zip(encode_both(base), encode_both(b)):
            assert torch.equal(ref, out)


def test_column_blocks_are_identical_and_branch_is_b_as_sum_of_chunks():
    b = OpenCLIP("open_clip_test_tiny")
    m = BlockLoRA(n=4, targets=["q", "k", "v", "o"])
    m.apply(b)
    perturb_trainable(b.model)
    adapted = _sites(b)
    assert len(adapted) == 16
    x = torch.randn(3, 5, 32)
    for site in adapted:
        a, bb = site.get("block_lora_", "A"), site.get("block_lora_", "B")
        assert a.shape == (2, 8) and bb.shape == (32, 2)
        delta = m.site_delta(site)
        blocks = delta.split(8, dim=1)
        assert len(blocks) == 4 and all(torch.equal(blocks[0], blk) for blk in blocks[1:])
        assert blocks[0].abs().max() > 1e-3
        assert torch.allclose(blocks[0], bb @ a * m.scale, atol=1e-7, rtol=0)
        chunks_sum = x[..., 0:8] + x[..., 8:16] + x[..., 16:24] + x[..., 24:32]
        out = m.site_branch(site, x)
        assert torch.allclose(out, chunks_sum @ a.T @ bb.T * m.scale, atol=1e-6)
        assert torch.allclose(out, x @ delta.T, atol=1e-5)


def test_branch_path_equals_the_dense_path_in_attention():
    b = OpenCLIP("open_clip_test_tiny")
    METHOD = BlockLoRA(targets=["q", "k", "v", "o"], dropout=0.25)
    METHOD.apply(b)
    perturb_trainable(b.model)
    with torch.no_grad():
        b.eval()
        dense = encode_both(b)
        METHOD.dropout = 1e-12  # own attention path when > 0 in training
        b.train()
        branched = encode_both(b)
    for x, y in zip(dense, branched):
        assert torch.allclose(x, y, atol=1e-5)


def test_merge_is_exact_and_leaves_a_plain_model():
    task = _task(targets=["q", "v"])
    b = task.backbone
    keys = set(OpenCLIP("open_clip_test_tiny").model.state_dict())
    mha = b.model.transformer.resblocks[1].attn
    w0 = mha.in_proj_weight.detach().clone()
    perturb_trainable(b.model)
    task._cache.clear()
    expected = w0.clone()
    for t, rows in (("q", slice(0, 32)), ("v", slice(64, 96))):
        block = getattr(mha, f"block_lora_B_{t}") @ getattr(mha, f"block_lora_A_{t}")  # 32 x 4 (n = 8)
        expected[rows] += torch.cat([block] * 8, dim=1) * task.method.scale
    with torch.no_grad():
        before = task(X)
        task.method.merge(b)
        task._cache.clear()
        after = task(X)
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    assert torch.allclose(mha.in_proj_weight, expected, atol=1e-6)
    assert torch.equal(mha.in_proj_weight[32:64], w0[32:64])  # k untouched
    assert set(b.model.state_dict()) == keys
    assert type(mha) is torch.nn.MultiheadAttention and "forward" not in mha.__dict__
    assert not sites.owned(b.model, "block_lora_")


def test_adapter_roundtrip_and_merged_export_load_in_open_clip(tmp_path):
    from vision_ft.export import export_merged, load_adapter, save_adapter

    task = _task()
    perturb_trainable(task.backbone.model)
    task._cache.clear()
    save_adapter(task, tmp_path / "run")
    loaded = load_adapter(tmp_path / "run")
    assert isinstance(loaded.method, BlockLoRA) and loaded.method.n == 8
    with torch.no_grad():
        expected = task(X)
        assert torch.equal(expected, loaded(X))
    out = export_merged(tmp_path / "run", tmp_path / "out")
    logits, text, native = open_clip_export_logits(out, task.backbone.preprocess(X))  # open_clip alone
    assert torch.allclose(logits, expected, atol=1e-4)
    assert not any("block_lora" in k for k in native.state_dict())


def test_n_must_divide_the_input_width_and_n_one_is_clip_lora():
    with pytest.raises(ConfigError, match=r"init_args\.n=5 does not divide the input width 32"):
        BlockLoRA(n=5).apply(OpenCLIP("open_clip_test_tiny"))
    with pytest.raises(ConfigError, match=r"init_args\.n must be"):
        BlockLoRA(n=0)
    b = OpenCLIP("open_clip_test_tiny")
    m = BlockLoRA(n=1)
    m.apply(b)
    perturb_trainable(b.model)
    site = _sites(b)[0]
    a, bb = site.get("block_lora_", "A"), site.get("block_lora_", "B")
    assert a.shape == (2, 32)
    assert torch.allclose(m.site_delta(site), bb @ a * m.scale, atol=1e-7, rtol=0)
