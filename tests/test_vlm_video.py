"""Video conversations: frame choice, lazy decoding, each family's processor rules, masks, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision_ft.backbones import VisionLanguageModel
from vision_ft.data.chat import IGNORE
from vision_ft.data.conversations import collate_vl, encode, parse_record, read_records
from vision_ft.data.vl_video import VideoSampling, frame_count, sample_video
from vision_ft.errors import ConfigError, DataError

pytest.importorskip("av")

VIDEO_FAMILIES = ["qwen2_vl_test_tiny", "qwen2_5_vl_test_tiny", "qwen3_vl_test_tiny", "llava_onevision_test_tiny"]
CLIP = {"video": "clip.mp4", "conversations": [
    {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A tool moves."}]}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    from vision_ft.data.video import write_video

    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    # 30 frames at 10 fps (3 s); each frame's mean brightness encodes its index, to check which were taken
    frames = np.stack([np.full((48, 64, 3), 8 * i, dtype=np.uint8) for i in range(30)])
    write_video(root / "clip.mp4", frames, fps=10, codec="ffv1")
    write_video(root / "one.mp4", frames[:1], fps=10, codec="ffv1")
    (root / "broken.mp4").write_bytes(b"not a video at all" * 10)
    folder = root / "frames"
    folder.mkdir()
    for i in range(7):
        Image.fromarray(np.full((40, 56, 3), 30 * i, dtype=np.uint8)).save(folder / f"frame_{i}.png")
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(root / "a.png")
    return root


@pytest.fixture(scope="module")
def models() -> dict[str, VisionLanguageModel]:
    return {name: VisionLanguageModel(name) for name in VIDEO_FAMILIES}


def test_frame_count_follows_fps_bounds_and_the_temporal_patch():
    s = VideoSampling(fps=2.0, min_frames=4, max_frames=32)
    assert frame_count(300, 30.0, s, 2, "x") == 20  # 10 s at 2 fps
    assert frame_count(300, 30.0, VideoSampling(fps=1.0, min_frames=4, max_frames=32), 2, "x") == 10
    assert frame_count(30, 30.0, s, 2, "x") == 4  # 1 s -> 2 frames, raised to min_frames
    assert frame_count(3000, 30.0, s, 2, "x") == 32  # capped
    assert frame_count(7, 1.0, VideoSampling(fps=1.0, min_frames=1, max_frames=32), 2, "x") == 6  # patch of 2
    assert frame_count(7, 1.0, VideoSampling(fps=1.0, min_frames=1, max_frames=32), 1, "x") == 7
    assert frame_count(300, 30.0, VideoSampling(frames=9, min_frames=1), 2, "x") == 8  # count wins, rounded
    with pytest.raises(DataError, match="fewer than the model's temporal patch"):
        frame_count(1, 10.0, s, 2, "f.jsonl:3")
    with pytest.raises(ConfigError, match="video_min_frames"):
        VideoSampling(min_frames=8, max_frames=4)


def test_sampling_takes_evenly_spaced_frames_and_decodes_only_those(media, monkeypatch):
    from vision_ft.data import video as video_mod

    asked = []
    real = video_mod.VideoFrames.read

    def spy(self, indices):
        asked.append(list(indices))
        return real(self, indices)

    monkeypatch.setattr(video_mod.VideoFrames, "read", spy)
    v = sample_video(media / "clip.mp4", VideoSampling(fps=2.0, min_frames=2, max_frames=32), 2, "f:1")
    assert v.total_num_frames == 30 and v.fps == pytest.approx(10.0)
    assert v.frames_indices == [0, 6, 12, 17, 23, 29]  # 3 s at 2 fps = 6 frames over the whole clip
    assert asked == [v.frames_indices]  # only the chosen frames were asked of the decoder
    assert [int(round(f.mean() / 8)) for f in v.frames] == v.frames_indices  # and they are those frames
    assert v.metadata().sampled_fps == pytest.approx(2.0)
    folder = sample_video(media / "frames", VideoSampling(fps=1.0, min_frames=1, folder_fps=1.0), 2, "f:2")
    assert folder.frames.shape == (6, 40, 56, 3) and folder.frames_indices == [0, 1, 2, 4, 5, 6]


@pytest.mark.parametrize("name", VIDEO_FAMILIES)
def test_video_conversation_masks_tokens_and_forward_for_every_family(models, media, name):
    vlm = models[name]
    conv = parse_record(CLIP, "f.jsonl:1", media)
    conv.sampling = VideoSampling(fps=2.0, min_frames=2, max_frames=8)
    sample = encode(vlm.processor, conv)
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    learned = vlm.tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert learned.strip() == "A tool moves.<|im_end|>"
    video_id = vlm.tokenizer.convert_tokens_to_ids(vlm.processor.video_token)
    assert video_id in ids and not (sample["labels"] == video_id).any()
    if name.startswith("qwen"):
        t = int(sample["video_grid_thw"][0, 0])
        assert t == 6 // 2  # 6 frames chosen, two per temporal patch
    if name == "qwen2_5_vl_test_tiny":  # seconds per temporal patch from the sampled rate (2 fps)
        assert float(sample["second_per_grid_ts"][0]) == pytest.approx(2 / 2.0)
    if name == "qwen3_vl_test_tiny":  # per-frame-pair timestamps in the text, from the chosen frames' times
        text = vlm.tokenizer.decode(ids)
        assert "<0.3 seconds>" in text and "<2.6 seconds>" in text
    batch = collate_vl([sample], vlm.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = vlm(**{k: v for k, v in batch.items() if k != "labels"})
    assert logits.shape[:2] == batch["input_ids"].shape


def test_mixed_batch_of_video_image_and_text_conversations(models, media):
    vlm = models["qwen2_5_vl_test_tiny"]
    image = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                  {"from": "gpt", "value": "x"}]}
    text = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "y"}]}
    both = {"image": "a.png", "video": "frames", "conversations": [
        {"from": "human", "value": "<image>\nand <video>\nsame?"}, {"from": "gpt", "value": "no"}]}
    samples = [encode(vlm.processor, parse_record(r, f"f:{i}", media)) for i, r in enumerate([CLIP, image, text, both])]
    batch = collate_vl(samples, vlm.tokenizer.pad_token_id)
    assert batch["video_grid_thw"].shape[0] == 2 and batch["image_grid_thw"].shape[0] == 2
    with torch.no_grad():
        full = vlm(**{k: v for k, v in batch.items() if k != "labels"})
        alone = collate_vl([samples[3]], vlm.tokenizer.pad_token_id)
        one = vlm(**{k: v for k, v in alone.items() if k != "labels"})
    n = one.shape[1]
    assert torch.allclose(full[3, :n], one[0], atol=1e-4)  # the batch did not mix up whose frames are whose


def test_bad_video_input_names_file_and_line(models, media, tmp_path):
    vlm = models["qwen2_vl_test_tiny"]
    with pytest.raises(DataError, match=r"f\.jsonl:4.*broken\.mp4"):
        encode(vlm.processor, parse_record({**CLIP, "video": "broken.mp4"}, "f.jsonl:4", media))
    with pytest.raises(DataError, match=r"f\.jsonl:5.*fewer than the model's temporal patch"):
        encode(vlm.processor, parse_record({**CLIP, "video": "one.mp4"}, "f.jsonl:5", media))
    with pytest.raises(DataError, match=r"f\.jsonl:6: 0 <video> tag\(s\) but 1 video"):
        parse_record({"video": "clip.mp4", "conversations": [{"from": "human", "value": "Hm?"},
                                                               {"from": "gpt", "value": "x"}]}, "f.jsonl:6", media)
    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps(CLIP) + "\n" + json.dumps({**CLIP, "video": "missing.mp4"}) + "\n")
    with pytest.raises(DataError, match=r"v\.jsonl:2: video .*missing\.mp4 not found"):
        read_records(path, media)
    convs, skipped = read_records(path, media, on_bad="skip")
    assert len(convs) == 1 and len(skipped) == 1
    llava = VisionLanguageModel("llava_test_tiny")
    with pytest.raises(ConfigError, match="takes no video"):
        encode(llava.processor, parse_record(CLIP, "f:1", media))


def test_onevision_videos_of_different_lengths_ask_for_a_fixed_frame_count(models, media):
    vlm = models["llava_onevision_test_tiny"]
    a = parse_record(CLIP, "f:1", media)
    b = parse_record({**CLIP, "video": "frames"}, "f:2", media)
    a.sampling = b.sampling = VideoSampling(fps=2.0, min_frames=2)
    samples = [encode(vlm.processor, a), encode(vlm.processor, b)]
    with pytest.raises(DataError, match="video_frames"):
        collate_vl(samples, vlm.tokenizer.pad_token_id)
    a.sampling = b.sampling = VideoSampling(frames=4)
    batch = collate_vl([encode(vlm.processor, a), encode(vlm.processor, b)], vlm.tokenizer.pad_token_id)
    assert batch["pixel_values_videos"].shape[:2] == (2, 4)


def test_video_conversations_train_and_answer_through_the_task(media, tmp_path):
    import lightning as L

    from vision_ft.data import ConversationData
    from vision_ft.tasks import VisionLanguageSFTTask

    records = [{**CLIP, "video": v} for v in ("clip.mp4", "frames")] * 3
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    L.seed_everything(0)
    task = VisionLanguageSFTTask(VisionLanguageModel("qwen2_5_vl_test_tiny"), method="lora", lr=5e-3,
                                 max_new_tokens=4)
    data = ConversationData(train=str(path), image_root=str(media), batch_size=2, val_fraction=0.0,
                            video_fps=1.0, video_min_frames=2, video_max_frames=4)
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, datamodule=data)
    task.eval()
    convs = data.splits["train"][:2]
    answers = task.answers(convs)
    assert len(answers) == 2
    inputs, reference = task.prompt_inputs(convs[0])
    assert reference == "A tool moves." and "pixel_values_videos" in inputs
