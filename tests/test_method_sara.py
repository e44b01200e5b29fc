"""SaRA (arXiv 2409.06633): the invariants of docs/methods/sara.md on the tiny Stable Diffusion UNet."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from vision_ft.methods import SaRA
from vision_ft.methods.sara import NuclearNorm

TAU = 2e-2  # the tiny random UNet's weights are wider than SD's: a larger tau masks a similar share


@functools.cache
def _base():
    from vision_ft.backbones import StableDiffusion

    return StableDiffusion("sd_test_tiny")


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700]), torch.randn(2, 77, 32, generator=g)


def _out(b):
    x, t, text = _inputs()
    with torch.no_grad():
        return b.denoise(x, t, text)


def _applied(**kw):
    b = copy.deepcopy(_base())
    m = SaRA(threshold=TAU, nuclear_min_dim=16, **kw)
    m.apply(b)
    return m, b


def _steps(m, b, n=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in b.model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    x, t, text = _inputs()
    for _ in range(n):
        loss = b.denoise(x, t, text).pow(2).mean() + sum(m.regularizer({}, None).values())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_mask_count_identity_at_step_zero_and_signed_values():
    m, b = _applied()
    base = _base()
    expected = sum(int((p.detach().abs() < TAU).sum()) for p in base.model.parameters())
    assert m.trainable_parameters(b) == m.mask_size() == expected > 0
    assert torch.equal(_out(b), _out(base))
    values = torch.cat([p.detach() for n, p in b.model.named_parameters() if n.endswith("sara_weight")])
    assert (values < 0).any(), "negative small weights must keep their sign (no |p| written)"
    trainable = {n for n, p in b.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1].startswith("sara_") for n in trainable)


def test_frozen_entries_bit_identical_and_optimiser_state_sparse():
    m, b = _applied()
    opt = _steps(m, b)
    base = dict(_base().model.named_parameters())
    state_numel = sum(v.numel() for s in opt.state.values() for k, v in s.items() if k != "step")
    assert state_numel == 2 * m.mask_size()  # exp_avg + exp_avg_sq over the trainable entries only
    changed = 0
    for site in m._sites():
        w0 = base[f"{site.ref.module}.{site.ref.param}" if site.ref.module else site.ref.param].detach()
        assert torch.equal(site.weight, w0), "the frozen base tensor itself never moves"
        eff = site.effective_weight(m.prefix).detach()
        index = getattr(site.host, f"sara_{site.ref.param}_index")
        outside = torch.ones(w0.numel(), dtype=torch.bool)
        outside[index] = False
        assert torch.equal(eff.reshape(-1)[outside], w0.reshape(-1)[outside])
        changed += int((eff.reshape(-1)[index] != w0.reshape(-1)[index]).sum())
    assert changed > 0


def test_nuclear_norm_value_and_gradient_reach_the_values():
    x = torch.randn(20, 12, dtype=torch.float64, requires_grad=True)
    y = NuclearNorm.apply(x)
    y.backward()
    ref = x.detach().clone().requires_grad_(True)
    torch.linalg.matrix_norm(ref, ord="nuc").backward()
    assert torch.allclose(y, torch.linalg.matrix_norm(x.detach(), ord="nuc"))
    assert torch.allclose(x.grad, ref.grad, atol=1e-8)
    m, b = _applied(nuclear_weight=1.0)
    candidates = m.nuclear_candidates()
    assert candidates and all(min(s.weight.shape) > 16 and s.weight.dim() == 2 for s in candidates)
    _steps(m, b, n=1)  # move the values so the masked delta is not zero
    torch.manual_seed(0)
    reg = m.regularizer({}, None)["sara_nuclear"]
    assert reg > 0
    reg.backward()
    grads = [p.grad for n, p in b.model.named_parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), "the nuclear-norm term must have a real gradient"


def test_progressive_remask_freezes_grown_entries_and_cuts_optimiser_state(tmp_path):
    m, b = _applied(progressive_step=2)
    opt = _steps(m, b, n=2, lr=5e-2)
    before = {s.ref: s.effective_weight(m.prefix).detach().clone() for s in m._sites()}
    first_mask = {s.ref: set(getattr(s.host, f"sara_{s.ref.param}_index").tolist()) for s in m._sites()}
    n1 = m.mask_size()
    frozen = m.remask([opt])
    assert frozen > 0 and m.mask_size() == n1 - frozen
    for s in m._sites():
        second = set(getattr(s.host, f"sara_{s.ref.param}_index").tolist())
        assert second <= first_mask[s.ref]  # M2 within M1
        assert torch.equal(s.effective_weight(m.prefix).detach(), before[s.ref])  # re-masking changes no weight
        values = getattr(s.host, f"sara_{s.ref.param}")
        assert (values.detach().abs() < TAU).all()
        assert opt.state[values]["exp_avg"].shape == values.shape
    fixed_before = {s.ref: getattr(s.host, f"sara_{s.ref.param}_fixed").clone() for s in m._sites()}
    _steps(m, b, n=2)
    for s in m._sites():
        assert torch.equal(getattr(s.host, f"sara_{s.ref.param}_fixed"), fixed_before[s.ref])
    # save -> load into a fresh model (other mask sizes) is exact
    other_m, other = _applied(progressive_step=2)
    other_m.load_adapter(other, m.adapter_state_dict(b))
    assert torch.equal(_out(b), _out(other)) and other_m._remasked


def test_merge_writes_the_values_exactly():
    m, b = _applied()
    _steps(m, b)
    expected = {f"{s.ref.module}.{s.ref.param}": s.effective_weight(m.prefix).detach().clone() for s in m._sites()}
    out = _out(b)
    m.merge(b)
    state = b.model.state_dict()
    assert not any("sara_" in k for k in state)
    for k, v in expected.items():
        assert torch.equal(state[k], v)
    assert torch.allclose(_out(b), out, atol=1e-6)
    assert "forward" not in b.model.conv_in.__dict__


def test_bad_config_names_the_key():
    from vision_ft.errors import ConfigError

    with pytest.raises(ConfigError, match="init_args.threshold"):
        SaRA(threshold=0)
    with pytest.raises(ConfigError, match="init_args.progressive_step"):
        SaRA(progressive_step=0)
    b = copy.deepcopy(_base())
    with torch.no_grad():
        for p in b.model.parameters():
            p.fill_(1.0)
    with pytest.raises(ConfigError, match="no weight has entries below"):
        SaRA(threshold=0.5).apply(b)


def test_classification_task_remasks_through_the_declared_hook(tmp_path):
    """Every task calls Method.on_train_batch_start, so SaRA re-masks outside the diffusion task too."""
    import lightning as L

    from conftest import make_task

    task = make_task({"class_path": "vision_ft.methods.SaRA", "init_args": {"threshold": 2e-2, "progressive_step": 2}},
                     lr=5e-2, ema_decay=0.9)
    g = torch.Generator().manual_seed(0)
    items = [{"image": torch.rand(3, 32, 32, generator=g), "label": torch.tensor(i % 3)} for i in range(12)]
    L.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=str(tmp_path)).fit(
        task, train_dataloaders=torch.utils.data.DataLoader(items, batch_size=4))
    assert task.method._remasked
    trained = [p for n, p in task.backbone.model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in trained) == task.method.mask_size()


def test_remask_flag_survives_save_and_load_even_when_nothing_was_frozen():
    m, b = _applied(progressive_step=1)
    assert m.remask() == 0  # untrained values are all below tau: nothing grows out
    other_m, other = _applied(progressive_step=1)
    assert not other_m._remasked
    other_m.load_adapter(other, m.adapter_state_dict(b))
    assert other_m._remasked
