"""Wan 2.1 (diffusers) as a backbone and the video diffusion task: frame rule, latent normalisation, loading
from a pipeline folder, the kit's sampler against plain diffusers with a LoRA loaded by
``WanPipeline.load_lora_weights``, deterministic validation and a short fit with TIC-FT + LoRA."""

from __future__ import annotations

import copy
import functools
import time

import numpy as np
import pytest
import torch

from vision_ft.errors import BackboneError, ConfigError

PROMPT = "a laparoscopic grasper retracts the gallbladder"


@functools.cache
def _base():
    from vision_ft.backbones import WanVideo

    return WanVideo("wan_test_tiny", max_sequence_length=16)


def _backbone():
    return copy.deepcopy(_base())


def _video(n=1, frames=9, seed=0):
    return torch.rand(n, frames, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --- backbone ----------------------------------------------------------------------------------------
def test_roles_default_lora_targets_and_frozen_parts():
    from vision_ft.methods import LoRA

    b = _backbone()
    assert b.num_blocks == 2 and b.frame_dim == 2 and (b.height, b.width) == (32, 32)
    assert b.module_name(1, "q") == "blocks.1.attn1.to_q"
    assert b.module_name(0, "cross_proj") == "blocks.0.attn2.to_out.0"
    with pytest.raises(ConfigError, match="no fused qkv"):
        b.weight_ref(0, "qkv")
    assert not any(p.requires_grad for p in b.vae.parameters())
    assert not any(p.requires_grad for p in b.text_encoder.parameters())
    names = LoRA().target_names(b)
    assert len(names) == 8 * b.num_blocks
    assert {n.split(".", 2)[2] for n in names} == {f"attn{i}.{m}" for i in (1, 2)
                                                   for m in ("to_q", "to_k", "to_v", "to_out.0")}


def test_frame_rule_is_four_k_plus_one():
    b = _base()
    assert [b.latent_frames(n) for n in (1, 5, 9, 49)] == [1, 2, 3, 13]
    assert b.pixel_frames(13) == 49
    for bad in (0, 2, 8, 10, 48):
        with pytest.raises(ConfigError, match="4k \\+ 1"):
            b.latent_frames(bad)
    with pytest.raises(ConfigError, match="video frames=8"):
        b.encode_video(_video(frames=8))


def test_latents_are_normalised_with_the_vaes_mean_and_std_and_decode_back():
    b = _base()
    video = _video(2)
    z = b.encode_video(video, sample=False)
    assert z.shape == (2, 16, 3, 4, 4)
    raw = b.vae.encode(video.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mode()
    mean = torch.tensor(b.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(b.vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert not torch.allclose(mean, torch.zeros_like(mean))  # the stats are Wan's, not an identity
    assert torch.allclose(z, (raw - mean) / std, atol=1e-5)
    frames = b.decode_latents(z)
    reference = b.vae.decode(raw).sample
    assert frames.shape == (2, 9, 3, 32, 32)
    assert torch.allclose(frames, ((reference.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4), atol=1e-5)


def test_pipeline_folder_loads_back_and_missing_weights_name_the_key(tmp_path):
    from vision_ft.backbones import WanVideo

    _base().save_native(tmp_path / "wan")
    loaded = WanVideo(checkpoint=str(tmp_path / "wan"), max_sequence_length=16)
    assert loaded.weights_source.startswith("pipeline folder")
    ref = _base().model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.model.state_dict().items())
    assert loaded.flow_shift == _base().flow_shift and (loaded.height, loaded.width) == (480, 832)
    assert torch.equal(loaded.encode_text([PROMPT]), _base().encode_text([PROMPT]))
    with pytest.raises(BackboneError, match="model_index.json"):
        WanVideo(checkpoint=str(tmp_path))
    with pytest.raises(BackboneError, match="backbone.init_args.checkpoint"):
        WanVideo("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", pretrained=True)
    with pytest.raises(ConfigError, match="multiple of 16"):
        WanVideo(height=40)


def test_lora_file_loads_in_plain_diffusers_and_samples_the_same_video(tmp_path):
    """Plain text-to-video (no condition): the kit's sampler with its peft LoRA and diffusers' WanPipeline (base
    folder + load_lora_weights(run)) give the same frames from the same seed, with alpha != r."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from vision_ft.tasks import VideoDiffusionTask

    _base().save_native(tmp_path / "base")
    task = VideoDiffusionTask(_backbone(), method={"class_path": "vision_ft.methods.LoRA",
                                                   "init_args": {"r": 4, "alpha": 8}}, sample_steps=3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in task.backbone.model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    path = task.backbone.save_lora(tmp_path / "run", task.method.lora_layers(task.backbone))
    assert path.name == "pytorch_lora_weights.safetensors"
    ours = task.generate([PROMPT], 9, seeds=[7])  # (1, 9, 3, 32, 32)
    pipe = WanPipeline.from_pretrained(str(tmp_path / "base"))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(task.backbone.latent_shape(3), generator=torch.Generator().manual_seed(7))[None]

    def run():
        return pipe(PROMPT, height=32, width=32, num_frames=9, num_inference_steps=3, guidance_scale=1.0,
                    latents=latents.clone(), output_type="np", max_sequence_length=16).frames

    without = run()
    pipe.load_lora_weights(str(tmp_path / "run"))
    theirs = run()
    ours_np = ours.permute(0, 1, 3, 4, 2).numpy()
    assert np.abs(ours_np - theirs).max() < 1e-5
    assert np.abs(ours_np - without).max() > 1e-3, "the LoRA had no effect"


# --- task --------------------------------------------------------------------------------------------
def _task(**kw):
    from vision_ft.tasks import VideoDiffusionTask

    method = kw.pop("method", {"class_path": "vision_ft.methods.TICFT",
                               "init_args": {"buffers": 1, "adapter": {"class_path": "vision_ft.methods.LoRA",
                                                                       "init_args": {"r": 4}}}})
    return VideoDiffusionTask(_backbone(), method=method, **kw)


def _pairs(n=4):
    """Paired clips in memory: 5 condition frames (1 image repeated: image-to-video) then 4 target frames."""
    items = []
    for i in range(n):
        clip = _video(1, 9, seed=i)[0]
        items.append({"condition": clip[:1].expand(5, -1, -1, -1).clone(), "target": clip[5:], "prompt": PROMPT})
    return items


def test_validation_loss_is_deterministic_and_the_encoder_cache_exact():
    task, cached = _task(), _task(cache=True)
    batch = torch.utils.data.default_collate(_pairs(2))
    with torch.no_grad():
        a, b = task.fixed_loss(batch, 0), task.fixed_loss(batch, 0)
        c = task.fixed_loss(batch, 1)
        assert torch.equal(a, b) and not torch.equal(a, c)  # fixed per (seed, batch, slot)
        assert torch.allclose(cached.fixed_loss(batch, 0), a, rtol=1e-6) and len(cached._latent_cache) == 2
        assert torch.allclose(cached.fixed_loss(batch, 0), a, rtol=1e-6) and len(cached._text_cache) == 1
        frames, _ = task.clip(batch)
        torch.manual_seed(5)
        drawn = task.latents(frames)
        torch.manual_seed(5)
        assert torch.allclose(cached.latents(frames), drawn, atol=1e-6)  # the cache still samples the posterior
        assert not torch.allclose(drawn, task.latents(frames, sample=False))


def test_two_step_fit_writes_lora_samples_and_a_moving_adapter(tmp_path):
    import lightning as L

    from vision_ft.methods import TICFT

    torch.manual_seed(0)
    task = _task(lr=1e-2, num_samples=1, sample_steps=2, sample_every_n_steps=2)
    assert isinstance(task.method, TICFT)
    before = {n: p.detach().clone() for n, p in task.backbone.model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in task.backbone.model.named_parameters() if not p.requires_grad}
    loader = torch.utils.data.DataLoader(_pairs(4), batch_size=2)
    trainer = L.Trainer(max_steps=2, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        limit_val_batches=1)
    start = time.perf_counter()
    trainer.fit(task, train_dataloaders=loader, val_dataloaders=loader)
    elapsed = time.perf_counter() - start
    print(f"2-step TIC-FT + LoRA fit on tiny Wan: {elapsed:.1f} s")
    after = dict(task.backbone.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(v, after[n]) for n, v in frozen.items())
    run = tmp_path
    assert (run / "adapter.safetensors").is_file() and (run / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "samples" / "final_0.mp4").stat().st_size > 0 and (run / "samples" / "final.png").is_file()
    assert (run / "samples" / "step_000002_0.mp4").is_file()
    from vision_ft.data.video import decode_video

    frames, _ = decode_video(run / "samples" / "final_0.mp4")
    assert frames.shape[0] == 4 and frames.shape[1:3] == (32, 32)  # the target frames only


@pytest.mark.parametrize("preset", ["wan_test_tiny", "cogvideox_test_tiny"])
def test_methods_command_counts_on_the_video_presets(preset, capsys):
    import json

    from vision_ft.cli import main

    assert main(["methods", "--backbone", preset, "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tic_ft"]["trainable_params"] == rows["lora"]["trainable_params"] > 0  # its adapter's count
    assert rows["ssf"]["trainable_params"] is None and rows["ssf"]["error"]
    assert rows["full"]["trainable_params"] > rows["lora"]["trainable_params"]


def test_bf16_weights_keep_the_trainable_tensors_fp32_and_train(tmp_path):
    import lightning as L

    task = _task(lr=1e-2, num_samples=0, cache=True)  # one VAE encode per clip: bf16 convolutions are slow on CPU
    before = {n: p.detach().clone() for n, p in task.backbone.model.named_parameters() if p.requires_grad}
    loader = torch.utils.data.DataLoader(_pairs(2), batch_size=2)
    L.Trainer(max_steps=2, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
              precision="bf16-true", enable_model_summary=False, enable_checkpointing=False,
              limit_val_batches=0).fit(task, train_dataloaders=loader)
    trainable = {n: p for n, p in task.backbone.model.named_parameters() if p.requires_grad}
    frozen = next(p for n, p in task.backbone.model.named_parameters() if n.endswith("attn1.to_q.base_layer.weight"))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainable.values())
    assert frozen.dtype == torch.bfloat16
    assert any(not torch.equal(before[n], p.detach()) for n, p in trainable.items())


def test_resume_puts_the_lora_factors_back(tmp_path):
    """The lean checkpoint holds only the LoRA factors (not the frozen transformer) and resuming restores them
    (the diffusers LoRA scripts' resume bug, #12689)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer(root, steps, **kw):
        return L.Trainer(max_steps=steps, default_root_dir=str(root), logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, **kw)

    loader = torch.utils.data.DataLoader(_pairs(2), batch_size=2)
    torch.manual_seed(0)
    task = _task(lr=1e-2, num_samples=0, cache=True)
    trainer(tmp_path, 2, callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True)]).fit(task, loader)
    trained = {k: v.clone() for k, v in task.backbone.model.state_dict().items() if "lora_" in k}
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["state_dict"]
    assert {f"backbone.model.{k}" for k in trained} == set(saved)
    fresh = _task(lr=1e-2, num_samples=0, cache=True)
    trainer(tmp_path / "r", 2).fit(fresh, loader, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    for k, v in trained.items():
        assert torch.equal(fresh.backbone.model.state_dict()[k], v), k


def test_classifier_free_guidance_samples_as_the_pipeline():
    """guidance_scale 5 with the empty negative prompt: the kit's sampler and WanPipeline agree."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    task = _task(method="lora", sample_steps=3, guidance_scale=5.0)
    ours = task.generate([PROMPT], 9, seeds=[4]).permute(0, 1, 3, 4, 2).numpy()
    b = task.backbone
    pipe = b.pipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(b.scheduler.config))
    latents = torch.randn(b.latent_shape(3), generator=torch.Generator().manual_seed(4))[None]
    theirs = pipe(PROMPT, negative_prompt="", height=32, width=32, num_frames=9, num_inference_steps=3,
                  guidance_scale=5.0, latents=latents, output_type="np", max_sequence_length=16).frames
    plain = _task(method="lora", sample_steps=3).generate([PROMPT], 9, seeds=[4]).permute(0, 1, 3, 4, 2).numpy()
    assert np.abs(ours - theirs).max() < 1e-5 and np.abs(ours - plain).max() > 1e-4
