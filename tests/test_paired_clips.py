"""Paired clips for video diffusion: the finetrainers / TIC-FT layout (videos.txt + prompts.txt) and JSONL
{condition, target, prompt}, frame-count rules, image-to-video conditions and bad input (skip or error)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from vision_ft.data.paired_clips import PairedClipData
from vision_ft.errors import ConfigError, DataError


def _write(path, frames=9, size=16, seed=0):
    """A lossless video whose frame k is filled with the value 20 k (+ a per-video offset)."""
    from vision_ft.data.video import write_video

    video = np.zeros((frames, size, size, 3), np.uint8)
    for k in range(frames):
        video[k] = (20 * k + seed) % 256
    write_video(path, video, fps=4, codec="ffv1")
    return path


def _lists(root, n=3, frames=9, prompt_file="prompts.txt"):
    (root / "videos").mkdir(parents=True)
    for i in range(n):
        _write(root / "videos" / f"{i}.mp4", frames, seed=i)
    (root / "videos.txt").write_text("".join(f"videos/{i}.mp4\n" for i in range(n)))
    (root / prompt_file).write_text("".join(f"clip {i}\n" for i in range(n)))
    return root


def _dm(root, **kw):
    args = dict(condition_frames=5, target_frames=4, height=16, width=16, batch_size=2, val_count=1)
    return PairedClipData(str(root), **{**args, **kw})


def _level(frames):  # the fill value of each frame, back in 0-255
    return (frames.mean(dim=(1, 2, 3)) * 255).round().tolist()


def test_videos_txt_layout_splits_each_video_into_condition_then_target(tmp_path):
    dm = _dm(_lists(tmp_path / "d", prompt_file="prompt.txt"))  # TIC-FT's file name is accepted too
    dm.setup()
    assert [len(dm._splits[s]) for s in ("train", "val")] == [2, 1]
    item = dm.dataset("train")[1]
    assert item["condition"].shape == (5, 3, 16, 16) and item["target"].shape == (4, 3, 16, 16)
    assert _level(item["condition"]) == [1, 21, 41, 61, 81] and _level(item["target"]) == [101, 121, 141, 161]
    assert item["prompt"] == "clip 1"
    batch = next(iter(dm.train_dataloader()))
    assert batch["condition"].shape == (2, 5, 3, 16, 16) and len(batch["prompt"]) == 2
    image = _dm(tmp_path / "d", condition="image").dataset("train")[0]  # image-to-video from a plain video
    assert _level(image["condition"]) == [0] * 5 and _level(image["target"]) == [20, 40, 60, 80]


def test_jsonl_pairs_with_an_image_condition_repeat_it(tmp_path):
    from PIL import Image

    root = tmp_path / "j"
    root.mkdir()
    _write(root / "target.mp4", 4, seed=3)
    _write(root / "cond.mp4", 5, seed=7)
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(root / "first.png")
    rows = [{"condition": "first.png", "target": "target.mp4", "prompt": "from an image"},
            {"condition": "cond.mp4", "target": "target.mp4", "prompt": "from a clip"}]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = _dm(root).dataset("train")  # one pair trains, the last is validation
    assert _level(ds[0]["condition"]) == [200] * 5 and _level(ds[0]["target"]) == [3, 23, 43, 63]
    val = _dm(root).dataset("val")[0]
    assert _level(val["condition"]) == [7, 27, 47, 67, 87] and val["prompt"] == "from a clip"


@pytest.mark.parametrize("kw,phrase", [
    ({"condition_frames": 12}, r"condition_frames=12: condition frames must be 1 \+ 4k"),
    ({"target_frames": 6}, "target_frames=6: target frames must be a multiple of 4"),
    ({"condition": "text"}, "condition must be"), ({"fps": 0}, "fps must be")])
def test_frame_counts_and_options_are_checked(tmp_path, kw, phrase):
    with pytest.raises(ConfigError, match=phrase):
        _dm(tmp_path, **kw)


def test_bad_pairs_are_skipped_with_their_paths_or_stop_the_run(tmp_path, caplog):
    root = _lists(tmp_path / "d", n=4)
    _write(root / "videos" / "1.mp4", frames=6)  # 6 < 5 + 4 frames
    (root / "videos" / "2.mp4").write_bytes(b"not a video")
    (root / "videos.txt").write_text((root / "videos.txt").read_text() + "videos/missing.mp4\n")
    (root / "prompts.txt").write_text((root / "prompts.txt").read_text() + "gone\n")
    with caplog.at_level(logging.WARNING, logger="vision_ft"):
        dm = _dm(root)
        dm.setup()
    assert len(dm.skipped) == 3 and "skipped 3 bad pair(s)" in caplog.text
    assert any("1.mp4: 6 frames, needs 9" in s for s in dm.skipped) and any("missing.mp4" in s for s in dm.skipped)
    assert [p.prompt for p in dm._splits["train"] + dm._splits["val"]] == ["clip 0", "clip 3"]
    with pytest.raises(DataError, match="on_corrupt=skip"):
        _dm(root, on_corrupt="error").setup()


def test_prompt_count_must_match_and_layouts_are_named(tmp_path):
    root = _lists(tmp_path / "d")
    (root / "prompts.txt").write_text("only one\n")
    with pytest.raises(DataError, match="lists 3 videos but .* has 1 prompts"):
        _dm(root).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither videos.txt"):
        _dm(tmp_path / "empty").setup()
    with pytest.raises(DataError, match="cannot hold out 1 validation pair"):
        _dm(_lists(tmp_path / "one", n=1)).setup()


def test_batches_feed_the_video_diffusion_task(tmp_path):
    """A real batch from disk through the task's joint clip: 5 + 4 frames -> 1 + 1 + 1 latents."""
    from vision_ft.backbones import WanVideo
    from vision_ft.tasks import VideoDiffusionTask

    dm = _dm(_lists(tmp_path / "d"), height=32, width=32)
    task = VideoDiffusionTask(WanVideo("wan_test_tiny", max_sequence_length=8),
                              method={"class_path": "vision_ft.methods.TICFT", "init_args": {"buffers": 1}})
    batch = next(iter(dm.val_dataloader()))
    frames, context = task.clip(batch)
    assert frames.shape[1] == 9 and context == 2
    plan = task.plan(context, task.backbone.latent_frames(frames.shape[1]))
    assert (plan.condition, plan.buffers, plan.target) == (1, 1, 1)
    with torch.no_grad():
        assert torch.isfinite(task.fixed_loss(batch, 0))
