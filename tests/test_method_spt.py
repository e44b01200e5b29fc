"""SPT-LoRA / SPT-Adapter: sensitivity, budget allocation, sparse deltas, rebuild from buffers, merge."""

import logging

import pytest
import torch
import torch.nn.functional as F

import vision_ft.methods.spt as spt
from conftest import TinyData, make_task
from vision_ft.backbones import TimmViT
from vision_ft.errors import AdapterError, ConfigError
from vision_ft.methods import _sparse
from vision_ft.methods._sparse import dense_delta, sparse_delta
from vision_ft.methods.spt import NONE, SPARSE, STRUCTURED, SPTAdapter, SPTLoRA, allocate, score_sites

X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
VARIANTS = {"spt_lora": SPTLoRA, "spt_adapter": SPTAdapter}


def spt_task(name="spt_lora", budget=3000, data=None, num_classes=3, backbone="vit_test_tiny", **kw):
    """A tiny task prepared on TinyData; the global seed is fixed first (the random head is scored)."""
    cls = VARIANTS[name]
    kw = {"n_images": 16, "batch_size": 8, **kw}
    torch.manual_seed(0)
    task = make_task(cls(budget=budget, **kw), num_classes=num_classes, name=backbone, prepare=False)
    task.method.prepare(task, data or TinyData(num_classes=num_classes, size=task.backbone.input_size[0]))
    return task


