"""PEGO: LoRA group on q/v rows of the fused qkv, L1 orthogonality regulariser, exact merge."""

import copy

import pytest
import torch

from vision_ft.methods import sites

import vision_ft.methods.pego  # noqa: F401 - registers "pego"
from conftest import make_task
from vision_ft.backbones import TimmViT
from vision_ft.errors import ConfigError
from vision_ft.methods.pego import PEGO, orthogonality_terms

X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _task(**init_args):
    return make_task({"class_path": "vision_ft.methods.pego.PEGO", "init_args": init_args}).eval()


def _qkv(task, i=0):
    return task.backbone.model.blocks[i].attn.qkv


def _randomise(task, seed=1, scale=0.1):
    """Non-zero B (and fresh A) so every term is active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in task.backbone.model.named_parameters():
            if "pego_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def _dense_reference(task):
    """The card's formula from the raw qkv weight: rows [0:d] are q, [2d:3d] are v."""
    total = torch.zeros((), dtype=torch.float64)
    for block in task.backbone.model.blocks:
        qkv = block.attn.qkv
        d = qkv.in_features
        for role, rows in (("q", slice(0, d)), ("v", slice(2 * d, 3 * d))):
            w = qkv.weight[rows].double()
            a, b = getattr(qkv, f"pego_A_{role}").double(), getattr(qkv, f"pego_B_{role}").double()
            dws = [b[i] @ a[i] for i in range(a.shape[0])]
            for i, dw in enumerate(dws):
                total += (w @ dw.T).abs().sum()
                for j in range(i + 1, len(dws)):
                    total += (dw @ dws[j].T).abs().sum()
    return total


def test_trainable_count_on_vit_base_matches_the_card():
    base = TimmViT("vit_base_patch16_224")
    for n, expected in ((2, 294_912), (4, 589_824)):
        backbone = copy.deepcopy(base) if n == 2 else base
        method = PEGO(num_modules=n)
        method.apply(backbone)
        assert method.trainable_parameters(backbone) == expected
        trainable = {k: tuple(p.shape) for k, p in backbone.model.named_parameters() if p.requires_grad}
        assert trainable["blocks.11.attn.qkv.pego_A_v"] == (n, 4, 768)
        assert trainable["blocks.11.attn.qkv.pego_B_q"] == (n, 768, 4)
        assert len(trainable) == 12 * 4 and all(k.split(".")[-1].startswith("pego_") for k in trainable)


def test_parameters_are_fp32_kaiming_a_and_zero_b():
    task = _task()
    qkv = _qkv(task)
    a, b = qkv.pego_A_q, qkv.pego_B_q
    assert a.dtype == b.dtype == torch.float32
    assert torch.count_nonzero(b) == 0
    bound = 1 / qkv.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) on (r, d_in)
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound
    assert not torch.equal(a[0], a[1])  # the modules start from different A


def test_regulariser_is_zero_at_init_and_named_pego_orth():
    task = _task()
    reg = task.method.regularizer({"task": task}, None)
    assert set(reg) == {"pego_orth"}
    assert reg["pego_orth"].item() == 0.0
    assert torch.count_nonzero(_qkv(task).pego_A_v) > 0  # zero because B = 0, not because A = 0


def test_regulariser_equals_dense_computation():
    task = _task(num_modules=3, orth_weight=0.01)
    _randomise(task)
    value = task.method.regularizer({"task": task}, None)["pego_orth"]
    assert value.dtype == torch.float32
    ref = 0.01 * _dense_reference(task)
    assert ref > 0
    assert torch.allclose(value.double(), ref, rtol=1e-5, atol=0)


def test_diversity_term_vanishes_iff_module_row_spaces_are_orthogonal():
    task = _task(num_modules=4)
    _randomise(task)
    d, n, r = 32, 4, 4
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in task.backbone.model.blocks:
            for role in ("q", "v"):
                basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g))  # orthonormal columns
                rows = basis.T[: n * r].reshape(n, r, d)                    # disjoint orthonormal rows
                mix = torch.randn(n, r, r, generator=g)                     # same row space, not orthonormal
                getattr(block.attn.qkv, f"pego_A_{role}").copy_(mix @ rows)
    terms = orthogonality_terms(task.backbone.model)
    assert terms["preserve"] > 1e-2
    assert terms["diverse"].abs() < 1e-5 * terms["preserve"]

    _randomise(task, seed=4)  # generic A: overlapping row spaces
    terms = orthogonality_terms(task.backbone.model)
    assert terms["diverse"] > 1e-3


def test_single_module_has_no_diversity_term():
    task = _task(num_modules=1)
    _randomise(task)
    terms = orthogonality_terms(task.backbone.model)
    assert terms["diverse"].item() == 0.0 and terms["preserve"] > 0


