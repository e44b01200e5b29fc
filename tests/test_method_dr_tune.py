"""DR-Tune invariants (docs/methods/dr_tune.md) on tiny ViTs and on the real ViT-B/16 architecture."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vision_ft.methods.dr_tune as drt
from conftest import TinyData
from vision_ft.backbones import TimmViT
from vision_ft.errors import ConfigError
from vision_ft.methods.dr_tune import DRTune, kabsch, semantic_calibration
from vision_ft.tasks import ImageClassificationTask

D = 32  # vit_test_tiny width


def _task(queue_size=48, rotation_every=10, num_classes=3, drop_path_rate=0.0, **kw):
    backbone = TimmViT("vit_test_tiny", drop_path_rate=drop_path_rate)
    method = DRTune(queue_size=queue_size, rotation_every=rotation_every)
    return ImageClassificationTask(backbone, method=method, num_classes=num_classes, **kw)


def _batch(b=8, num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 3, 32, 32, generator=g),
            "label": torch.randint(0, num_classes, (b,), generator=g)}


def _fill_random(task, n, num_classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    pre, down = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    task.method.enqueue(task.backbone, down, pre, labels)


def _step(task, batch):
    """One training-step loss as the task computes it (task loss, then the method's adjustment)."""
    outputs = task.forward_outputs(batch["image"])
    loss = task.loss(outputs["logits"], batch["label"])
    return task.add_regularizers(loss, outputs, batch), outputs


def _buf(task, name):
    return task.backbone.model.get_buffer(name)


def _random_rotation(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


# --- Kabsch / Procrustes ------------------------------------------------------------------
def test_kabsch_recovers_known_rotation_and_translation():
    g = torch.Generator().manual_seed(0)
    r_true = _random_rotation(D, 1).float()
    t_true = torch.randn(D, generator=g)
    x = torch.randn(200, D, generator=g)
    y = x @ r_true.T + t_true
    r, t = kabsch(x, y)
    assert torch.allclose(r.T @ r, torch.eye(D), atol=1e-5)
    assert abs(torch.linalg.det(r.double()).item() - 1.0) < 1e-5
    assert torch.allclose(r, r_true, atol=1e-4)
    assert torch.allclose(t, t_true, atol=1e-4)


def test_kabsch_returns_a_proper_rotation_when_the_best_fit_is_a_reflection():
    # centred points with orthogonal axes of distinct spread; y mirrors the axis of least spread
    a = torch.randn(100, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q, _ = torch.linalg.qr(a - a.mean(0))
    x = (q * torch.linspace(1, 3, D, dtype=torch.float64)).float()
    reflection = torch.eye(D)
    reflection[0, 0] = -1
    r, _ = kabsch(x, x @ reflection.T)
    assert torch.allclose(r.T @ r, torch.eye(D), atol=1e-5)
    assert abs(torch.linalg.det(r.double()).item() - 1.0) < 1e-5  # an unconstrained fit gives det -1
    # the best proper rotation undoes nothing: flipping the least-spread axis back costs least
    assert torch.allclose(r, torch.eye(D), atol=1e-4)


# --- semantic calibration -----------------------------------------------------------------
def _reference_calibration(pre, down, labels, prototypes, scale):
    """Direct float64 loop over classes: normalise, Kabsch, per-class shift, renormalise, rescale."""
    p = pre / np.linalg.norm(pre, axis=1, keepdims=True)
    d = down / np.linalg.norm(down, axis=1, keepdims=True)
    u, _, vt = np.linalg.svd((p - p.mean(0)).T @ (d - d.mean(0)))
    v = vt.T.copy()
    v[:, -1] *= np.sign(np.linalg.det(v @ u.T))
    r = v @ u.T
    q = p @ r.T + (d - p @ r.T).mean(0)
    for c in np.unique(labels):
        m = labels == c
        w_c = prototypes[c] / np.linalg.norm(prototypes[c])
        s = np.exp(d[m] @ w_c)
        w = s / s.sum()
        q[m] += (w[:, None] * d[m]).sum(0) - q[m].mean(0)
    return q / np.linalg.norm(q, axis=1, keepdims=True) * scale


def test_loss_is_ce_over_batch_and_calibrated_queue_with_weight_k_over_b_plus_k():
    k, b = 48, 8
    task = _task(queue_size=k)
    _fill_random(task, k)
    pre, down = _buf(task, drt.QUEUE_PRE).clone(), _buf(task, drt.QUEUE_DOWN).clone()
    y_queue = _buf(task, drt.QUEUE_LABEL).clone()
    batch = _batch(b)
    outputs = task.forward_outputs(batch["image"])
    batch_loss = task.loss(outputs["logits"], batch["label"]).detach().requires_grad_()
    total = task.method.adjust_loss(batch_loss, {**outputs, "task": task}, batch)

    scale = outputs["features"].detach().norm(dim=1).mean().item()
    ref = _reference_calibration(pre.double().numpy(), down.double().numpy(), y_queue.numpy(),
                                 task.head.weight.detach().double().numpy(), scale)
    queue_logits = task.head(torch.from_numpy(ref).float())
    direct = F.cross_entropy(torch.cat([outputs["logits"], queue_logits]), torch.cat([batch["label"], y_queue]))
    assert torch.allclose(total, direct, atol=1e-5)
    # the batch term weighs B/(B+K), the queue term K/(B+K)
    (grad,) = torch.autograd.grad(total, batch_loss, retain_graph=True)
    assert grad.item() == pytest.approx(b / (b + k), rel=1e-6)
    queue_term = total - b / (b + k) * batch_loss
    assert queue_term.item() == pytest.approx(k / (b + k) * F.cross_entropy(queue_logits, y_queue).item(), abs=1e-5)


def test_class_with_one_queued_sample_lands_on_its_downstream_feature():
    g = torch.Generator().manual_seed(0)
    n = 40
    pre, down = F.normalize(torch.randn(n, D, generator=g), dim=1), F.normalize(torch.randn(n, D, generator=g), dim=1)
    labels = torch.tensor([0, 1] * 19 + [2, 0])   # class 2 once, class 3 absent
    prototypes = torch.randn(4, D, generator=g)
    r, t = kabsch(pre, down)
    out = semantic_calibration(pre, down, labels, prototypes, r, t, 3.0)
    assert out.shape == (n, D) and torch.isfinite(out).all()
    assert torch.allclose(out[38], 3.0 * down[38], atol=1e-5)  # the official code collapses it to a scalar shift
    assert torch.allclose(out.norm(dim=1), torch.full((n,), 3.0), atol=1e-5)


def test_calibration_moves_each_class_centre_onto_the_weighted_downstream_centre():
    g = torch.Generator().manual_seed(0)
    n = 60
    pre, down = F.normalize(torch.randn(n, D, generator=g), dim=1), F.normalize(torch.randn(n, D, generator=g), dim=1)
    labels = torch.arange(n) % 3
    prototypes = torch.randn(3, D, generator=g)
    r, t = kabsch(pre, down)
    # before the final renormalisation (scale is applied to unit rows), centres coincide
    shifted = semantic_calibration(pre, down, labels, prototypes, r, t, 1.0)
    for c in range(3):
        m = labels == c
        w = torch.softmax(down[m] @ F.normalize(prototypes[c], dim=0), 0)
        centre_down = (w[:, None] * down[m]).sum(0)
        raw = pre[m] @ r.T + t
        expected = F.normalize(raw - raw.mean(0) + centre_down, dim=1)
        assert torch.allclose(shifted[m], expected, atol=1e-5)


# --- the queue ----------------------------------------------------------------------------
def test_queue_pointer_wraps_when_k_is_not_a_multiple_of_b():
    task = _task(queue_size=10)
    rows = [torch.full((4, D), float(i)) for i in range(3)]
    for i, r in enumerate(rows):
        task.method.enqueue(task.backbone, r, -r, torch.full((4,), i))
    assert int(_buf(task, drt.QUEUE_PTR)) == 2 and int(_buf(task, drt.QUEUE_FILLED)) == 10
    down = _buf(task, drt.QUEUE_DOWN)[:, 0].tolist()
    assert down == [2, 2, 0, 0, 1, 1, 1, 1, 2, 2]        # third batch wrapped onto rows 8, 9, 0, 1
    assert _buf(task, drt.QUEUE_PRE)[:, 0].tolist() == [-v for v in down]
    assert _buf(task, drt.QUEUE_LABEL).tolist() == [int(v) for v in down]


def test_batch_larger_than_the_queue_keeps_its_last_k_rows():
    task = _task(queue_size=5)
    task.method.enqueue(task.backbone, torch.zeros(3, D), torch.zeros(3, D), torch.zeros(3))
    x = torch.arange(12.0)[:, None].expand(12, D)
    task.method.enqueue(task.backbone, x, x, torch.arange(12) % 3)
    assert sorted(_buf(task, drt.QUEUE_DOWN)[:, 0].tolist()) == [7, 8, 9, 10, 11]
    assert int(_buf(task, drt.QUEUE_PTR)) == 3 and int(_buf(task, drt.QUEUE_FILLED)) == 5


def test_without_prepare_the_first_steps_fill_the_queue_and_only_filled_rows_count():
    task = _task(queue_size=20)
    b1, b2 = _batch(8, seed=0), _batch(8, seed=1)
    outputs = task.forward_outputs(b1["image"])
    plain = task.loss(outputs["logits"], b1["label"])
    first = task.method.adjust_loss(plain, {**outputs, "task": task}, b1)
    assert torch.equal(first, plain)                                  # empty queue: no queue term
    assert int(_buf(task, drt.QUEUE_FILLED)) == 8
    assert torch.equal(_buf(task, drt.QUEUE_LABEL)[:8], b1["label"])
    assert torch.equal(_buf(task, drt.QUEUE_DOWN)[:8], outputs["features"].detach())
    outputs = task.forward_outputs(b2["image"])
    plain = task.loss(outputs["logits"], b2["label"]).detach().requires_grad_()
    second = task.method.adjust_loss(plain, {**outputs, "task": task}, b2)
    (grad,) = torch.autograd.grad(second, plain)
    assert grad.item() == pytest.approx(8 / (8 + 8))                  # 8 filled rows, not K = 20
    assert int(_buf(task, drt.QUEUE_FILLED)) == 16


def test_rotation_is_refit_every_n_steps_and_reused_in_between():
    task = _task(queue_size=24, rotation_every=3)
    _fill_random(task, 24)
    head = task.head.weight.detach()
    fits = []
    for step in range(7):
        before = _buf(task, drt.ROTATION).clone()
        pre = F.normalize(_buf(task, drt.QUEUE_PRE).clone(), dim=1)
        down = F.normalize(_buf(task, drt.QUEUE_DOWN).clone(), dim=1)
        z = torch.randn(4, D)
        out, labels = task.method.calibrated_queue(task.backbone, head, z)
        after = _buf(task, drt.ROTATION)
        fits.append(not torch.equal(before, after))
        r, t = after, _buf(task, drt.TRANSLATION)
        if step % 3 == 0:
            r_fit, t_fit = kabsch(pre, down)
            assert torch.allclose(r, r_fit) and torch.allclose(t, t_fit)
        assert torch.allclose(out, semantic_calibration(pre, down, labels, head, r, t, z.norm(dim=1).mean()), atol=1e-6)
        _fill_random(task, 4, seed=10 + step)  # new rows arrive between steps
    assert fits == [True, False, False, True, False, False, True]
    assert int(_buf(task, drt.STEP)) == 7


# --- the frozen copy ------------------------------------------------------------------------
def test_frozen_copy_is_unchanged_by_training_and_always_in_eval_mode():
    task = _task(queue_size=16, drop_path_rate=0.5, weight_decay=0.05)
    frozen = task.backbone.model.get_submodule(drt.FROZEN)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    trained_before = task.backbone.model.blocks[0].attn.qkv.weight.clone()
    groups = task.param_groups()
    frozen_ids = {id(p) for p in frozen.parameters()}
    assert not frozen_ids & {id(p) for g in groups for p in g["params"]}
    opt = torch.optim.SGD(groups, lr=0.5, momentum=0.9, nesterov=True)
    task.train()
    for seed in range(3):
        loss, _ = _step(task, _batch(8, seed=seed))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert not any(m.training for m in frozen.modules())
    assert not torch.equal(trained_before, task.backbone.model.blocks[0].attn.qkv.weight)
    # with drop-path 0.5 on, the copy still computes the base model's eval features
    base = TimmViT("vit_test_tiny", drop_path_rate=0.5).eval()
    x = base.preprocess(_batch(4)["image"])
    with torch.no_grad():
        assert torch.equal(task.method.pretrained_features(task.backbone, x), base(x))


def test_prepare_prefills_pretrained_features_deterministically_without_touching_the_rng():
    data = TinyData(num_classes=3, n=48, batch_size=8)
    task, again = _task(queue_size=64), _task(queue_size=64)
    torch.manual_seed(5)
    task.method.prepare(task, data)
    after_prepare = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_prepare, torch.rand(3))
    again.method.prepare(again, data)
    for name in drt.BUFFERS:
        assert torch.equal(_buf(task, name), _buf(again, name))
    assert int(_buf(task, drt.QUEUE_FILLED)) == 64 and int(_buf(task, drt.QUEUE_PTR)) == 0
    # 48 training images, then the data cycles to fill K = 64 rows
    labels = torch.stack([it["label"] for it in data.items])
    assert torch.equal(_buf(task, drt.QUEUE_LABEL), torch.cat([labels, labels[:16]]))
    assert torch.equal(_buf(task, drt.QUEUE_PRE), _buf(task, drt.QUEUE_DOWN))
    base = TimmViT("vit_test_tiny").eval()
    images = torch.stack([it["image"] for it in data.items[:8]])
    with torch.no_grad():
        assert torch.allclose(_buf(task, drt.QUEUE_PRE)[:8], base(base.preprocess(images)), atol=1e-6)


# --- life cycle ---------------------------------------------------------------------------
def test_resume_from_saved_state_is_exact():
    task = _task(queue_size=20, rotation_every=2)
    _fill_random(task, 13)
    for seed in range(3):
        _step(task, _batch(8, seed=seed))
    resumed = _task(queue_size=20, rotation_every=2)
    resumed.load_adapter_tensors(task.adapter_tensors())
    assert not any(k.startswith(f"backbone.model.{drt.FROZEN}.") for k in task.adapter_tensors())
    batch = _batch(8, seed=7)
    with torch.no_grad():
        a, _ = _step(task, batch)
        b, _ = _step(resumed, batch)
    assert torch.equal(a, b)
    for name in drt.BUFFERS:
        assert torch.equal(_buf(task, name), _buf(resumed, name))


def test_merge_leaves_the_plain_timm_model_with_the_base_fingerprint():
    task = _task()
    plain = TimmViT("vit_test_tiny")
    assert task.base_fingerprint == plain.fingerprint()  # taken before apply() added the copy
    task.method.merge(task.backbone)
    model = task.backbone.model
    assert set(model.state_dict()) == set(plain.model.state_dict())
    assert not any(n.startswith("drtune_") for n, _ in model.named_modules())
    assert task.backbone.fingerprint() == plain.fingerprint()


def test_bad_config_values_name_their_key():
    with pytest.raises(ConfigError, match="model.init_args.method.init_args.queue_size"):
        DRTune(queue_size=0)
    with pytest.raises(ConfigError, match="model.init_args.method.init_args.rotation_every"):
        DRTune(rotation_every=0)
    task = _task(multilabel=True)
    with pytest.raises(ConfigError, match="multilabel"):
        task.method.prepare(task, TinyData())


def test_vit_base_trains_every_base_parameter_and_nothing_of_the_copy():
    backbone = TimmViT("vit_base_patch16_224")
    base_count = sum(p.numel() for p in backbone.model.parameters())
    method = DRTune()
    method.apply(backbone)
    assert method.trainable_parameters(backbone) == base_count == 85_798_656
    frozen = backbone.model.get_submodule(drt.FROZEN)
    assert sum(p.numel() for p in frozen.parameters()) == base_count
    assert not any(p.requires_grad for p in frozen.parameters())
    assert _buf_shape(backbone, drt.QUEUE_PRE) == (2048, 768)
    saved = method.adapter_state_dict(backbone)
    assert sum(v.numel() for k, v in saved.items() if not k.startswith("drtune_")) == base_count
    assert not any(k.startswith(drt.FROZEN) for k in saved)


def _buf_shape(backbone, name):
    return tuple(backbone.model.get_buffer(name).shape)


def test_mixed_precision_step_keeps_float32_queues():
    task = _task(queue_size=20)
    _fill_random(task, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, outputs = _step(task, _batch(8))
    assert outputs["logits"].dtype == torch.bfloat16 and torch.isfinite(loss)  # autocast is on
    loss.backward()
    assert task.head.weight.grad is not None
    assert _buf(task, drt.QUEUE_PRE).dtype == _buf(task, drt.QUEUE_DOWN).dtype == torch.float32
    assert torch.allclose(_buf(task, drt.QUEUE_DOWN)[:8], outputs["features"].float())
