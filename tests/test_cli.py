"""The main job end to end, every shipped YAML, the kit commands and user errors at the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import timm
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from vision_ft.cli import main

ROOT = Path(__file__).resolve().parents[1]
MEDICAL = str(ROOT / "domains" / "medical.yaml")
TINY = str(ROOT / "configs" / "backbones" / "vit_test_tiny.yaml")


def _fit(tmp_path: Path, *extra: str, config=(MEDICAL, TINY)) -> int:
    args = ["fit"]
    for c in config:
        args += ["--config", c]
    args += [f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
             f"--data.init_args.sample_dir={tmp_path / 'sample'}",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra]
    return main(args)


def _run_dir(tmp_path: Path) -> Path:
    runs = sorted((tmp_path / "runs" / "medical").glob("version_*"))
    assert runs, "no run directory written"
    return runs[-1]


def test_main_job_writes_adapter_plots_and_exports_to_plain_timm(tmp_path, capsys):
    assert _fit(tmp_path, "--trainer.max_epochs=2", "--data.init_args.batch_size=64") == 0
    out = capsys.readouterr().out
    assert "random init" in out and "run summary" in out
    run = _run_dir(tmp_path)
    for name in ("adapter.safetensors", "adapter.json", "curves.png", "confusion_matrix.png", "config.yaml"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "last.ckpt").is_file()
    meta = json.loads((run / "adapter.json").read_text())
    assert meta["method"] == "ssf" and meta["backbone"]["init_args"]["name"] == "vit_test_tiny"
    assert meta["class_names"] == ["normal", "lesion", "fibrosis", "calcification"]
    assert {"val/acc", "val/f1", "val/auroc", "test/acc", "test/f1", "test/auroc"} <= set(meta["metrics"])
    assert meta["weights_source"].startswith("random init")
    # only the method's tensors and the head are in the adapter
    keys = load_file(run / "adapter.safetensors").keys()
    assert all("ssf_" in k or k.startswith("head.") for k in keys)

    # export --merge, then load with timm alone and compare logits with the trained model
    out_dir = tmp_path / "exported"
    assert main(["export", str(run), "--merge", "--out", str(out_dir)]) == 0
    import vision_ft

    trained = vision_ft.load_adapter(run)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(x)
        native = timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
        got = native(trained.backbone.preprocess(x))
        cfg = json.loads((out_dir / "config.json").read_text())
        plain = timm.create_model(cfg["architecture"], pretrained=False, num_classes=4, **cfg["model_args"]).eval()
        plain.load_state_dict(load_file(out_dir / "model.safetensors"))
        got_plain = plain(trained.backbone.preprocess(x))
    assert torch.allclose(expected, got, atol=1e-5)
    assert torch.allclose(expected, got_plain, atol=1e-5)

    # three-line inference on image files
    from PIL import Image

    Image.new("RGB", (28, 28), (200, 30, 30)).save(tmp_path / "a.png")
    preds = trained.predict_images([tmp_path / "a.png"])
    assert preds[0]["label"] in meta["class_names"]
    assert abs(sum(preds[0]["probs"].values()) - 1) < 1e-5


class StopAfterEpoch(Callback):
    """Stops training after ``epoch`` epochs, as an interrupted run would (test helper)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epoch:
            trainer.should_stop = True


def test_resume_continues_the_schedule_and_matches_an_uninterrupted_run(tmp_path):
    common = ("--trainer.max_epochs=3", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2",
              "--test_after_fit=false", "--trainer.deterministic=true")
    a, b = tmp_path / "a", tmp_path / "b"
    assert _fit(a, *common) == 0
    stop = '--trainer.callbacks+={"class_path": "test_cli.StopAfterEpoch", "init_args": {"epoch": 2}}'
    assert _fit(b, *common, stop) == 0
    last = _run_dir(b) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    assert ckpt["epoch"] == 1
    assert all("ssf_" in k or k.startswith("head.") for k in ckpt["state_dict"]), "frozen backbone in checkpoint"
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 8
    assert _fit(b, *common, f"--ckpt_path={last}") == 0
    # the lean checkpoint also serves `test` (the frozen backbone is rebuilt from the config)
    assert main(["test", "--config", MEDICAL, "--config", TINY, f"--ckpt_path={last}",
                 f"--trainer.logger.init_args.save_dir={tmp_path / 't'}",
                 f"--data.init_args.sample_dir={b / 'sample'}", "--trainer.enable_progress_bar=false"]) == 0
    wa = load_file(_run_dir(a) / "adapter.safetensors")
    wb = load_file(_run_dir(b) / "adapter.safetensors")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


