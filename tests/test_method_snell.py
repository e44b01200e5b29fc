"""SNELL invariants (docs/methods/snell.md): sparsity, rank, merge, checkpointed gradient, count."""

import math

import pytest
import torch

from vision_ft.methods import sites
import torch.nn.functional as F

import vision_ft.methods.snell  # noqa: F401 - registers "snell"
from conftest import make_task
from vision_ft.backbones import TimmViT
from vision_ft.errors import ConfigError
from vision_ft.methods.snell import SNELL, kernel_matrix, sparsify

X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _small(name="vit_test_small", **kw):
    bb = TimmViT(name)
    method = SNELL(**kw)
    method.apply(bb)
    return bb, method


def _perturb(bb, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in bb.model.named_parameters():
            if "snell_" in n:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _factors(module):
    """(suffix, start, stop, A, B) for each update held by an adapted linear."""
    return [(s.key, s.start, s.stop, s.get("snell_", "A"), s.get("snell_", "B"))
            for s in sites.on_module(module, "snell_")]


def _reference_delta(a, b, s, magnitude=True, scale=0.1):
    """Independent (d_out, d_in) update: official orientation K = c(cdist(A0,B0) - cdist(A1,B1)),
    F.linear(x, sparse(K).T); threshold from a full sort of |K|."""
    d0 = torch.cdist(a[0], b[0])
    d1 = torch.cdist(a[1], b[1])
    k = scale * d0 - scale * d1  # (d_in, d_out)
    if s == 0:
        return k.t()
    mag = k.detach().abs()
    n_zero = int(math.floor(s * k.numel() + 0.5))
    thr = mag.flatten().sort().values[n_zero - 1]
    keep = (mag > thr).to(k.dtype)
    return (k * (mag * keep if magnitude else keep)).t()


# --- count -----------------------------------------------------------------------------------
def test_trainable_count_on_vit_base_is_1_327_104_and_only_factors_are_saved():
    bb = TimmViT("vit_base_patch16_224")
    method = SNELL(r=8)
    method.apply(bb)
    # 12 blocks * r * [4 * (768 + 768) (q, k, v, proj) + 2 * (768 + 3072) (fc1, fc2)]
    assert method.trainable_parameters(bb) == 1_327_104
    state = method.adapter_state_dict(bb)
    assert sum(v.numel() for v in state.values()) == 1_327_104  # no mask / index stored
    assert len(state) == 12 * 6 * 2
    a = bb.model.blocks[0].attn.qkv.snell_A_q
    b = bb.model.blocks[0].mlp.fc1.snell_B
    assert tuple(a.shape) == (2, 768, 4) and tuple(b.shape) == (2, 3072, 4)


# --- sparsification ------------------------------------------------------------------------
@pytest.mark.parametrize("s", [0.1, 0.3, 0.9, 0.995])
def test_nonzero_fraction_is_one_minus_s_and_survivors_are_the_largest(s):
    bb, method = _small("vit_test_tiny", sparsity=s)
    _perturb(bb)
    checked = 0
    for module in method.adapted_modules(bb):
        full = method.delta(module)
        for _, start, stop, a, b in _factors(module):
            dw = full[start:stop]
            k = kernel_matrix(a, b, 0.1).t()
            n = dw.numel()
            assert int((dw != 0).sum()) == n - int(math.floor(s * n + 0.5))
            kept, dropped = k.abs()[dw != 0], k.abs()[dw == 0]
            assert kept.min() > dropped.max()
            checked += 1
    assert checked == 2 * 6  # 2 blocks x (q, k, v, proj, fc1, fc2)


def test_sparsity_zero_keeps_the_dense_kernel_as_official_klora():
    bb, method = _small(sparsity=0.0)
    lin = bb.model.blocks[1].mlp.fc2
    _, _, _, a, b = _factors(lin)[0]
    dw = method.delta(lin)
    assert torch.equal(dw, kernel_matrix(a, b, 0.1).t())
    assert bool((dw != 0).all())


def test_update_matches_the_official_formula_in_the_forward():
    """y = W x + b + sparse(K)^T x, with K * |K| survivors (official) or K (mask only)."""
    for magnitude in (True, False):
        bb, method = _small(sparsity=0.4, magnitude_weighting=magnitude)
        _perturb(bb)
        bb.eval()
        x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(2))
        for lin in (bb.model.blocks[0].attn.qkv, bb.model.blocks[2].mlp.fc1):
            ref = F.linear(x, lin.weight, lin.bias)
            parts = [ref[..., start:stop] + F.linear(x, _reference_delta(a, b, 0.4, magnitude))
                     for _, start, stop, a, b in _factors(lin)]
            with torch.no_grad():
                assert torch.allclose(lin(x), torch.cat(parts, -1), atol=1e-6, rtol=0)


