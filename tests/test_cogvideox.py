"""CogVideoX (diffusers) as a backbone of the video diffusion task: [B, F, C, H, W] latents, the 4k+1 frame rule,
DDPM levels on the timestep axis (TIC-FT's buffers at the paper's t = 249, 499, 749), the x_0 loss with
1 / (1 - a_t) weights, DDIM sampling that re-injects held frames, and a LoRA loaded by
``CogVideoXPipeline.load_lora_weights`` reproducing the kit's sample."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

from vision_ft.errors import BackboneError, ConfigError
from vision_ft.methods import TICFT

PROMPT = "a laparoscopic hook dissects the calot triangle"


@functools.cache
def _base():
    from vision_ft.backbones import CogVideoX

    return CogVideoX("cogvideox_test_tiny")


def _task(method=None, **kw):
    from vision_ft.tasks import VideoDiffusionTask

    method = method or {"class_path": "vision_ft.methods.TICFT",
                        "init_args": {"buffers": 1, "adapter": {"class_path": "vision_ft.methods.LoRA",
                                                                "init_args": {"r": 4, "alpha": 8}}}}
    return VideoDiffusionTask(copy.deepcopy(_base()), method=method, **kw)


def _video(n=1, frames=9, seed=0):
    return torch.rand(n, frames, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_layout_frame_rule_roles_and_latent_scaling():
    from vision_ft.methods import LoRA

    b = _base()
    assert b.frame_dim == 1 and b.num_blocks == 2 and b.max_sequence_length == 16
    assert b.module_name(1, "v") == "transformer_blocks.1.attn1.to_v"
    with pytest.raises(ConfigError, match="no cross-attention"):
        b.module_name(0, "cross_q")
    assert len(LoRA().target_names(b)) == 4 * b.num_blocks
    with pytest.raises(ConfigError, match="4k \\+ 1"):
        b.latent_frames(8)
    video = _video(2)
    z = b.encode_video(video, sample=False)
    assert z.shape == (2, 3, 4, 4, 4)  # [B, F, C, H, W]
    raw = b.vae.encode(video.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mode()
    assert torch.allclose(z, raw.permute(0, 2, 1, 3, 4) * b.vae.config.scaling_factor, atol=1e-6)
    assert b.decode_latents(z).shape == (2, 9, 3, 32, 32)
    assert not any(p.requires_grad for p in b.vae.parameters())


def test_levels_are_timestep_fractions_and_noising_is_the_schedulers():
    b = _base()
    assert b.timesteps(torch.tensor([0.25, 0.5, 0.75, 1.0])).tolist() == [249, 499, 749, 999]
    t = torch.tensor([3, 640])
    assert torch.equal(b.timesteps(b.level_of(t)), t)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 5, 4, 4, 4, generator=g), torch.randn(2, 5, 4, 4, 4, generator=g)
    plan = TICFT(buffers=2, taus=[0.25, 0.5]).in_context_plan(3, 5)  # c1 b2 t2
    levels = plan.frame_sigmas(b.level_of(t))
    noisy = b.add_noise(x0, eps, levels)
    assert torch.equal(noisy[:, 0], x0[:, 0])
    for f, steps in ((1, [3, 249]), (2, [3, 499]), (3, [3, 640])):  # buffers at min(t, t_k), targets at t
        expected = b.scheduler.add_noise(x0[:, f], eps[:, f], torch.tensor(steps))
        assert torch.allclose(noisy[:, f], expected, atol=1e-6), f
    pure = b.add_noise(x0, eps, torch.ones(2, 5))
    assert torch.allclose(pure, eps, atol=1e-6)  # zero terminal SNR: level 1 is noise


def test_the_loss_is_x0_on_targets_weighted_and_the_model_gets_one_timestep():
    task = _task()
    b = task.backbone
    plan = task.plan(2, 4)  # c1 b1 t2
    seen, outputs = [], []
    hook = b.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True)
    denoise = b.denoise

    def capture(*a):
        out = denoise(*a)
        out.retain_grad()
        outputs.append(out)
        return out

    b.denoise = capture
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, 4, generator=g)
    levels = b.level_of(torch.tensor([100, 900]))
    loss = task.flow_loss(x0, eps, levels, torch.randn(2, 16, 32, generator=g), plan)
    loss.backward()
    hook.remove()
    assert seen[0].tolist() == [100, 900]
    grad = outputs[0].grad
    assert torch.count_nonzero(grad[:, :2]) == 0 and torch.count_nonzero(grad[:, 2:]) == grad[:, 2:].numel()
    alphas = b.scheduler.alphas_cumprod[torch.tensor([100, 900])].float()
    per = ((outputs[0].detach()[:, 2:] - x0[:, 2:]) ** 2).mean(dim=(1, 2, 3, 4))
    assert torch.allclose(loss.detach(), (per / (1 - alphas)).mean(), rtol=1e-5)


def test_ddim_moves_frames_with_zero_prediction_so_the_sampler_reinjects_them():
    from diffusers import CogVideoXDDIMScheduler

    b = _base()
    sched = CogVideoXDDIMScheduler.from_config(b.scheduler.config)
    sched.set_timesteps(4)
    x = torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(sched.step(torch.zeros_like(x), sched.timesteps[0], x, return_dict=False)[0], x)
    plan = TICFT(buffers=1, taus=[0.5]).in_context_plan(2, 3)  # c1 b1 t1
    start = b.add_noise(x, torch.randn_like(x), plan.start_sigmas().expand(1, -1))
    inputs, masks = [], []
    hook = b.model.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw["hidden_states"].clone()),
                                             with_kwargs=True)

    def keep(level):
        masks.append(plan.frozen(level).tolist())
        return plan.frozen(level)

    try:
        out = b.sample(start, torch.randn(1, 16, 32), 6, keep=keep)
    finally:
        hook.remove()
    states = inputs + [out]  # the latents before every step, then the result
    assert masks[0] == [True, True, False] and masks[-1] == [True, False, False]
    for i, mask in enumerate(masks):
        for f, held in enumerate(mask):
            assert torch.equal(states[i + 1][:, f], states[i][:, f]) == held, (i, f)
    assert torch.equal(out[:, 0], start[:, 0])


def test_lora_file_loads_in_plain_diffusers_and_samples_the_same_video(tmp_path):
    """Plain text-to-video: the kit's DDIM sampler with its peft LoRA and CogVideoXPipeline (base folder +
    load_lora_weights(run), the same scheduler, no dynamic guidance) agree from the same seed."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    _base().save_native(tmp_path / "base")
    task = _task(method={"class_path": "vision_ft.methods.LoRA", "init_args": {"r": 4, "alpha": 8}}, sample_steps=3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in task.backbone.model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    task.backbone.save_lora(tmp_path / "run", task.method.lora_layers(task.backbone))
    ours = task.generate([PROMPT], 9, seeds=[7]).permute(0, 1, 3, 4, 2).numpy()
    pipe = CogVideoXPipeline.from_pretrained(str(tmp_path / "base"))
    pipe.scheduler = CogVideoXDDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(task.backbone.latent_shape(3), generator=torch.Generator().manual_seed(7))[None]

    def run():
        return pipe(PROMPT, height=32, width=32, num_frames=9, num_inference_steps=3, guidance_scale=1.0,
                    use_dynamic_cfg=False, latents=latents.clone(), output_type="np", max_sequence_length=16).frames

    without = run()
    pipe.load_lora_weights(str(tmp_path / "run"))
    theirs = run()
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.abs(ours - without).max() > 1e-3, "the LoRA had no effect"


def test_pipeline_folder_loads_and_missing_weights_name_the_key(tmp_path):
    from vision_ft.backbones import CogVideoX

    _base().save_native(tmp_path / "cog")
    loaded = CogVideoX(checkpoint=str(tmp_path / "cog"), height=32, width=32)
    ref = _base().model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.model.state_dict().items())
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(BackboneError, match="model_index.json"):
        CogVideoX(checkpoint=str(tmp_path))
    with pytest.raises(BackboneError, match="backbone.init_args.checkpoint"):
        CogVideoX("THUDM/CogVideoX-2b", pretrained=True)