def perturb(task, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in task.backbone.model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def accounting(task):
    """Trainable count recomputed from the stored allocation: P_mod / k / d per site + class token."""
    method, model = task.method, task.backbone.model
    sites = score_sites(task.backbone, method.vectors)
    codes = model.get_buffer(f"{method.prefix}allocation").tolist()
    costs, _ = method.site_costs(sites)
    total = model.cls_token.numel()
    for site, code, cost in zip(sites, codes, costs):
        host = model.get_submodule(site.module)
        if code == STRUCTURED:
            total += cost
        elif code == SPARSE:
            total += host.get_buffer(site.tensor_name(method.prefix, "_index")).shape[-1]
    return total


# --- the sparse delta --------------------------------------------------------------------------
def _sparse_case(d_out=12, d_in=10, k=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(d_out * d_in, generator=g)[:k].sort().values
    index = torch.stack([flat // d_in, flat % d_in])
    x = torch.randn(2, 5, d_in, generator=g)
    w, b = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
    values = torch.randn(k, generator=g)
    upstream = torch.randn(2, 5, d_out, generator=g)
    return x, w, b, index, values, upstream


@pytest.mark.parametrize("max_elements", [1 << 24, 7])  # one chunk / many chunks of k
def test_sparse_linear_equals_dense_masked_linear_in_outputs_and_gradients(max_elements, monkeypatch):
    monkeypatch.setattr(_sparse, "MAX_ELEMENTS", max_elements)
    x, w, b, index, values, upstream = _sparse_case()
    xs, vs = x.clone().requires_grad_(), values.clone().requires_grad_()
    ys = F.linear(xs, w, b) + sparse_delta(xs, vs, index, w.shape[0])
    (ys * upstream).sum().backward()
    mask = torch.zeros_like(w)
    mask[index[0], index[1]] = 1.0
    delta_dense = dense_delta(values, index, tuple(w.shape)).requires_grad_()
    xd = x.clone().requires_grad_()
    yd = F.linear(xd, w + mask * delta_dense, b)
    (yd * upstream).sum().backward()
    assert torch.allclose(ys, yd, atol=1e-5, rtol=0)
    assert torch.allclose(vs.grad, delta_dense.grad[index[0], index[1]], atol=1e-5, rtol=0)
    assert torch.allclose(xs.grad, xd.grad, atol=1e-5, rtol=0)
    assert torch.all(delta_dense.grad[mask == 0] == 0)  # the masked dense update has no gradient elsewhere


def test_sparse_gradient_is_sum_over_tokens_of_g_times_x():
    x, w, _, index, values, upstream = _sparse_case()
    vs = values.clone().requires_grad_()
    (sparse_delta(x, vs, index, w.shape[0]) * upstream).sum().backward()
    g2, x2 = upstream.reshape(-1, w.shape[0]), x.reshape(-1, w.shape[1])
    expected = torch.stack([(g2[:, i] * x2[:, j]).sum() for i, j in index.t().tolist()])
    assert torch.allclose(vs.grad, expected, atol=1e-6, rtol=0)


def test_sparse_delta_passes_gradcheck():
    x, w, _, index, values, _ = _sparse_case(d_out=5, d_in=4, k=6)
    x, values = x.double().requires_grad_(), values.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, v: sparse_delta(a, v, index, 5), (x, values))


# --- allocation (Algorithm 1) ------------------------------------------------------------------
def _random_problem(seed, sizes=(64, 64, 256, 16, 16, 8), costs=(40, 40, 100, 16, 16, 8),
                    ratios=(10.0, 10.0, 10.0, 5.0, 5.0, 5.0)):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(n, generator=g) ** (1 + 3 * torch.rand(1, generator=g).item()) * torch.rand(1, generator=g)
              for n in sizes]
    desc = [torch.sort(s, descending=True).values for s in scores]
    return desc, list(costs), list(ratios)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [5, 37, 120, 260, 330])
def test_allocation_fits_the_budget_maximally_and_obeys_the_structured_rule(seed, budget):
    desc, costs, ratios = _random_problem(seed)
    result = allocate(desc, costs, ratios, budget)
    spent = sum(c if m == STRUCTURED else n for m, n, c in zip(result.modes, result.counts, costs))
    assert spent == result.total <= budget
    slack = budget - result.total
    for s, mode, count, cost, ratio in zip(desc, result.modes, result.counts, costs, ratios):
        assert count >= int((s >= result.tau).sum())  # every weight at or above tau is selected
        if mode == STRUCTURED:
            assert count >= cost / ratio
            continue
        assert count < cost / ratio and (mode == SPARSE) == (count > 0)
        if count < len(s) and slack > 0:  # maximal: one more entry here would need a module beyond the slack
            assert count + 1 >= cost / ratio and cost - count > slack


def test_allocation_threshold_is_the_largest_global_top_k_that_fits():
    """Brute force over the global ranking: tau selects exactly the longest prefix within budget."""
    desc, costs, ratios = _random_problem(7)
    budget = 150
    values = torch.cat(desc)
    owner = torch.cat([torch.full((len(s),), m) for m, s in enumerate(desc)])
    ranked = owner[torch.argsort(values, descending=True)]

    def total(k):
        counts = torch.bincount(ranked[:k], minlength=len(desc)).tolist()
        return sum(c if n >= c / r else n for n, c, r in zip(counts, costs, ratios))

    best = max(k for k in range(len(values) + 1) if total(k) <= budget)
    result = allocate(desc, costs, ratios, budget)
    assert int((values >= result.tau).sum()) == best


def test_allocation_beyond_reach_selects_everything():
    desc, costs, ratios = _random_problem(0)
    result = allocate(desc, costs, ratios, 10**9)
    assert result.tau == 0.0 and all(m == STRUCTURED for m in result.modes)
    assert result.total == sum(costs)


# --- prepare: budget, accounting, determinism, the backbone left alone -------------------------
@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("backbone,budget,r", [("vit_test_tiny", 3000, 8), ("vit_test_tiny", 1200, 2),
                                               ("vit_test_small", 12000, 4)])
def test_realised_budget_is_within_2_percent_and_matches_the_accounting(name, backbone, budget, r):
    task = spt_task(name, budget=budget, backbone=backbone, r=r)
    method = task.method
    assert abs(method.realised_budget - budget) <= 0.02 * budget
    assert method.trainable_parameters(task.backbone) == method.realised_budget == accounting(task)
    assert method.nominal_trainable_parameters(task.backbone) == method.realised_budget
    codes = task.backbone.model.get_buffer(f"{method.prefix}allocation").tolist()
    assert STRUCTURED in codes and SPARSE in codes  # both granularities are exercised


def test_structured_costs_follow_the_card_on_vit_base():
    backbone = TimmViT("vit_base_patch16_224")
    sites = score_sites(backbone)
    assert len(sites) == 12 * 16 + 2
    lora, adapter = SPTLoRA(), SPTAdapter()
    for method in (lora, adapter):
        method.apply(backbone)
        assert method.trainable_parameters(backbone) == 0  # nothing is added before the data decides
    by_label = {s.label: s for s in sites if s.block == 0}
    assert [lora.structured_cost(*by_label[r].shape) for r in ("q", "proj", "fc1", "fc2")] == \
        [12_288, 12_288, 30_720, 30_720]
    assert [adapter.structured_cost(*by_label[r].shape) for r in ("q", "proj", "fc1", "fc2")] == \
        [13_064, 13_064, 52_232, 13_064]
    # every tensor tuned: 12 x (4 x 12,288 + 2 x 30,720) LoRA + all biases / norms + class token
    modes = [STRUCTURED] * len(sites)
    lora.build(backbone, sites, modes, [None] * len(sites))
    lora.freeze_and_mark(backbone)
    vectors = 12 * (4 * 768 + 3 * 768 + 768 + 3072 + 768) + 2 * 768
    assert vectors == 121_344
    assert lora.trainable_parameters(backbone) == 12 * (4 * 12_288 + 2 * 30_720) + vectors + 768 == 1_449_216


@pytest.mark.parametrize("name", ["spt_lora", pytest.param("spt_adapter", marks=pytest.mark.slow)])
def test_realised_count_on_vit_base_is_the_400k_budget(name):
    """Prepared on ViT-B/16 (random weights, 2 scored images at 224 px): the parameters actually added and
    trainable, counted from the model's own tensors, are within 2 % of the default 400K budget (the
    paper's setting) and equal the method's count and the count recomputed from the stored allocation."""
    torch.manual_seed(0)
    task = make_task(VARIANTS[name](n_images=2, batch_size=2), num_classes=3, name="vit_base_patch16_224",
                     prepare=False)
    task.method.prepare(task, TinyData(num_classes=3, n=2, size=224, batch_size=2))
    counted = sum(p.numel() for p in task.backbone.model.parameters() if p.requires_grad)
    assert abs(counted - 400_000) <= 0.02 * 400_000, counted
    assert counted == task.method.trainable_parameters(task.backbone) == accounting(task)


def test_allocation_is_deterministic_for_a_fixed_seed():
    """Same global seed (the random head) and method seed: the same modules and indices."""
    a, b = spt_task(budget=2500), spt_task(budget=2500)
    sa = a.method.adapter_state_dict(a.backbone)
    sb = b.method.adapter_state_dict(b.backbone)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert any(k.endswith("_index") for k in sa)


def test_seed_draws_the_scored_images():
    task = make_task("ssf", prepare=False)  # any model: only the scores are compared
    sites = score_sites(task.backbone)
    data = TinyData(n=64)
    s0 = spt.sensitivity(task, data, sites, n_images=16, batch_size=8, seed=0)
    s0_again = spt.sensitivity(task, data, sites, n_images=16, batch_size=8, seed=0)
    s1 = spt.sensitivity(task, data, sites, n_images=16, batch_size=8, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(s0, s0_again))
    assert not all(torch.equal(a, b) for a, b in zip(s0, s1))


def test_scores_are_sums_of_squared_batch_gradients_and_leave_the_backbone_unchanged():
    task = make_task(SPTLoRA(budget=2000), prepare=False)
    task.eval()
    model = task.backbone.model
    before = {k: v.clone() for k, v in task.state_dict().items()}
    flags = {n: p.requires_grad for n, p in task.named_parameters()}
    rng = torch.get_rng_state()
    sites = score_sites(task.backbone)
    data = TinyData(n=40)
    scores = spt.sensitivity(task, data, sites, n_images=24, batch_size=8, seed=3)
    # unchanged: weights, requires_grad, .grad, train/eval mode, the global RNG
    assert all(torch.equal(before[k], v) for k, v in task.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in task.named_parameters()}
    assert all(p.grad is None for p in task.parameters())
    assert not task.training and not model.training
    assert torch.equal(rng, torch.get_rng_state())
    # reference: the same batches, (dL/dW)^2 summed, q = rows 0:d of the fused qkv
    qkv = model.blocks[1].attn.qkv
    d = qkv.out_features // 3
    ref_w, ref_b = torch.zeros_like(qkv.weight), torch.zeros_like(qkv.bias)
    qkv.weight.requires_grad_(True)
    qkv.bias.requires_grad_(True)
    task.train()
    with spt.scoring._seeded(3, torch.device("cpu")):
        for images, labels in spt.sensitivity_batches(data, 24, 8, 3):
            gw, gb = torch.autograd.grad(task.loss(task(images), labels), [qkv.weight, qkv.bias])
            ref_w += gw.square()
            ref_b += gb.square()
    by_key = {(s.block, s.label): sc for s, sc in zip(sites, scores)}
    assert torch.allclose(by_key[(1, "q")], ref_w[:d].reshape(-1), rtol=1e-5, atol=0)
    assert torch.allclose(by_key[(1, "v")], ref_w[2 * d:].reshape(-1), rtol=1e-5, atol=0)
    assert torch.allclose(by_key[(1, "k.bias")], ref_b[d:2 * d], rtol=1e-5, atol=0)
    assert by_key[(1, "q")].abs().sum() > 0


def test_sensitivity_uses_n_images_in_batches():
    data = TinyData(n=100, batch_size=7)
    batches = list(spt.sensitivity_batches(data, 40, 16, 0))
    assert [len(y) for _, y in batches] == [16, 16, 8]
    assert batches[0][0].shape[1:] == (3, 32, 32)
    labels = torch.cat([y for _, y in batches])
    assert len(set(labels.tolist())) > 1 and not torch.equal(labels, torch.arange(40) % 3)  # a seeded draw

    class Streamed:  # a loader without a map-style dataset: its first n_images, re-batched
        def train_dataloader(self):
            return iter(torch.utils.data.DataLoader(data.items, batch_size=7))

    streamed = list(spt.sensitivity_batches(Streamed(), 40, 16, 0))
    assert [len(y) for _, y in streamed] == [16, 16, 8]
    assert torch.equal(torch.cat([y for _, y in streamed]), torch.arange(40) % 3)


# --- the contract, for SPT (also run by tests/test_methods_contract.py through make_task) -------
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_only_prefixed_tensors_train_class_token_delta_included(name):
    task = spt_task(name)
    method, model = task.method, task.backbone.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if method.is_trainable(n)}
    assert trainable and all(method.prefix in n for n in trainable)
    assert f"pos_drop.{method.prefix}cls_token" in trainable
    assert not model.cls_token.requires_grad and not model.pos_embed.requires_grad
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert method.no_weight_decay(f"pos_drop.{method.prefix}cls_token", model.pos_drop.get_parameter(
        f"{method.prefix}cls_token"))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_training_step_changes_only_trainable_tensors(name):
    task = spt_task(name)
    perturb(task)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.5)
    task.train()
    task.loss(task(X), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    trainable = {f"backbone.model.{n}" for n, p in task.backbone.model.named_parameters() if p.requires_grad}
    trainable |= {"head.weight", "head.bias"}
    changed = {k for k, v in task.state_dict().items() if not torch.equal(before[k], v)}
    assert changed <= trainable
    assert any(f"{task.method.prefix}module_" in k or f"{task.method.prefix}module." in k for k in changed)
    assert any(k.endswith("_delta") for k in changed) and any("cls_token" in k for k in changed)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_identity_at_init(name):
    base = TimmViT("vit_test_tiny").eval()
    task = spt_task(name).eval()
    with torch.no_grad():
        assert torch.equal(base(base.preprocess(X)), task.backbone(task.backbone.preprocess(X)))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_adapter_roundtrip_rebuilds_from_buffers_bitwise(name, tmp_path, monkeypatch):
    from vision_ft.export import load_adapter, save_adapter
    from safetensors.torch import load_file

    task = spt_task(name).eval()
    perturb(task)
    torch.nn.init.normal_(task.head.weight)
    save_adapter(task, tmp_path)
    saved = load_file(tmp_path / "adapter.safetensors")
    prefix = task.method.prefix
    assert f"backbone.model.{prefix}allocation" in saved
    assert any(k.endswith("_index") for k in saved)

    def no_scoring(*a, **k):
        raise AssertionError("load_adapter must not re-score")

    monkeypatch.setattr(spt.scoring, "sensitivity", no_scoring)
    loaded = load_adapter(tmp_path)
    assert type(loaded.method) is type(task.method) and loaded.method.prepared
    with torch.no_grad():
        assert torch.equal(task(X), loaded(X))
    assert loaded.method.trainable_parameters(loaded.backbone) == task.method.realised_budget


def test_load_adapter_refuses_another_config_and_replaces_a_previous_allocation():
    task = spt_task(budget=2500)
    state = task.method.adapter_state_dict(task.backbone)
    other = make_task(SPTLoRA(budget=2500, vectors=False), prepare=False)
    with pytest.raises(AdapterError, match="allocation"):
        other.method.load_adapter(other.backbone, state)
    # loading into a model prepared differently replaces its modules, no leftovers
    again = spt_task(budget=1500, data=TinyData(seed=5))
    again.method.load_adapter(again.backbone, state)
    mine = again.method.adapter_state_dict(again.backbone)
    assert mine.keys() == state.keys() and all(torch.equal(mine[k], state[k]) for k in state)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in again.backbone.model.modules())
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in task.backbone.model.modules())