SHIPPED_FULL = sorted(str(p) for p in (ROOT / "domains").glob("*.yaml"))
FRAGMENTS = sorted(str(p) for p in (ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", SHIPPED_FULL, ids=lambda p: Path(p).name)
def test_every_shipped_full_config_runs(config, tmp_path):
    assert _fit(tmp_path, "--trainer.fast_dev_run=true", config=(config,)) == 0


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: str(Path(p).relative_to(ROOT / "configs")))
def test_every_config_fragment_stacks_on_the_medical_config(fragment, tmp_path, capsys):
    text = Path(fragment).read_text()
    if "accelerator: gpu" in text and not torch.cuda.is_available():
        pytest.skip("GPU-only trainer fragment (FSDP/DeepSpeed); runs where a GPU is present")
    if "requires: clip" in text:  # prompt methods need a CLIP task + backbone
        config = (str(ROOT / "domains" / "clip_few_shot.yaml"), fragment)
    elif "requires: video" in text:  # in-context methods need the video diffusion task
        config = (str(ROOT / "domains" / "surgery_video_generation.yaml"), fragment)
    else:
        config = (MEDICAL, TINY, fragment) if "backbones/" not in fragment else (MEDICAL, fragment)
    try:
        code = _fit(tmp_path, "--trainer.fast_dev_run=true", config=config)
    finally:  # a 1-process DDP run leaves its process group and rendezvous variables behind
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for var in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
            os.environ.pop(var, None)
    if "pretrained: true" in text:  # offline: the clear error naming the key, no traceback
        assert code == 2
        assert "backbone.init_args.checkpoint" in capsys.readouterr().err
    else:
        assert code == 0


def test_method_override_by_name_and_class_path(tmp_path):
    assert _fit(tmp_path / "a", "--trainer.fast_dev_run=true", "--model.method=lora") == 0  # shorthand
    assert _fit(tmp_path / "b", "--trainer.fast_dev_run=true",
                "--model.init_args.method=vision_ft.methods.LinearProbe") == 0


def test_print_config(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", MEDICAL, "--print_config"])
    assert e.value.code == 0
    assert "vision_ft.backbones.TimmViT" in capsys.readouterr().out


def test_unknown_method_is_a_clear_error(tmp_path, capsys):
    assert _fit(tmp_path, "--trainer.fast_dev_run=true", "--model.init_args.method=sff") == 2
    err = capsys.readouterr().err
    assert "unknown method 'sff'" in err and "Did you mean 'ssf'" in err and "Traceback" not in err


def test_yaml_typo_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(MEDICAL).read_text().replace("max_epochs:", "max_epoch:"))
    with pytest.raises(SystemExit) as e:
        _fit(tmp_path, config=(str(bad),))
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "max_epoch" in err and "Traceback" not in err


def test_methods_command_json(capsys):
    assert main(["methods", "--backbone", "vit_test_tiny", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert {"linear", "full", "ssf", "lora"} <= set(by_name)
    assert by_name["ssf"]["trainable_params"] == 2 * (2 * (32 * 4 + 96 + 128)) + 2 * 2 * 32
    assert by_name["linear"]["trainable_params"] == 0
    assert all(isinstance(r["mergeable"], bool) for r in rows)


def test_methods_command_table(capsys):
    assert main(["methods", "--backbone", "vit_test_tiny"]) == 0
    assert "ssf" in capsys.readouterr().out


def test_export_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--merge", "--out", str(tmp_path / "o")]) == 2
    assert "adapter.json" in capsys.readouterr().err


def test_methods_command_counts_clip_lora_on_open_clip_vit_b_16(capsys):
    assert main(["methods", "--backbone", "ViT-B-16", "--json"]) == 0
    by_name = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert by_name["clip_lora"]["trainable_params"] == 184_320  # r=2 on q,k,v of both towers (CLIP-LoRA)
    assert by_name["coop"]["trainable_params"] == 16 * 512
    assert by_name["comp_lora"]["trainable_params"] == 184_320  # CLIP-LoRA's factors, projected (bases are buffers)
    # Block-LoRA: r (d_out + d_in / n) per q/k/v site, r=2, n=8: 36 visual sites (768) + 36 text sites (512)
    assert by_name["block_lora"]["trainable_params"] == 2 * (768 + 768 // 8) * 36 + 2 * (512 + 512 // 8) * 36
    # Local-Prompt sized for ImageNet-1k without class names: (1000 local + 300 negative) x 16 x 512
    assert by_name["local_prompt"]["trainable_params"] == (1000 + 300) * 16 * 512
    # methods written for a timm ViT say why they do not apply instead of crashing the listing
    assert all(r["trainable_params"] is not None or r["error"] for r in by_name.values())
