"""Surgery video captioning pack: the synthetic captioned clips, and the main command end to end (offline):
the Q-Adapter + LoRA run beats the untrained model's CIDEr on its own sample."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from domains.surgery_video.captioning_data import CAPTIONS, MARKER, write_caption_sample

pytest.importorskip("av")
ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "domains" / "surgery_video_captioning.yaml")


def test_sample_clips_cover_every_phase_with_three_references(tmp_path):
    from vision_ft.data.conversations import read_records
    from vision_ft.data.video import probe_video

    root = write_caption_sample(tmp_path / "s", n_train=7, n_val=7, frames=4)
    again = write_caption_sample(tmp_path / "s", n_train=7, n_val=7, frames=4)  # reused, not rewritten
    assert again == root and (root / MARKER).is_file()
    lines = [json.loads(x) for x in (root / "captions_train.jsonl").read_text().splitlines()]
    assert sorted(r["phase"] for r in lines) == list(range(7))
    for r in lines:
        assert r["references"] == CAPTIONS[r["phase"]] and r["conversations"][1]["value"] == r["references"][0]
        assert len(probe_video(root / r["video"]).pts) == 4
    convs, skipped = read_records(root / "captions_val.jsonl")
    assert len(convs) == 7 and not skipped and all(len(c.references) == 3 and c.videos for c in convs)


def _metrics(run: Path) -> dict:
    return json.loads((run / "adapter.json").read_text())["metrics"]


@pytest.mark.timeout(600)
def test_main_command_beats_the_untrained_models_cider(tmp_path):
    """The pack's config without METEOR (Java start-up): fit + test, then the same model untrained
    (Q-Adapter at step 0 is the base model) tested on the same clips."""
    from vision_ft.cli import main

    common = [f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
              f"--data.init_args.sample_dir={tmp_path / 'sample'}",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              "--model.init_args.caption_metrics=[bleu4, rouge_l, cider]"]
    assert main(["fit", "--config", CONFIG, *common]) == 0
    trained_run = sorted((tmp_path / "runs" / "surgery_video_captioning").glob("version_*"))[-1]
    trained = _metrics(trained_run)
    preds = [json.loads(x) for x in (trained_run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 7 and all(len(p["references"]) == 3 and p["prompt"].startswith("<video>") for p in preds)
    assert main(["test", "--config", CONFIG, *common]) == 0  # the freshly built (untrained) model
    untrained_run = sorted((tmp_path / "runs" / "surgery_video_captioning").glob("version_*"))[-1]
    assert untrained_run != trained_run
    rows = list(csv.DictReader((untrained_run / "metrics.csv").open()))
    untrained = {k: float(v) for r in rows for k, v in r.items() if k.startswith("test/") and v}
    assert {"test/bleu4", "test/rouge_l", "test/cider"} <= set(trained) and "test/meteor" not in trained
    assert trained["test/cider"] > untrained["test/cider"] + 0.05, (trained, untrained)


@pytest.mark.slow  # about a minute on 2 shared cores
@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_two_gloo_ranks_score_every_clip_once(tmp_path):
    """Each rank answers its shard (the sampler pads 7 clips to 8); the metrics and predictions.jsonl hold the
    union, each clip once."""
    from test_reliability import _subprocess

    args = ["fit", "--config", CONFIG, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            f"--data.init_args.sample_dir={tmp_path / 'sample'}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu", "--trainer.devices=2",
            "--trainer.strategy=ddp", "--trainer.max_epochs=1", "--model.init_args.caption_metrics=[bleu4, cider]"]
    proc = _subprocess(args, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = sorted((tmp_path / "runs" / "surgery_video_captioning").glob("version_*"))[-1]
    preds = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["source"] for p in preds) == sorted({p["source"] for p in preds}) and len(preds) == 7
    assert _metrics(run)["test/count"] == 7.0


def test_resume_of_q_adapter_with_lora_matches_an_uninterrupted_run(tmp_path):
    """Interrupted after epoch 2 of 3 and resumed from last.ckpt: the queries, gates and LoRA factors end where an
    uninterrupted run ends (video batches, the vision-language task's checkpoint and RNG state)."""
    import torch
    from safetensors.torch import load_file

    from vision_ft.cli import main

    def fit(root, *extra):
        return main(["fit", "--config", CONFIG, f"--trainer.logger.init_args.save_dir={root / 'runs'}",
                     f"--data.init_args.sample_dir={tmp_path / 'sample'}", "--data.init_args.n_train=7",
                     "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                     "--trainer.max_epochs=3", "--trainer.limit_val_batches=1", "--test_after_fit=false",
                     "--trainer.deterministic=true", *extra])

    def run_dir(root):
        return sorted((root / "runs" / "surgery_video_captioning").glob("version_*"))[-1]

    a, b = tmp_path / "a", tmp_path / "b"
    assert fit(a) == 0
    stop = '--trainer.callbacks+={"class_path": "test_cli.StopAfterEpoch", "init_args": {"epoch": 2}}'
    assert fit(b, stop) == 0
    last = run_dir(b) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True, map_location="cpu")["epoch"] == 1
    assert fit(b, f"--ckpt_path={last}") == 0
    wa, wb = load_file(run_dir(a) / "adapter.safetensors"), load_file(run_dir(b) / "adapter.safetensors")
    assert any("q_adapter_" in k for k in wa) and any("lora_" in k for k in wa) and wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
