"""TIC-FT (arXiv 2506.00996): every invariant of its card on the tiny Wan 2.1 model -- C + B + T = latent frames,
condition pixel frames = 1 + 4k, condition latents bit-identical after noising, buffer level min(sigma, tau_k),
zero gradients at condition and buffer positions, one [B] timestep, frames held by a zero velocity."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from vision_ft.errors import ConfigError, DataError
from vision_ft.methods import LoRA, TICFT, build_method
from vision_ft.methods.frame_plan import FramePlan


@functools.cache
def _base():
    from vision_ft.backbones import WanVideo

    return WanVideo("wan_test_tiny", max_sequence_length=16)


def _task(method=None, **kw):
    from vision_ft.tasks import VideoDiffusionTask

    method = method or {"class_path": "vision_ft.methods.TICFT",
                        "init_args": {"adapter": {"class_path": "vision_ft.methods.LoRA", "init_args": {"r": 4}}}}
    return VideoDiffusionTask(copy.deepcopy(_base()), method=method, **kw)


def _latents(frames=6, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, frames, 4, 4, generator=g), torch.randn(n, 16, frames, 4, 4, generator=g)


# --- config ------------------------------------------------------------------------------------------
def test_defaults_are_the_papers_and_any_buffer_count_is_allowed():
    m = TICFT()
    assert m.buffers == 3 and m.taus == [0.25, 0.5, 0.75]
    assert isinstance(m.inner, LoRA) and m.prefix == "lora_" and m.mergeable and m.zero_init
    assert TICFT(buffers=5).taus == pytest.approx([k / 6 for k in range(1, 6)])
    assert TICFT(buffers=0).taus == [] and TICFT(buffers=1, taus=[0.9]).taus == [0.9]
    rebuilt = build_method(TICFT(buffers=2, taus=[0.3, 0.6]).spec())
    assert rebuilt.taus == [0.3, 0.6] and rebuilt.adapter == TICFT().adapter


@pytest.mark.parametrize("kw,phrase", [
    ({"buffers": -1}, "buffers=-1"), ({"buffers": 2, "taus": [0.5]}, "one per buffer"),
    ({"buffers": 1, "taus": [1.0]}, r"in \(0, 1\)"), ({"buffers": 1, "taus": [0.0]}, r"in \(0, 1\)"),
    ({"adapter": "tic_ft"}, "weight method"), ({"adapter": "no_such"}, "unknown method")])
def test_bad_config_names_the_key(kw, phrase):
    with pytest.raises(ConfigError, match=phrase):
        TICFT(**kw)


# --- layout ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("buffers,condition,target", [(3, 13, 36), (0, 1, 8), (1, 5, 4), (2, 13, 8), (5, 25, 12)])
def test_condition_buffers_and_target_add_up_to_the_latent_frames(buffers, condition, target):
    task = _task(TICFT(buffers=buffers, adapter={"class_path": "vision_ft.methods.LoRA", "init_args": {"r": 2}}))
    context, total = task.clip_frames(condition, target)
    plan = task.plan(context, total)
    assert total == task.backbone.latent_frames(condition + target)  # the joint clip's latents
    assert plan.condition + plan.buffers + plan.target == total
    assert plan.buffers == buffers and plan.condition == (condition - 1) // 4 + 1 - buffers
    assert plan.target == target // 4 and int(plan.target_mask().sum()) == plan.target
    if (buffers, condition, target) == (3, 13, 36):  # the paper's c1b3t9
        assert (plan.condition, plan.buffers, plan.target) == (1, 3, 9)


def test_condition_frames_must_be_one_plus_four_k_and_leave_a_clean_latent():
    task = _task()
    for bad in (12, 14, 4):
        with pytest.raises(ConfigError, match=r"condition frames=\d+: the video VAE needs 4k \+ 1"):
            task.clip_frames(bad, 8)
    with pytest.raises(DataError, match="multiple of 4"):
        task.clip_frames(13, 6)
    context, total = task.clip_frames(9, 8)  # 3 condition latents, 3 buffers: no clean one left
    with pytest.raises(ConfigError, match="buffers=3 needs at least 4 latent frames of condition"):
        task.plan(context, total)
    with pytest.raises(ConfigError, match="target frames"):
        TICFT().in_context_plan(5, 5)
    with pytest.raises(ConfigError, match="the condition clip gives 0"):  # tic_ft without a condition clip
        task.plan(*task.clip_frames(0, 9))
    assert FramePlan.plain(3).target_mask().all()


# --- noising -----------------------------------------------------------------------------------------
def test_buffer_levels_are_min_of_sigma_and_tau_and_condition_latents_stay_bit_identical():
    b = _base()
    plan = TICFT().in_context_plan(4, 7)  # c1 b3 t3
    sigma = torch.tensor([0.1, 0.3, 0.6, 0.9])
    levels = plan.frame_sigmas(sigma)
    for i, s in enumerate(sigma.tolist()):
        expected = [0.0] + [min(s, tau) for tau in (0.25, 0.5, 0.75)] + [s] * 3
        assert levels[i].tolist() == pytest.approx(expected)
    x0, eps = _latents(7, n=4)
    x0[:, :, 0] = x0[:, :, 0] * 1e-30  # tiny values: a "(1 - 0) x0 + 0 eps" that is not exact would show
    noisy = b.add_noise(x0, eps, levels)
    assert torch.equal(noisy[:, :, :1], x0[:, :, :1])
    for f in range(1, 7):
        s = levels[:, f].view(-1, 1, 1, 1)
        assert torch.allclose(noisy[:, :, f], (1 - s) * x0[:, :, f] + s * eps[:, :, f], atol=1e-6)


def test_the_loss_is_on_target_latents_only_and_the_model_gets_one_timestep_per_sample():
    task = _task()
    b = task.backbone
    plan = task.plan(4, 7)
    seen, outputs = [], []
    hook = b.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True)
    denoise = b.denoise

    def capture(*a):
        out = denoise(*a)
        out.retain_grad()
        outputs.append(out)
        return out

    b.denoise = capture
    x0, eps = _latents(7)
    sigmas = torch.tensor([0.2, 0.8])
    loss = task.flow_loss(x0, eps, sigmas, torch.randn(2, 16, 32), plan)
    loss.backward()
    hook.remove()
    assert seen[0].shape == (2,) and torch.allclose(seen[0], 1000 * sigmas)
    grad = outputs[0].grad
    first = plan.condition + plan.buffers
    assert torch.count_nonzero(grad[:, :, :first]) == 0
    assert torch.count_nonzero(grad[:, :, first:]) == grad[:, :, first:].numel()
    pred = outputs[0].detach()
    independent = ((pred[:, :, first:] - (eps - x0)[:, :, first:]) ** 2).mean()
    assert torch.allclose(loss.detach(), independent, rtol=1e-5)
    trained = [p.grad for n, p in b.model.named_parameters() if p.requires_grad and "lora_A" in n]
    assert trained and all(g is None or torch.count_nonzero(g) == 0 for g in trained)  # B = 0: A gets none yet
    assert any(p.grad is not None and torch.count_nonzero(p.grad)
               for n, p in b.model.named_parameters() if "lora_B" in n)


# --- sampling ----------------------------------------------------------------------------------------
def test_a_zero_velocity_leaves_wan_frames_unchanged_in_one_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(_base().scheduler.config)
    sched.set_timesteps(4)
    x, v = _latents(5)
    v[:, :, :2] = 0.0
    out = sched.step(v, sched.timesteps[0], x, return_dict=False)[0]
    assert torch.equal(out[:, :, :2], x[:, :, :2])
    assert not torch.equal(out[:, :, 2:], x[:, :, 2:])


def test_the_sampler_holds_condition_frames_and_buffers_above_their_levels(monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler

    b = _base()
    plan = TICFT(buffers=2, taus=[0.3, 0.7]).in_context_plan(3, 5)  # c1 b2 t2
    x0, eps = _latents(5, n=1)
    start = b.add_noise(x0, eps, plan.start_sigmas().expand(1, -1))
    assert torch.equal(start[:, :, 0], x0[:, :, 0]) and torch.equal(start[:, :, 3:], eps[:, :, 3:])
    states, masks = [start.clone()], []
    original = FlowMatchEulerDiscreteScheduler.step

    def recording(self, *a, **kw):  # the latents after every Euler step
        out = original(self, *a, **kw)
        states.append(out[0].clone())
        return out

    def keep(sigma):
        masks.append((sigma, plan.frozen(sigma).tolist()))
        return plan.frozen(sigma)

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "step", recording)
    b.sample(start, torch.randn(1, 16, 32), 6, keep=keep)
    assert len(masks) == 6 and any(s < 0.7 for s, _ in masks) and any(s > 0.7 for s, _ in masks)
    for i, (sigma, mask) in enumerate(masks):
        assert mask == [True, sigma > 0.3, sigma > 0.7, False, False]
        for f, held in enumerate(mask):
            assert torch.equal(states[i + 1][:, :, f], states[i][:, :, f]) == held, (i, f)
    assert torch.equal(states[-1][:, :, 0], x0[:, :, 0])  # the condition ends as it started


# --- tensors are the adapter's ------------------------------------------------------------------------
def test_trainable_saved_and_lora_layers_are_the_adapters():
    task = _task()
    lora = LoRA(r=4)
    plain = copy.deepcopy(_base())
    lora.apply(plain)
    ours = {n for n, p in task.backbone.model.named_parameters() if p.requires_grad}
    assert ours == {n for n, p in plain.model.named_parameters() if p.requires_grad}
    assert set(task.method.lora_layers(task.backbone)) == set(lora.lora_layers(plain))
    assert set(task.method.adapter_state_dict(task.backbone)) == set(lora.adapter_state_dict(plain))
    assert len(ours) == 2 * 8 * task.backbone.num_blocks  # A and B on to_q/k/v/out.0 of both attentions


@pytest.mark.parametrize("task", ["classification", "vlm"])
def test_tasks_that_do_not_place_frames_refuse_tic_ft_instead_of_running_its_adapter_alone(task):
    from vision_ft.backbones import TimmViT, VisionLanguageModel
    from vision_ft.tasks import ImageClassificationTask, VisionLanguageSFTTask

    with pytest.raises(ConfigError, match="needs vision_ft.tasks.VideoDiffusionTask"):
        if task == "classification":
            ImageClassificationTask(TimmViT("vit_test_tiny"), method="tic_ft", num_classes=3)
        else:
            VisionLanguageSFTTask(VisionLanguageModel("qwen2_5_vl_test_tiny"), method="tic_ft")
