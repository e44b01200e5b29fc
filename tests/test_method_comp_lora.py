"""Comp-LoRA: count, Delta W orthogonal to the leading left-singular subspace (also after AdamW),
step-0 = zero-shot, exact merge, branch = dense path, saved basis, native export, config errors."""


import pytest
import torch

from clip_helpers import NAMES, X, encode_both, open_clip_export_logits, perturb_trainable
import vision_ft.methods.comp_lora  # noqa: F401 - registers comp_lora
from vision_ft.backbones.open_clip import OpenCLIP
from vision_ft.errors import ConfigError
from vision_ft.methods import sites
from vision_ft.methods.comp_lora import CompLoRA
from vision_ft.tasks.clip_classification import CLIPClassificationTask


def _sites(backbone):
    """(site, role, frozen rows) of every adapted site."""
    return [(site, site.role, site.weight.detach()) for site in sites.owned(backbone.model, "comp_lora_")]


def _task(**kw):
    method = {"class_path": "vision_ft.methods.comp_lora.CompLoRA", "init_args": kw}
    return CLIPClassificationTask(OpenCLIP("open_clip_test_tiny"), method=method, num_classes=4, class_names=NAMES,
                                  templates=["a photo of a {}.", "a {} image."]).eval()


def test_count_on_vit_b16_both_towers_equals_clip_lora_plus_saved_bases():
    backbone = OpenCLIP("ViT-B-16")
    method = CompLoRA()
    method.apply(backbone)
    assert method.k == 8 and method.r == 2
    # trainable: 2 * (768 + 768) * 3 * 12 + 2 * (512 + 512) * 3 * 12, the projector adds nothing trainable
    assert method.trainable_parameters(backbone) == 184_320
    saved = method.adapter_state_dict(backbone)
    bases = {k: v for k, v in saved.items() if ".comp_lora_U_" in k}
    assert len(bases) == 3 * 24 and sum(v.numel() for v in bases.values()) == 8 * (768 + 512) * 3 * 12 == 368_640
    assert sum(v.numel() for v in saved.values()) == 184_320 + 368_640
    assert all(not p.requires_grad for n, p in backbone.model.named_parameters() if "comp_lora_" not in n)


def test_update_is_orthogonal_to_the_leading_singular_subspace_also_after_adamw():
    b = OpenCLIP("open_clip_test_tiny")
    m = CompLoRA(k=12, targets=["q", "k", "v", "o"], dropout=0.0)
    m.apply(b)
    perturb_trainable(b.model)  # random non-zero B and A
    adapted = _sites(b)
    assert len(adapted) == 4 * 4
    for site, t, w in adapted:
        u = site.get("comp_lora_", "U")
        assert u.shape == (32, 12) and not u.requires_grad
        # U_k spans the leading left-singular subspace of this very row block (float64 reference)
        ref = torch.linalg.svd(w.double())[0][:, :12]
        assert torch.allclose((u @ u.T).double(), ref @ ref.T, atol=1e-5)
    params = [p for p in b.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)
    before = {site.name: site.get("comp_lora_", "B").detach().clone() for site, t, _ in adapted if t == "q"}
    for _ in range(3):
        img, txt = encode_both(b)
        loss = (img ** 2).sum() + (txt ** 3).sum()
        opt.zero_grad()
        loss.backward()
        for site, t, _ in adapted:  # the projected-out part of B gets no gradient ...
            u, g = site.get("comp_lora_", "U"), site.get("comp_lora_", "B").grad
            assert (u.T @ g).norm() <= 1e-5 * g.norm()
        opt.step()
    for site, t, _ in adapted:
        u = site.get("comp_lora_", "U")
        delta = m.site_delta(site)
        raw = site.get("comp_lora_", "B") @ site.get("comp_lora_", "A")
        assert delta.norm() > 1e-3
        assert (u.T @ delta).norm() / delta.norm() < 1e-5
        assert (u.T @ raw).norm() / raw.norm() > 1e-2  # ... yet B itself is not confined: the projection does it
    # ... and AdamW's per-coordinate steps moved B inside span(U_k) too (why a projected gradient is not enough)
    moved = [(site.get("comp_lora_", "U").T @ (site.get("comp_lora_", "B") - before[site.name])).norm()
             for site, t, _ in adapted if t == "q"]
    assert max(moved) > 1e-4


def test_zero_init_is_the_zero_shot_model_on_both_towers():
    base = OpenCLIP("open_clip_test_tiny").eval()
    base.requires_grad_(False)  # the frozen zero-shot model (PyTorch's attention kernel depends on requires_grad)
    b = OpenCLIP("open_clip_test_tiny").eval()
    CompLoRA().apply(b)
    with torch.no_grad():
        for ref, out in zip(encode_both(base), encode_both(b)):
            assert torch.equal(ref, out)


