"""MoSA invariants (docs/methods/mosa.md) on tiny ViTs and on the real ViT-B/16 architecture."""

import types

import pytest
import torch
import torch.nn.functional as F

import vision_ft.methods.mosa  # noqa: F401 - registers mosa (and adapter, adaptformer)
from vision_ft.backbones import TimmViT
from vision_ft.errors import ConfigError
from vision_ft.methods.adapters import AdaptFormer
from vision_ft.methods.mosa import MoSA, SparseExpertBottleneck, partition_masks, symmetric_kl
from vision_ft.tasks import ImageClassificationTask

X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 0])
D = 32  # vit_test_tiny width


def _task(**kw):
    torch.manual_seed(0)  # head init
    return ImageClassificationTask(TimmViT("vit_test_tiny"), method=MoSA(**kw), num_classes=3)


def _fill_experts(adapter: SparseExpertBottleneck, seed: int = 0) -> None:
    """Give every expert its own values inside its mask (zero outside, as training leaves them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, (w, b) in enumerate(zip(adapter.up_weights, adapter.up_biases)):
            w.copy_(torch.randn(w.shape, generator=g) * adapter.masks[k])
            b.copy_(torch.randn(b.shape, generator=g))


def _outside_mask_nonzeros(adapter: SparseExpertBottleneck) -> int:
    return sum(int(torch.count_nonzero(w[~adapter.masks[k]])) for k, w in enumerate(adapter.up_weights))


def test_masks_partition_every_up_matrix_into_equal_bins():
    task = _task(bottleneck=12, experts=4)
    for adapter in task.method.adapters(task.backbone):
        m = adapter.masks
        assert m.shape == (4, D, 12) and m.dtype == torch.bool
        assert torch.equal(m.sum(0), torch.ones(D, 12, dtype=torch.long))  # sum_i M_i = 1
        for i in range(4):
            for j in range(i + 1, 4):
                assert not (m[i] & m[j]).any()  # M_i M_j = 0
        assert m.sum((1, 2)).tolist() == [D * 12 // 4] * 4
    # when N does not divide d*b the bins still partition, sizes differ by at most one
    odd = partition_masks((5, 7), 4, torch.Generator().manual_seed(0))
    assert torch.equal(odd.sum(0), torch.ones(5, 7, dtype=torch.long))
    sizes = odd.sum((1, 2))
    assert int(sizes.sum()) == 35 and int(sizes.max() - sizes.min()) <= 1


def test_masks_and_init_are_deterministic_for_a_seed():
    a, b, c = _task(seed=0), _task(seed=0), _task(seed=1)
    for x, y, z in zip(*(t.method.adapters(t.backbone) for t in (a, b, c))):
        assert torch.equal(x.masks, y.masks) and torch.equal(x.down.weight, y.down.weight)
        assert not torch.equal(x.masks, z.masks)
    # independent of the global RNG state before apply()
    torch.manual_seed(123)
    d = ImageClassificationTask(TimmViT("vit_test_tiny"), method=MoSA(seed=0), num_classes=3)
    assert torch.equal(a.method.adapters(a.backbone)[1].masks, d.method.adapters(d.backbone)[1].masks)


def test_experts_are_identical_at_init_and_the_model_is_unchanged():
    task = _task()
    for adapter in task.method.adapters(task.backbone):
        assert all(torch.count_nonzero(w) == 0 for w in adapter.up_weights)
        assert all(torch.count_nonzero(b) == 0 for b in adapter.up_biases)
    base = TimmViT("vit_test_tiny").eval()
    task.train()  # even a training forward (one expert drawn) is the base model at init
    with torch.no_grad():
        assert torch.equal(base(base.preprocess(X)), task.backbone(task.backbone.preprocess(X)))


def test_entries_outside_an_experts_mask_stay_exactly_zero_after_adamw_steps():
    task = _task(consistency=True).train()
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)
    torch.manual_seed(0)
    for _ in range(6):
        outputs = task.forward_outputs(X)
        loss = task.loss(outputs["logits"], Y)
        reg = task.method.regularizer({**outputs, "task": task}, {"image": X, "label": Y})
        loss = loss + reg["mosa_consistency"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = 0
    for adapter in task.method.adapters(task.backbone):
        assert _outside_mask_nonzeros(adapter) == 0
        trained += sum(int(torch.count_nonzero(w[adapter.masks[k]]) > 0)
                       for k, w in enumerate(adapter.up_weights))
    assert trained >= 3, "the experts did not train at all: the test would prove nothing"


def test_an_expert_not_drawn_gets_no_gradient_and_is_skipped_by_the_optimiser():
    """As the official per-expert Linears: the drawn expert trains inside its mask, the others stay put."""
    task = _task().train()
    adapters = task.method.adapters(task.backbone)
    for adapter in adapters:
        adapter.expert = 2
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        task.loss(task(X), Y).backward()
        for adapter in adapters:
            assert all(adapter.up_weights[k].grad is None for k in (0, 1, 3))
            grad = adapter.up_weights[2].grad
            assert torch.count_nonzero(grad[~adapter.masks[2]]) == 0 and torch.count_nonzero(grad) > 0
        opt.step()
    for adapter in adapters:
        assert all(torch.count_nonzero(adapter.up_weights[k]) == 0 for k in (0, 1, 3))
        assert all(torch.count_nonzero(adapter.up_biases[k]) == 0 for k in (0, 1, 3))
        assert torch.count_nonzero(adapter.up_weights[2]) > 0 and _outside_mask_nonzeros(adapter) == 0


def test_each_training_forward_draws_one_expert_from_the_torch_rng():
    adapter = SparseExpertBottleneck(8, 4, partition_masks((8, 4), 4, torch.Generator().manual_seed(0)),
                                     dropout=0.0).train()
    x = torch.randn(3, 8)
    torch.manual_seed(5)
    draws = []
    for _ in range(200):
        adapter(x)
        draws.append(adapter.last_expert)
    torch.manual_seed(5)
    again = []
    for _ in range(200):
        adapter(x)
        again.append(adapter.last_expert)
    assert draws == again
    counts = torch.bincount(torch.tensor(draws), minlength=4)
    assert counts.min() > 25, counts  # uniform over the 4 experts (expected 50 each)


def test_eval_output_of_the_merged_adapter_is_the_mean_over_experts():
    adapter = SparseExpertBottleneck(D, 8, partition_masks((D, 8), 4, torch.Generator().manual_seed(0)),
                                     dropout=0.0)
    _fill_experts(adapter)
    with torch.no_grad():
        adapter.norm.weight.add_(0.3)
    x = torch.randn(5, 7, D)
    with torch.no_grad():
        per_expert = []
        adapter.train()
        for k in range(4):
            adapter.expert = k
            per_expert.append(adapter(x))
        merged = adapter.eval()(x)
        weight, bias = adapter.merged_up()
    assert torch.allclose(merged, torch.stack(per_expert).mean(0), atol=1e-6)
    assert torch.allclose(weight, sum(adapter.up_weights) / 4, atol=1e-7)
    assert not torch.allclose(per_expert[0], per_expert[1], atol=1e-3)  # experts really differ


def test_fold_keeps_the_eval_output_and_leaves_a_plain_adaptformer_sized_adapter():
    task = _task(bottleneck=16).eval()
    for i, adapter in enumerate(task.method.adapters(task.backbone)):
        _fill_experts(adapter, seed=i)
    with torch.no_grad():
        before = task(X)
        task.method.on_train_end(task)
        after = task(X)
    assert torch.allclose(before, after, atol=1e-6)
    state = task.method.adapter_state_dict(task.backbone)
    assert {k.split("mosa_adapter.")[1] for k in state} == {
        "norm.weight", "norm.bias", "down.weight", "down.bias", "up.weight", "up.bias"}
    plain = TimmViT("vit_test_tiny")
    AdaptFormer(bottleneck=16, layernorm=True).apply(plain)
    assert task.method.trainable_parameters(task.backbone) == sum(
        p.numel() for p in plain.model.parameters() if p.requires_grad)
    names = {n for n, p in task.backbone.model.named_parameters() if p.requires_grad}
    assert names and all("mosa_adapter." in n for n in names)
    assert any(n.endswith("mosa_adapter.up.weight") for n in names)


def test_folded_adapter_loads_into_a_fresh_model(tmp_path):
    from vision_ft.export import load_adapter, save_adapter

    task = _task().eval()
    for i, adapter in enumerate(task.method.adapters(task.backbone)):
        _fill_experts(adapter, seed=i)
    task.method.on_train_end(task)
    save_adapter(task, tmp_path)
    loaded = load_adapter(tmp_path)
    assert loaded.method.is_folded(loaded.backbone)
    with torch.no_grad():
        assert torch.equal(task(X), loaded(X))


def test_loading_restores_the_masks_exactly():
    """Resume restores masks from the saved buffers, not from the config's seed."""
    a, b = _task(seed=0), _task(seed=7)
    for i, adapter in enumerate(a.method.adapters(a.backbone)):
        _fill_experts(adapter, seed=i)
    b.method.load_adapter(b.backbone, a.method.adapter_state_dict(a.backbone))
    for x, y in zip(a.method.adapters(a.backbone), b.method.adapters(b.backbone)):
        assert torch.equal(x.masks, y.masks)
        assert all(torch.equal(u, v) for u, v in zip(x.up_weights, y.up_weights))


