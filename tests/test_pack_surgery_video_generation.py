"""Surgery video generation pack: `fit --config domains/surgery_video_generation.yaml` (tiny Wan + TIC-FT + LoRA on
the synthetic clip sample) writes the diffusers LoRA file, MP4 samples with PNG strips and the adapter, offline;
a short run by default, the pack's own run (<= 5 min on 2 cores) marked slow."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from vision_ft.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "domains" / "surgery_video_generation.yaml")


def _fit(tmp_path, *extra):
    return main(["fit", "--config", CONFIG, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                 f"--data.init_args.sample_dir={tmp_path / 'data'}", "--trainer.enable_progress_bar=false", *extra])


def _check_run(run: Path, steps: list[int]):
    from vision_ft.data.video import decode_video

    for name in ("pytorch_lora_weights.safetensors", "adapter.safetensors", "adapter.json", "curves.png"):
        assert (run / name).is_file(), name
    for stem in [f"step_{s:06d}" for s in steps] + ["final"]:
        assert (run / "samples" / f"{stem}.png").is_file(), stem
        for i in range(2):  # two validation clips
            frames, _ = decode_video(run / "samples" / f"{stem}_{i}.mp4")
            assert frames.shape == (8, 32, 32, 3)  # the 8 generated target frames
    meta = json.loads((run / "adapter.json").read_text())
    assert "val/loss" in meta["metrics"] and meta["weights_source"].startswith("randomly initialised")
    assert meta["method"] == "tic_ft" and meta["method_spec"]["init_args"]["buffers"] == 3


def test_pack_short_run_writes_lora_samples_and_exports(tmp_path, capsys):
    assert _fit(tmp_path, "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                "--model.init_args.sample_every_n_steps=2", "--model.init_args.sample_steps=2") == 0
    run = next((tmp_path / "runs" / "surgery_video_generation").glob("version_*"))
    _check_run(run, [2])
    from diffusers import WanPipeline
    from safetensors.torch import load_file

    from vision_ft.backbones import WanVideo

    lora = load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.blocks.") and (".lora_A." in k or ".lora_B." in k) for k in lora)
    WanVideo("wan_test_tiny", max_sequence_length=32).save_native(tmp_path / "base")
    pipe = WanPipeline.from_pretrained(str(tmp_path / "base"))
    pipe.load_lora_weights(str(run))
    loaded = {n: p for n, p in pipe.transformer.named_parameters() if "lora_B" in n}
    assert len(loaded) == len(lora) // 2
    key = next(k for k in lora if ".lora_B." in k)
    module = key[len("transformer."):].split(".lora_B.")[0]
    assert torch.allclose(loaded[f"{module}.lora_B.default_0.weight"], lora[key])
    capsys.readouterr()
    assert main(["export", str(run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert "WanPipeline.from_pretrained" in capsys.readouterr().out
    merged = WanPipeline.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in k for k in merged.transformer.state_dict())


@pytest.mark.slow
def test_pack_main_job_offline_within_five_minutes(tmp_path):
    started = time.time()
    assert _fit(tmp_path) == 0
    elapsed = time.time() - started
    run = next((tmp_path / "runs" / "surgery_video_generation").glob("version_*"))
    _check_run(run, [50, 100, 150])
    assert elapsed < 300, f"the pack's main job took {elapsed:.0f} s"