def test_merge_is_exact_and_leaves_a_plain_model():
    task = _task(targets=["q", "v"])
    b = task.backbone
    keys = set(OpenCLIP("open_clip_test_tiny").model.state_dict())  # the plain open_clip model's
    assert any("comp_lora_U_" in k for k in b.model.state_dict())
    mha = b.model.visual.transformer.resblocks[1].attn
    w0 = mha.in_proj_weight.detach().clone()
    perturb_trainable(b.model)
    task._cache.clear()
    m = task.method
    expected = w0.clone()
    for t, rows in (("q", slice(0, 32)), ("v", slice(64, 96))):
        u, bt, at = (getattr(mha, f"comp_lora_{x}_{t}") for x in "UBA")
        expected[rows] += (torch.eye(32) - u @ u.T) @ bt @ at * m.scale
    assert (expected - w0).abs().max() > 1e-2  # a real update is merged
    with torch.no_grad():
        before = task(X)
        m.merge(b)
        task._cache.clear()
        after = task(X)
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    assert torch.allclose(mha.in_proj_weight, expected, atol=1e-6)
    assert torch.equal(mha.in_proj_weight[32:64], w0[32:64])  # k untouched
    assert set(b.model.state_dict()) == keys  # no comp_lora_ parameters or buffers left
    assert not [n for n, _ in [*b.model.named_parameters(), *b.model.named_buffers()] if "comp_lora_" in n]
    assert type(mha) is torch.nn.MultiheadAttention and "forward" not in mha.__dict__
    assert not sites.owned(b.model, "comp_lora_")


def test_branch_path_equals_the_dense_path():
    """Training with dropout computes s (I - U U^T) B A x per token (branch); eval folds Delta W into the
    packed weight (delta): both give the same attention."""
    b = OpenCLIP("open_clip_test_tiny")
    METHOD = CompLoRA(targets=["q", "k", "v", "o"], dropout=0.25)
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
    site, t, _ = _sites(b)[0]
    x = torch.randn(5, 32)
    assert torch.allclose(METHOD.site_branch(site, x), x @ METHOD.site_delta(site).T, atol=1e-6)


def test_adapter_saves_the_basis_roundtrip_and_merged_export_load_in_open_clip(tmp_path):
    from safetensors.torch import load_file

    from vision_ft.export import export_merged, load_adapter, save_adapter

    task = _task()
    perturb_trainable(task.backbone.model)
    task._cache.clear()
    save_adapter(task, tmp_path / "run")
    tensors = load_file(tmp_path / "run" / "adapter.safetensors")
    bases = [k for k in tensors if ".comp_lora_U_" in k]
    assert len(bases) == 3 * 4 and all(tensors[k].shape == (32, 8) for k in bases)
    loaded = load_adapter(tmp_path / "run")
    assert isinstance(loaded.method, CompLoRA) and loaded.method.k == 8
    mha = loaded.backbone.model.transformer.resblocks[0].attn
    assert torch.equal(mha.comp_lora_U_k, task.backbone.model.transformer.resblocks[0].attn.comp_lora_U_k)
    with torch.no_grad():
        expected = task(X)
        assert torch.equal(expected, loaded(X))
    out = export_merged(tmp_path / "run", tmp_path / "out")
    logits, text, native = open_clip_export_logits(out, task.backbone.preprocess(X))  # open_clip alone
    assert torch.allclose(logits, expected, atol=1e-4)
    assert not any("comp_lora" in k for k in native.state_dict())


def test_k_zero_is_clip_lora_and_bad_k_is_a_config_error():
    from vision_ft.methods.clip_lora import CLIPLoRA

    torch.manual_seed(0)
    a = OpenCLIP("open_clip_test_tiny")
    CompLoRA(k=0).apply(a)
    torch.manual_seed(0)
    b = OpenCLIP("open_clip_test_tiny")
    CLIPLoRA().apply(b)
    perturb_trainable(a.model)
    perturb_trainable(b.model)
    with torch.no_grad():
        for x, y in zip(encode_both(a.eval()), encode_both(b.eval())):
            assert torch.allclose(x, y, atol=1e-6)
    with pytest.raises(ConfigError, match=r"init_args\.k=32"):
        CompLoRA(k=32).apply(OpenCLIP("open_clip_test_tiny"))  # width 32: nothing left to adapt
    with pytest.raises(ConfigError, match=r"init_args\.k must be"):
        CompLoRA(k=-1)
    with pytest.raises(ConfigError, match="dropout"):
        CompLoRA(dropout=1.0)