def test_update_adds_sum_of_ba_x_into_q_and_v_rows_only():
    task = _task(num_modules=2)
    _randomise(task)
    qkv = _qkv(task, 1)
    x = torch.randn(2, 5, qkv.in_features)
    d = qkv.in_features
    with torch.no_grad():
        plain = torch.nn.functional.linear(x, qkv.weight, qkv.bias)
        out = qkv(x)
        for role, rows in (("q", slice(0, d)), ("v", slice(2 * d, 3 * d))):
            a, b = getattr(qkv, f"pego_A_{role}"), getattr(qkv, f"pego_B_{role}")
            expected = plain[..., rows] + sum(x @ (b[i] @ a[i]).T for i in range(2))
            assert torch.allclose(out[..., rows], expected, atol=1e-6)
            assert not torch.allclose(out[..., rows], plain[..., rows], atol=1e-3)
    assert torch.equal(out[..., d:2 * d], plain[..., d:2 * d])  # k untouched


def test_gradients_reach_both_factors_from_task_loss_and_regulariser():
    task = _task()
    task.train()
    _randomise(task)
    loss = task.loss(task(X), torch.tensor([0, 1, 2, 0]))
    reg = task.method.regularizer({"task": task}, None)["pego_orth"]
    (loss + reg).backward()
    qkv = _qkv(task)
    for name in ("pego_A_q", "pego_B_q", "pego_A_v", "pego_B_v"):
        grad = getattr(qkv, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert qkv.weight.grad is None  # W frozen


def test_regulariser_gradient_matches_dense_autograd():
    task = _task(num_modules=2)
    _randomise(task)
    qkv = _qkv(task)
    task.method.regularizer({"task": task}, None)["pego_orth"].backward()
    ours = qkv.pego_B_v.grad.clone()
    for p in task.backbone.model.parameters():
        p.grad = None
    (1e-3 * _dense_reference(task)).backward()
    assert torch.allclose(ours.double(), qkv.pego_B_v.grad.double(), rtol=1e-4, atol=1e-9)


def test_merge_is_exact_and_changes_only_q_and_v_rows():
    task = _task(num_modules=4)
    _randomise(task)
    qkv = _qkv(task)
    d = qkv.in_features
    w_before = qkv.weight.detach().clone()
    with torch.no_grad():
        before = task(X)
        task.method.merge(task.backbone)
        after = task(X)
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    w = qkv.weight.detach()
    assert torch.equal(w[d:2 * d], w_before[d:2 * d])
    assert not torch.allclose(w[:d], w_before[:d]) and not torch.allclose(w[2 * d:], w_before[2 * d:])
    assert not any("pego_" in k for k in task.backbone.model.state_dict())
    assert all(not m._forward_hooks for m in task.backbone.model.modules())
    assert not sites.owned(task.backbone.model, "pego_")
    assert task.method.regularizer({"task": task}, None) == {}


def test_zero_init_under_autocast_and_fp32_regulariser():
    task = _task()
    base = TimmViT("vit_test_tiny").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(task.backbone(task.backbone.preprocess(X)), base(base.preprocess(X)))
    _randomise(task)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        task(X)
        reg = task.method.regularizer({"task": task}, None)["pego_orth"]
    assert reg.dtype == torch.float32
    assert torch.allclose(reg.double(), 1e-3 * _dense_reference(task), rtol=1e-5)


def test_orth_weight_zero_disables_the_regulariser():
    task = _task(orth_weight=0.0)
    _randomise(task)
    assert task.method.regularizer({"task": task}, None) == {}


def test_targets_choose_the_rows():
    task = _task(targets=["k"])
    _randomise(task)
    qkv = _qkv(task)
    d = qkv.in_features
    assert [(s.key, s.start, s.stop) for s in sites.owned(task.backbone.model, "pego_")][:1] == [("k", d, 2 * d)]
    x = torch.randn(3, qkv.in_features)
    with torch.no_grad():
        plain = torch.nn.functional.linear(x, qkv.weight, qkv.bias)
        out = qkv(x)
    assert torch.equal(out[:, :d], plain[:, :d]) and torch.equal(out[:, 2 * d:], plain[:, 2 * d:])
    assert not torch.allclose(out[:, d:2 * d], plain[:, d:2 * d])


@pytest.mark.parametrize("kwargs, key", [
    ({"num_modules": 0}, "num_modules"),
    ({"r": 0}, "r must"),
    ({"orth_weight": -1e-3}, "orth_weight"),
    ({"orth_weight": float("nan")}, "orth_weight"),
    ({"targets": ["qkv"]}, "targets"),
    ({"targets": []}, "targets"),
    ({"targets": ["q", "q"]}, "targets"),
])
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"model.init_args.method.init_args.{key}"):
        PEGO(**kwargs)


def test_adapter_reloads_on_a_fresh_model_and_resumes_the_regulariser(tmp_path):
    from vision_ft.export import load_adapter, save_adapter

    task = _task(num_modules=4)
    _randomise(task)
    save_adapter(task, tmp_path, {"val/acc": 0.5})
    loaded = load_adapter(tmp_path)
    assert loaded.method.config() == {"num_modules": 4, "r": 4, "orth_weight": 1e-3, "targets": ["q", "v"]}
    with torch.no_grad():
        assert torch.equal(task(X), loaded(X))
    a = task.method.regularizer({"task": task}, None)["pego_orth"]
    b = loaded.method.regularizer({"task": loaded}, None)["pego_orth"]
    assert torch.equal(a, b)