def test_spt_lora_merge_is_exact_and_leaves_a_plain_timm_model():
    task = spt_task("spt_lora").eval()
    perturb(task)
    with torch.no_grad():
        before = task(X)
        task.method.merge(task.backbone)
        after = task(X)
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    model = task.backbone.model
    assert not [k for k in model.state_dict() if "spt_" in k]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert type(model).__name__ == "VisionTransformer"


def test_sparse_entries_get_exactly_the_dense_gradient_and_move_nothing_else():
    """End to end on a prepared model: the delta's gradient equals dL/dW at the selected entries,
    and after a step + merge the weight changed there only (dL/dW is non-zero elsewhere)."""
    task = spt_task("spt_lora", budget=2500, vectors=False).eval()
    method, model = task.method, task.backbone.model
    sites = score_sites(task.backbone, vectors=False)
    codes = model.get_buffer("spt_lora_allocation").tolist()
    sparse = [s for s, c in zip(sites, codes) if c == SPARSE]
    site = sorted(sparse, key=lambda s: not s.suffix)[0]  # a q/k/v slice of the fused qkv if there is one
    host = model.get_submodule(site.module)
    delta = host.get_parameter(site.tensor_name("spt_lora_", "_delta"))
    index = host.get_buffer(site.tensor_name("spt_lora_", "_index"))
    host.weight.requires_grad_(True)
    loss = task.loss(task(X), torch.tensor([0, 1, 2, 0]))
    dense = torch.autograd.grad(loss, host.weight, retain_graph=True)[0][site.start:site.stop]
    host.weight.requires_grad_(False)
    loss.backward()
    assert torch.allclose(delta.grad, dense[index[0], index[1]], rtol=1e-4, atol=1e-8)
    off = torch.ones_like(dense, dtype=torch.bool)
    off[index[0], index[1]] = False
    assert dense[off].abs().max() > 0
    w0 = host.weight.detach()[site.start:site.stop].clone()
    with torch.no_grad():
        delta.sub_(0.1 * delta.grad)
    method.merge(task.backbone)
    moved = (host.weight.detach()[site.start:site.stop] != w0)
    assert moved.any() and not moved[off].any()