def test_sparsify_handles_more_than_2_pow_24_entries():
    """The official torch.quantile threshold is capped at 2^24 inputs on older torch (the
    code's 1.12); the kthvalue threshold has no cap (e.g. ViT-g/H-sized matrices)."""
    k = torch.randn(4097, 4097, generator=torch.Generator().manual_seed(0))  # 2^24 + 8193 entries
    out = sparsify(k, 0.5)
    assert int((out != 0).sum()) == k.numel() - int(math.floor(0.5 * k.numel() + 0.5))


# --- rank ----------------------------------------------------------------------------------
@pytest.mark.parametrize("s", [0.0, 0.3])
def test_kernelised_update_has_rank_above_r_where_lora_has_rank_r(s):
    bb, method = _small(r=8, sparsity=s)
    lin = bb.model.blocks[0].mlp.fc1  # 96 -> 384
    a = lin.snell_A.detach().double()
    b = lin.snell_B.detach().double()
    dw = sparsify(kernel_matrix(a, b, 0.1), s).t()  # float64: numerical rank is meaningful
    rank = int(torch.linalg.matrix_rank(dw))
    assert rank > 8
    assert rank >= 90  # close to full (96)
    # control: the same factors merged by LoRA's inner product stay at rank <= r
    lora = b.permute(1, 0, 2).reshape(384, 8) @ a.permute(1, 0, 2).reshape(96, 8).t()
    assert int(torch.linalg.matrix_rank(lora)) <= 8


# --- init -----------------------------------------------------------------------------------
def test_update_is_nonzero_at_init_so_zero_init_is_false():
    assert SNELL.zero_init is False
    base = TimmViT("vit_test_tiny").eval()
    bb, method = _small("vit_test_tiny")
    bb.eval()
    with torch.no_grad():
        assert not torch.equal(base(base.preprocess(X)), bb(bb.preprocess(X)))
    assert all(bool(method.delta(m).abs().sum() > 0) for m in method.adapted_modules(bb))