def test_two_step_fit_with_tic_ft_writes_the_lora_file(tmp_path):
    import lightning as L

    torch.manual_seed(0)
    task = _task(lr=1e-2, num_samples=1, sample_steps=2)
    items = []
    for i in range(4):
        clip = _video(1, 9, seed=i)[0]
        items.append({"condition": clip[:5], "target": clip[5:], "prompt": PROMPT})
    loader = torch.utils.data.DataLoader(items, batch_size=2)
    before = {n: p.detach().clone() for n, p in task.backbone.model.named_parameters() if p.requires_grad}
    L.Trainer(max_steps=2, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
              limit_val_batches=1).fit(task, train_dataloaders=loader, val_dataloaders=loader)
    after = dict(task.backbone.model.named_parameters())
    assert any(not torch.equal(v, after[n]) for n, v in before.items())
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "samples" / "final_0.mp4").is_file()


def test_rotary_layout_of_the_5b_model_samples_as_the_pipeline(monkeypatch):
    """CogVideoX-5b uses 3-D rotary position embeddings: the kit's sampler builds them as the pipeline does."""
    from diffusers import CogVideoXDDIMScheduler

    from vision_ft.backbones import CogVideoX, cogvideox

    tiny = cogvideox.TINY_PRESETS["cogvideox_test_tiny"]
    monkeypatch.setitem(cogvideox.TINY_PRESETS, "cogvideox_test_rope", {
        **tiny, "transformer": dict(tiny["transformer"], use_rotary_positional_embeddings=True, attention_head_dim=16)})
    b = CogVideoX("cogvideox_test_rope")
    latents = torch.randn(1, *b.latent_shape(3), generator=torch.Generator().manual_seed(0))
    ours = b.sample(latents.clone(), b.encode_text([PROMPT]), 3)
    pipe = b.pipeline(scheduler=CogVideoXDDIMScheduler.from_config(b.scheduler.config))
    theirs = pipe(PROMPT, height=32, width=32, num_frames=9, num_inference_steps=3, guidance_scale=1.0,
                  use_dynamic_cfg=False, latents=latents.clone(), output_type="latent", max_sequence_length=16).frames
    assert b.model.config.use_rotary_positional_embeddings and torch.allclose(ours, theirs, atol=1e-6)