def test_spt_adapter_cannot_merge():
    task = spt_task("spt_adapter")
    assert not SPTAdapter.mergeable and SPTLoRA.mergeable
    with pytest.raises(AdapterError, match="cannot be merged"):
        task.method.merge(task.backbone)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_structured_module_acts_on_its_qkv_slice(name):
    """LoRA reads the qkv input, the adapter its own slice of the output; other slices are untouched."""
    task = make_task(VARIANTS[name](vectors=False), prepare=False).eval()
    prefix, role = task.method.prefix, "k"
    sites = score_sites(task.backbone, vectors=False)
    modes = [STRUCTURED if (s.block, s.label) == (0, role) else NONE for s in sites]
    task.method.build(task.backbone, sites, modes, [None] * len(sites))
    qkv = task.backbone.model.blocks[0].attn.qkv
    module = qkv.get_submodule(f"{prefix}module_{role}")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()  # the other deltas are still zero (nothing trained)
        x = torch.randn(2, 5, qkv.in_features)
        base = F.linear(x, qkv.weight, qkv.bias)
        out = qkv(x)
        d = qkv.out_features // 3
        i = "qkv".index(role)
        own = slice(i * d, (i + 1) * d)
        h = base[..., own]
        assert torch.allclose(out[..., own], h + (module(x) if name == "spt_lora" else module(h)), atol=1e-5)
        assert not torch.allclose(out[..., own], h, atol=1e-3)
        for j in set(range(3)) - {i}:
            assert torch.equal(out[..., j * d:(j + 1) * d], base[..., j * d:(j + 1) * d])


