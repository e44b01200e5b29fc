"""Medical synthesis pack: `fit --config domains/medical_synthesis.yaml` writes the diffusers LoRA file, sample
grids and loss curves, offline; a short run by default, the pack's own run (<= 5 min on 2 cores) marked slow."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from vision_ft.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "domains" / "medical_synthesis.yaml")


def _fit(tmp_path, *extra):
    return main(["fit", "--config", CONFIG, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                 f"--data.init_args.sample_dir={tmp_path / 'data'}", "--trainer.enable_progress_bar=false", *extra])


def _check_run(run: Path, grids: list[str]):
    for name in ("pytorch_lora_weights.safetensors", "adapter.safetensors", "adapter.json", "curves.png"):
        assert (run / name).is_file(), name
    for name in grids:
        with Image.open(run / "samples" / name) as img:
            assert img.size[0] > 3 * 32 and img.size[1] > 4 * 32  # 3 seeds x 4 prompts of 32 px
    from safetensors import safe_open

    with safe_open(str(run / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in keys)
    meta = json.loads((run / "adapter.json").read_text())
    assert "val/loss" in meta["metrics"] and meta["weights_source"].startswith("randomly initialised")


def test_pack_short_run_writes_lora_grids_and_curves_and_exports(tmp_path, capsys):
    assert _fit(tmp_path, "--trainer.max_steps=4", "--trainer.val_check_interval=2",
                "--model.init_args.sample_every_n_steps=2", "--model.init_args.sample_steps=2") == 0
    run = next((tmp_path / "runs" / "medical_synthesis").glob("version_*"))
    _check_run(run, ["step_000002.png", "step_000004.png", "final.png"])
    rows = [r for r in (run / "metrics.csv").read_text().splitlines()[1:] if r]
    assert rows
    capsys.readouterr()
    assert main(["export", str(run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert "StableDiffusionPipeline.from_pretrained" in capsys.readouterr().out
    assert (tmp_path / "merged" / "model_index.json").is_file() and (tmp_path / "merged" / "unet").is_dir()


@pytest.mark.slow
def test_pack_main_job_offline_within_five_minutes(tmp_path):
    started = time.time()
    assert _fit(tmp_path) == 0
    elapsed = time.time() - started
    run = next((tmp_path / "runs" / "medical_synthesis").glob("version_*"))
    _check_run(run, ["step_000060.png", "step_000120.png", "final.png"])
    assert elapsed < 300, f"the pack's main job took {elapsed:.0f} s"