def test_grad_checkpointing_replays_the_expert_draw():
    results = []
    for gc in (False, True):
        torch.manual_seed(1)
        task = ImageClassificationTask(TimmViT("vit_test_tiny", grad_checkpointing=gc), method=MoSA(),
                                       num_classes=3).train()
        for i, adapter in enumerate(task.method.adapters(task.backbone)):
            _fill_experts(adapter, seed=i)
        torch.manual_seed(0)
        out = task(X)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in task.named_parameters() if p.grad is not None}))
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2)
    assert g1.keys() == g2.keys() and sum("up_weights" in k for k in g1) == 2  # one expert per block
    assert all(torch.allclose(g1[k], g2[k], atol=1e-6) for k in g1)


@pytest.mark.parametrize("bottleneck, folded, training", [(64, 1_208_064, 3_005_184), (16, 322_752, 792_768)])
def test_count_on_vit_base_after_fold_equals_a_plain_adapter(bottleneck, folded, training):
    """The card's 1.208M (b=64) / 0.323M (b=16): AdaptFormer with LN, 12 blocks, head excluded."""
    backbone = TimmViT("vit_base_patch16_224")
    method = MoSA(bottleneck=bottleneck)
    method.apply(backbone)
    assert method.trainable_parameters(backbone) == training  # 4 Up copies while training
    method.fold(backbone)
    assert method.trainable_parameters(backbone) == folded == 12 * (
        2 * 768 + 768 * bottleneck + bottleneck + bottleneck * 768 + 768)