# --- reporting and configuration ------------------------------------------------------------------
def test_allocation_summary_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="vision_ft"):
        task = spt_task(budget=2500)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "SPT-LoRA allocation: budget 2,500, realised 2,500" in text
    rows = [line.split() for line in task.method.summary.splitlines()[2:4]]
    assert [r[0] for r in rows] == ["0", "1"] and all(len(r) >= 7 for r in rows)
    assert "totals:" in task.method.summary and "cls_token 32" in task.method.summary


@pytest.mark.parametrize("kwargs,key", [({"budget": 0}, "budget"), ({"r": 0}, "r"), ({"dropout": 1.0}, "dropout"),
                                        ({"alpha": 0.0}, "alpha"), ({"n_images": 0}, "n_images")])
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"model.init_args.method.init_args.{key}"):
        SPTLoRA(**kwargs)


def test_budget_below_the_class_token_is_refused():
    with pytest.raises(ConfigError, match="budget"):
        spt_task(budget=16)


def test_checkpoint_resume_restores_the_checkpoint_allocation(tmp_path):
    """Lightning resume: on_load_checkpoint rebuilds the saved allocation before the optimiser exists.

    (Lightning sets ``trainer.ckpt_path`` only after ``setup``, so the task's ``setup`` still runs
    ``prepare`` on resume; a different seed here makes that fresh allocation differ, and the
    checkpoint's must win.)
    """
    from lightning.pytorch import Trainer
    from domains.medical import MedicalSampleData
    from vision_ft.tasks import ImageClassificationTask

    def fit(steps, seed, ckpt=None):
        data = MedicalSampleData(sample_dir=str(tmp_path), image_size=32, batch_size=8)
        method = SPTLoRA(budget=2000, n_images=16, batch_size=8, seed=seed)
        task = ImageClassificationTask(TimmViT("vit_test_tiny"), method=method, num_classes=4)
        trainer = Trainer(max_steps=steps, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                          enable_checkpointing=False, accelerator="cpu")
        trainer.fit(task, datamodule=data, ckpt_path=ckpt)
        return task, trainer

    first, trainer = fit(1, seed=0)
    trainer.save_checkpoint(tmp_path / "spt.ckpt")
    other = ImageClassificationTask(TimmViT("vit_test_tiny"), method=SPTLoRA(budget=2000, n_images=16, batch_size=8,
                                                                           seed=1), num_classes=4)
    data = MedicalSampleData(sample_dir=str(tmp_path), image_size=32, batch_size=8)
    data.setup("fit")
    other.method.prepare(other, data)  # what setup allocates on its own with seed 1
    resumed, trainer2 = fit(2, seed=1, ckpt=tmp_path / "spt.ckpt")
    a, b, c = (t.method.adapter_state_dict(t.backbone) for t in (first, resumed, other))
    structure = [k for k in a if k.endswith(("_index", "allocation"))]
    assert a.keys() == b.keys() and structure
    assert all(torch.equal(a[k], b[k]) for k in structure)
    assert c and (c.keys() != a.keys() or not all(torch.equal(a[k], c[k]) for k in structure))
    optimised = {id(p) for g in trainer2.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in resumed.backbone.model.parameters() if p.requires_grad} <= optimised
    assert resumed.method.prepared and resumed.method.trainable_parameters(resumed.backbone) == 2000