# --- regularisation on the update path (official TuningModule) ------------------------------------
def test_drop_path_drops_each_update_per_sample_and_dropout_acts_in_training_only():
    torch.manual_seed(0)
    bb, method = _small("vit_test_tiny", drop_path=0.5, dropout=0.0)
    _perturb(bb)
    qkv = bb.model.blocks[0].attn.qkv
    x = torch.randn(64, 3, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = F.linear(x, qkv.weight, qkv.bias)
        full = F.linear(x, method.delta(qkv))
        got = qkv.train()(x) - base
    kept = []
    for _, start, stop, _, _ in _factors(qkv):  # q, k, v: one DropPath each
        d, f = got[..., start:stop], full[..., start:stop]
        dropped = d.abs().flatten(1).amax(1) == 0
        assert torch.allclose(d[~dropped], 2 * f[~dropped], atol=1e-6)
        assert 10 < int(dropped.sum()) < 54
        kept.append(~dropped)
    assert not torch.equal(kept[0], kept[1])  # independent per update
    with torch.no_grad():  # eval: neither dropout nor drop-path
        assert torch.allclose(qkv.eval()(x), base + full, atol=1e-6)
    bb, method = _small("vit_test_tiny", drop_path=0.0, dropout=0.5)
    fc1 = bb.model.blocks[0].mlp.fc1
    with torch.no_grad():
        assert not torch.allclose(fc1.train()(x), fc1.eval()(x))


# --- merge ----------------------------------------------------------------------------------
def test_merged_equals_unmerged_and_leaves_a_plain_timm_model():
    task = make_task(SNELL(sparsity=0.5)).eval()
    _perturb(task.backbone, scale=0.2)
    with torch.no_grad():
        before = task(X)
        task.method.merge(task.backbone)
        after = task(X)
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    model = task.backbone.model
    assert not any("snell_" in n for n, _ in model.named_parameters())
    assert not any(m._forward_hooks for m in model.modules())
    assert not sites.owned(model, "snell_")


def test_only_targeted_rows_of_the_fused_qkv_change():
    bb, method = _small(targets=["q", "v"], sparsity=0.2)
    _perturb(bb)
    qkv = bb.model.blocks[0].attn.qkv
    w0 = qkv.weight.detach().clone()
    proj0 = bb.model.blocks[0].attn.proj.weight.detach().clone()
    dw = method.delta(qkv)
    assert bool((dw[96:192] == 0).all()) and bool((dw[:96] != 0).any()) and bool((dw[192:] != 0).any())
    method.merge(bb)
    assert torch.equal(qkv.weight[96:192], w0[96:192])
    assert not torch.equal(qkv.weight[:96], w0[:96]) and not torch.equal(qkv.weight[192:], w0[192:])
    assert torch.equal(bb.model.blocks[0].attn.proj.weight, proj0)


# --- checkpointed backward ---------------------------------------------------------------------
def _grads(lin, x, fn):
    for p in (x, *[p for n, p in lin.named_parameters() if "snell_" in n]):
        p.grad = None
    y = fn(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return [x.grad.clone()] + [p.grad.clone() for n, p in lin.named_parameters() if "snell_" in n]


@pytest.mark.parametrize("role", ["qkv", "fc1"])
def test_checkpointed_gradient_equals_dense_reference(role):
    bb, method = _small(sparsity=0.3, dropout=0.0, drop_path=0.0)
    _perturb(bb)
    lin = bb.model.blocks[1].attn.qkv if role == "qkv" else bb.model.blocks[1].mlp.fc1
    assert method.recompute
    x = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(3), requires_grad=True)

    def reference(inp):  # no checkpoint, dense update built independently
        rows = [_reference_delta(a, b, 0.3) for _, _, _, a, b in _factors(lin)]
        return F.linear(inp, lin.weight + torch.cat(rows, 0), lin.bias)

    got, ref = _grads(lin, x, lin), _grads(lin, x, reference)
    assert len(got) == 1 + 2 * len(_factors(lin))
    for g, r in zip(got, ref):
        assert g.abs().sum() > 0
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-4)


def test_recompute_matches_no_recompute_with_dropout_and_drop_path():
    grads = []
    for recompute in (True, False):
        torch.manual_seed(0)
        bb, method = _small(recompute=recompute)
        _perturb(bb)
        lin = bb.model.blocks[0].attn.qkv
        x = torch.randn(4, 5, 96, generator=torch.Generator().manual_seed(3), requires_grad=True)
        torch.manual_seed(7)
        grads.append(_grads(lin, x, lin))
    for g, r in zip(*grads):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-5)


def test_checkpoint_keeps_no_dense_update_for_backward():
    """With recompute, the tensors saved for backward are x and the factors, never a d_out x d_in one."""
    def saved_sizes(recompute):
        bb, method = _small(recompute=recompute, dropout=0.0, drop_path=0.0)
        lin = bb.model.blocks[0].mlp.fc1  # 96 -> 384
        params = {p.data_ptr() for p in bb.model.parameters()}
        sizes = []

        def pack(t):
            if t.data_ptr() not in params:
                sizes.append(t.numel())
            return t

        x = torch.randn(1, 3, 96, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lin(x).sum().backward()
        return sizes

    dense = 96 * 384
    assert max(saved_sizes(recompute=True)) < dense
    assert max(saved_sizes(recompute=False)) >= dense  # the test can tell the difference


# --- config --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, key", [
    (dict(r=7), "init_args.r"), (dict(r=0), "init_args.r"),
    (dict(sparsity=1.0), "init_args.sparsity"), (dict(sparsity=-0.1), "init_args.sparsity"),
    (dict(targets=["qkv"]), "init_args.targets"), (dict(dropout=1.0), "init_args.dropout"),
])
def test_bad_config_names_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        SNELL(**kw)


def test_block_out_of_range_names_the_key():
    with pytest.raises(ConfigError, match="init_args.blocks"):
        SNELL(blocks=[5]).apply(TimmViT("vit_test_tiny"))