def test_symmetric_kl_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    P, Q = p.softmax(-1), q.softmax(-1)
    expected = 0.5 * ((P * (P / Q).log()).sum(-1) + (Q * (Q / P).log()).sum(-1)).mean()
    assert torch.allclose(symmetric_kl(p, q), expected, atol=1e-6)
    assert torch.allclose(symmetric_kl(q, p), expected, atol=1e-6)
    assert symmetric_kl(p, p).abs() < 1e-6
    # multi-label: one Bernoulli per label
    Ps, Qs = p.sigmoid(), q.sigmoid()
    bern = lambda a, b: a * (a / b).log() + (1 - a) * ((1 - a) / (1 - b)).log()  # noqa: E731
    expected_ml = 0.5 * (bern(Ps, Qs) + bern(Qs, Ps)).sum(-1).mean()
    assert torch.allclose(symmetric_kl(p, q, multilabel=True), expected_ml, atol=1e-5)
    # each direction sends gradient to its second argument only (official symmetric_KL_loss)
    p1, q1 = p.clone().requires_grad_(), q.clone().requires_grad_()
    symmetric_kl(p1, q1).backward()
    p2 = p.clone().requires_grad_()
    (0.5 * F.kl_div(F.log_softmax(p2, -1), Q, reduction="batchmean")).backward()
    assert torch.allclose(p1.grad, p2.grad, atol=1e-6)


def test_consistency_loss_is_a_second_stochastic_forward():
    batch = {"image": X, "label": Y}
    off = _task(consistency=False).train()
    outputs = off.forward_outputs(X)
    assert off.method.regularizer({**outputs, "task": off}, batch) == {}
    task = _task(consistency=True, dropout=0.0).train()
    outputs = task.forward_outputs(X)
    # identical experts at init and no dropout: both forwards agree
    reg = task.method.regularizer({**outputs, "task": task}, batch)
    assert set(reg) == {"mosa_consistency"} and reg["mosa_consistency"].abs() < 1e-6
    for i, adapter in enumerate(task.method.adapters(task.backbone)):
        _fill_experts(adapter, seed=i)
    torch.manual_seed(3)
    outputs = task.forward_outputs(X)
    value = task.method.regularizer({**outputs, "task": task}, batch)["mosa_consistency"]
    assert value > 1e-6
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in task.backbone.model.named_parameters() if "up_weights" in n)
    assert task.method.regularizer({**task.eval().forward_outputs(X), "task": task}, batch) == {}


def test_ddp_without_find_unused_parameters_is_refused():
    strategy = types.SimpleNamespace(_ddp_kwargs={}, world_size=2)
    task = _task()
    fake = types.SimpleNamespace(_trainer=types.SimpleNamespace(strategy=strategy), backbone=task.backbone)
    with pytest.raises(ConfigError, match="ddp_find_unused_parameters_true"):
        task.method.prepare(fake, None)
    strategy._ddp_kwargs = {"find_unused_parameters": True}
    task.method.prepare(fake, None)
    assert task.method.prepared


@pytest.mark.parametrize("kwargs, key", [({"experts": 0}, "experts"), ({"bottleneck": 0}, "bottleneck"),
                                         ({"consistency_weight": -1.0}, "consistency_weight"),
                                         ({"activation": "tanh"}, "activation")])
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"model.init_args.method.init_args.{key}"):
        MoSA(**kwargs)

