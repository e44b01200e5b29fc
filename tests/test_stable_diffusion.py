"""Stable Diffusion: the backbone, LoRA files that diffusers loads, merged pipeline export, resume, and the
text-to-image task's loss, validation and mixed precision."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

from vision_ft.errors import BackboneError, ConfigError

PROMPT = "a histology patch showing fibrosis"


@functools.cache
def _base():
    from vision_ft.backbones import StableDiffusion

    return StableDiffusion("sd_test_tiny")


def _backbone():
    return copy.deepcopy(_base())


def _lora(backbone, scale=0.3, **kw):
    from vision_ft.methods import LoRA

    method = LoRA(r=4, alpha=kw.pop("alpha", 8), **kw)
    method.apply(backbone)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in backbone.model.named_parameters():
            if "lora_B" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return method


def _generate(pipe, steps=2):
    g = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=5.0, generator=g, output_type="np",
                height=32, width=32).images


def _plain_pipeline(folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_backbone_roles_and_default_lora_targets():
    from vision_ft.backbones import StableDiffusion

    b = _backbone()
    assert b.image_size == 32 and b.num_blocks == 4  # down, mid, 2 up
    assert b.module_name(0, "q").endswith("attn1.to_q") and b.module_name(0, "cross_proj").endswith("attn2.to_out.0")
    with pytest.raises(ConfigError, match="no fused qkv"):
        b.weight_ref(0, "qkv")
    assert not any(p.requires_grad for p in b.vae.parameters())
    assert not any(p.requires_grad for p in b.text_encoder.parameters())
    m = _lora(b)
    names = m.target_names(b)
    assert len(names) == 8 * b.num_blocks and all(n.split(".")[-1] in ("to_q", "to_k", "to_v", "0") for n in names)
    from vision_ft.methods import LoRA

    cross = LoRA(targets=["cross_k", "cross_v"]).target_names(_backbone())
    assert len(cross) == 2 * b.num_blocks and all(".attn2.to_" in n for n in cross)
    self_only = LoRA().target_names(StableDiffusion("sd_test_tiny", attention=["self"]))
    assert len(self_only) == 4 * b.num_blocks and not any(".attn2." in n for n in self_only)


def test_offline_hub_id_and_bad_folder_name_the_key(tmp_path):
    from vision_ft.backbones import StableDiffusion

    with pytest.raises(BackboneError, match="backbone.init_args.checkpoint"):
        StableDiffusion("stable-diffusion-v1-5/stable-diffusion-v1-5", pretrained=True)
    with pytest.raises(BackboneError, match="model_index.json"):
        StableDiffusion(checkpoint=str(tmp_path))
    with pytest.raises(BackboneError, match="backbone.init_args.checkpoint"):
        StableDiffusion("no/such-model")


def test_lora_file_loads_in_plain_diffusers_and_generates_the_same_image(tmp_path):
    """The kit's sample and diffusers' (base pipeline + load_lora_weights(run_dir)) agree, with alpha != r."""
    _base().save_native(tmp_path / "base")
    b = _backbone()
    method = _lora(b, alpha=8)  # scaling 2, folded into lora_B on export
    path = b.save_lora(tmp_path / "run", method.lora_layers(b))
    assert path.name == "pytorch_lora_weights.safetensors"
    ours = _generate(b.pipeline())
    pipe = _plain_pipeline(tmp_path / "base")
    without = _generate(pipe)
    pipe.load_lora_weights(str(tmp_path / "run"))
    theirs = _generate(pipe)
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.abs(ours - without).max() > 1e-3, "the LoRA had no effect"


def test_merged_export_is_a_pipeline_folder_with_the_same_unet(tmp_path):
    b = _backbone()
    method = _lora(b)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = b.encode_text([PROMPT])
    with torch.no_grad():
        before = b.denoise(x, torch.tensor([300]), text)
    method.merge(b)
    b.save_native(tmp_path / "merged")
    pipe = _plain_pipeline(tmp_path / "merged")
    assert type(pipe.unet) is type(b.model) and not any("lora" in k for k in pipe.unet.state_dict())
    with torch.no_grad():
        after = pipe.unet(x, torch.tensor([300]), encoder_hidden_states=text).sample
    assert torch.allclose(before, after, atol=1e-5)


# --- task ------------------------------------------------------------------------------------------
def _task(method="lora", **kw):
    from vision_ft.tasks import TextToImageTask

    if method == "lora":
        method = {"class_path": "vision_ft.methods.LoRA", "init_args": {"r": 4, "alpha": 4}}
    return TextToImageTask(_backbone(), method=method, **kw)


def _batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 32, 32, generator=g), "caption": [PROMPT, "a histology patch showing normal"][:n]}


def test_validation_loss_is_deterministic_and_cache_exact():
    task = _task(val_timesteps=2).eval()
    batch = _batch()
    with torch.no_grad():
        a, b = task.fixed_loss(batch, 0), task.fixed_loss(batch, 0)
        cached = _task(cache=True, val_timesteps=2).eval()
        c, d = cached.fixed_loss(batch, 0), cached.fixed_loss(batch, 0)
        other = task.fixed_loss(batch, 1)
    assert torch.equal(a, b) and torch.equal(c, d) and torch.allclose(a, c, atol=1e-6)
    assert not torch.equal(a, other)  # the noise depends on the batch index


def test_v_prediction_target_and_min_snr_weights(monkeypatch):
    from diffusers.training_utils import compute_snr

    from vision_ft.tasks.diffusion import min_snr_weights, training_target

    sched = _base().scheduler
    x0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = training_target(sched, "v_prediction", x0, eps, t)
    assert torch.allclose(v, a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-5)
    assert training_target(sched, "epsilon", x0, eps, t) is eps
    snr = compute_snr(sched, t)
    w = min_snr_weights(sched, t, 5.0, "epsilon")
    assert torch.allclose(w, torch.clamp(snr, max=5.0) / snr)
    assert w[0] < 1 and w[2] == 1  # low noise (high SNR) is down-weighted
    assert torch.allclose(min_snr_weights(sched, t, 5.0, "v_prediction"), torch.clamp(snr, max=5.0) / (snr + 1))
    task = _task(prediction_type="v_prediction", snr_gamma=5.0)
    assert task.kind == "v_prediction"
    monkeypatch.setattr(task, "log_train_loss", lambda *a, **k: None)  # no trainer attached
    loss = task.training_step(_batch(), 0)
    loss.backward()
    assert all(p.grad is not None for n, p in task.backbone.model.named_parameters() if p.requires_grad)


def test_caption_dropout_uses_the_empty_prompt(monkeypatch):
    task = _task(caption_dropout=0.5)
    seen = []
    monkeypatch.setattr(task, "log_train_loss", lambda *a, **k: None)  # no trainer attached
    monkeypatch.setattr(task, "text", lambda caps: seen.append(list(caps)) or task.backbone.encode_text(caps))
    torch.manual_seed(0)
    for _ in range(4):
        task.training_step(_batch(), 0)
    flat = [c for caps in seen for c in caps]
    assert "" in flat and PROMPT in flat


def test_bad_task_config_and_offline_metrics_name_the_key():
    with pytest.raises(ConfigError, match="caption_dropout"):
        _task(caption_dropout=1.5)
    with pytest.raises(BackboneError, match="model.init_args.inception_weights"):
        _task(metrics=["fid"])
    with pytest.raises(BackboneError, match="model.init_args.clip_model"):
        _task(metrics=["clip_score"], clip_model="/nonexistent/clip")
    with pytest.raises(ConfigError, match="model.init_args.metrics"):
        _task(metrics=["psnr"])


class _Data:
    """Random captioned batches (no disk)."""

    def __init__(self, n=8):
        self.items = [{"image": torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)), "caption": PROMPT}
                      for i in range(n)]

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.items, batch_size=2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.items[:2], batch_size=2)


def _trainer(tmp_path, steps, **kw):
    import lightning as L

    return L.Trainer(max_steps=steps, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, **kw)


def test_resume_reloads_the_lora_weights(tmp_path):
    """A lean checkpoint carries the LoRA factors and resuming puts them back (diffusers #12689)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    task = _task(lr=1e-2)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True)
    _trainer(tmp_path, 3, callbacks=[ckpt]).fit(task, train_dataloaders=_Data().train_dataloader())
    trained = {k: v.clone() for k, v in task.backbone.model.state_dict().items() if "lora_" in k}
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["state_dict"]
    assert {f"backbone.model.{k}" for k in trained} == set(saved)
    fresh = _task(lr=1e-2)
    assert not all(torch.equal(fresh.backbone.model.state_dict()[k], v) for k, v in trained.items())
    _trainer(tmp_path / "r", 3).fit(fresh, train_dataloaders=_Data().train_dataloader(),
                                    ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    for k, v in trained.items():
        assert torch.equal(fresh.backbone.model.state_dict()[k], v), k


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_precision_keeps_trainable_tensors_fp32(tmp_path, precision):
    """fp16 / bf16 weights with the trainable tensors kept fp32 (no fp16 gradients to unscale); the LoRA moves;
    the encoder cache keys half-precision batches (bf16 has no numpy dtype)."""
    task = _task(lr=1e-2, cache=True)
    before = {n: p.detach().clone() for n, p in task.backbone.model.named_parameters() if p.requires_grad}
    _trainer(tmp_path, 2, precision=precision).fit(task, train_dataloaders=_Data(4).train_dataloader())
    trainable = {n: p for n, p in task.backbone.model.named_parameters() if p.requires_grad}
    frozen = [p for n, p in task.backbone.model.named_parameters() if not p.requires_grad and "to_q" in n]
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert frozen[0].dtype == (torch.bfloat16 if precision.startswith("bf16") else torch.float16)
    assert all(torch.isfinite(p).all() for p in trainable.values())
    assert any(not torch.equal(before[n], p.detach()) for n, p in trainable.items())


def test_run_folder_export_merge_and_sara_remask_in_training(tmp_path):
    """A trained run (SaRA, re-masked during fit by the task's hook, with an EMA whose resized averages restart)
    is rebuilt from its folder and exported merged as a pipeline folder whose UNet computes what the adapted
    model computes."""
    from vision_ft.export import export_merged, load_adapter, save_adapter

    torch.manual_seed(0)
    task = _task(method={"class_path": "vision_ft.methods.SaRA",
                         "init_args": {"threshold": 2e-2, "progressive_step": 2, "nuclear_min_dim": 16}}, lr=5e-2,
                 ema_decay=0.9)
    _trainer(tmp_path, 4).fit(task, train_dataloaders=_Data().train_dataloader())
    method = task.method
    assert method._remasked
    opt = task.trainer.optimizers[0]
    values = [p for p in task.backbone.model.parameters() if p.requires_grad]
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in values)
    assert sum(p.numel() for p in values) == method.mask_size()
    save_adapter(task, tmp_path / "run")
    loaded = load_adapter(tmp_path / "run")
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([400])
    text = task.backbone.encode_text([PROMPT])
    with torch.no_grad():
        ours = task.backbone.denoise(x, t, text)
        assert torch.equal(loaded.backbone.denoise(x, t, text), ours)
    out = export_merged(tmp_path / "run", tmp_path / "merged")
    pipe = _plain_pipeline(out)
    with torch.no_grad():
        assert torch.allclose(pipe.unet(x, t, encoder_hidden_states=text).sample, ours, atol=1e-6)


def test_methods_command_lists_what_applies_to_sd(capsys):
    import json

    from vision_ft.cli import main

    assert main(["methods", "--backbone", "sd_test_tiny", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name in ("lora", "sara", "ssf", "snell", "pego", "clip_lora", "full"):
        assert rows[name]["trainable_params"], name
    assert rows["coop"]["trainable_params"] is None and "text tower" in rows["coop"]["error"]
    assert rows["dr_tune"]["image_classification_only"] and not rows["lora"]["image_classification_only"]
    assert rows["sara"]["trainable_params"] == sum(int((p.abs() < 2e-3).sum()) for p in _base().model.parameters())


def test_clip_score_with_a_local_clip_folder(tmp_path, monkeypatch):
    """The optional CLIP score runs on a local transformers CLIP folder and equals CLIP's own cosine x 100
    averaged over the generated test images (the mean clamped at 0: torchmetrics' definition)."""
    import lightning as L
    from transformers import CLIPModel, CLIPProcessor

    from vision_ft.backbones import HFCLIP

    folder = tmp_path / "clip"
    HFCLIP("hf_clip_test_tiny").save_native(folder)
    fake = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(5)).numpy()
    captions = ["a histology patch showing fibrosis", "a photo of a cat", "noise", "a red square"]
    images = list(torch.from_numpy((fake * 255).astype("uint8")).permute(0, 3, 1, 2))

    def cosines():
        model, proc = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
        with torch.no_grad():
            logits = model(**proc(text=captions, images=images, return_tensors="pt", padding=True)).logits_per_image
        return (logits / model.logit_scale.exp()).diagonal(), model

    cos, model = cosines()
    if cos.mean() <= 0:  # random weights: flip the image embedding so the clamp at 0 does not hide the value
        with torch.no_grad():
            model.visual_projection.weight.neg_()
        model.save_pretrained(folder)
        cos, _ = cosines()
    assert cos.mean() > 0
    task = _task(metrics=["clip_score"], clip_model=str(folder), sample_steps=2, metric_images=4)
    monkeypatch.setattr(task, "generate", lambda caps, seeds, pair=False: fake[[captions.index(c) for c in caps]])
    items = [{"image": torch.rand(3, 32, 32), "caption": c} for c in captions]
    out = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        task, dataloaders=torch.utils.data.DataLoader(items, batch_size=2), verbose=False)[0]
    assert "test/loss" in out and "val/loss" not in out
    assert abs(out["test/clip_score"] - max(float((100 * cos).mean()), 0.0)) < 1e-3
    assert out["test/clip_score"] > 0
