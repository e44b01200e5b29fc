"""Video core: PyAV decoding, clip sampling, split by video, sequence metrics, the video task."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vision_ft.data.base import EpochShuffleSampler
from vision_ft.data.video import (
    FrameSource, ImageFrames, LabelledVideo, VideoClipData, VideoFrames, check_disjoint, clip_indices,
    decode_video, extract_frames, probe_video, split_videos, write_video,
)
from vision_ft.errors import ConfigError, DataError
from vision_ft.metrics.temporal import (
    PerFramePredictions, aggregate, forgiven_frames, plot_phase_ribbon, segments, sequence_metrics,
)

NAN = float("nan")


# ---- helpers ----------------------------------------------------------------------------------
class ArrayFrames(FrameSource):
    """Frames held in memory: frame k is a solid image of value k (so clips are checkable)."""

    def __init__(self, n: int, size: int = 8) -> None:
        self.frames = [np.full((size, size, 3), k, np.uint8) for k in range(n)]

    def __len__(self) -> int:
        return len(self.frames)

    def describe(self, index: int) -> str:
        return f"mem[{index}]"

    def read(self, indices):
        return {int(i): self.frames[int(i)] for i in indices}


class MemoryVideos(VideoClipData):
    """A datamodule over in-memory videos: ``lengths`` frames each, labels ``k % classes`` (-1 every 5th)."""

    def __init__(self, lengths=(6, 5, 7, 4), classes: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        videos = []
        for v, n in enumerate(lengths):
            labels = np.arange(n) % classes
            labels[4::5] = -1
            videos.append(LabelledVideo(f"video{v + 1}", ArrayFrames(n), labels))
        self._set_videos(videos, [f"c{i}" for i in range(classes)])


def _values(clip: torch.Tensor) -> list[int]:
    """The frame index encoded in each frame of a clip (solid value k → k / 255)."""
    return [int(round(float(f.mean()) * 255)) for f in clip]


# ---- clips ------------------------------------------------------------------------------------
def test_clip_indices_are_causal_with_stride_and_pad_at_the_start():
    assert clip_indices(9, 4, 2) == [3, 5, 7, 9]
    assert clip_indices(5, 4, 2) == [0, 1, 3, 5]  # -1 clamped: the first frame repeats
    assert clip_indices(0, 3, 1) == [0, 0, 0]
    assert clip_indices(7, 1, 3) == [7]
    with pytest.raises(ValueError):
        clip_indices(3, 0, 1)


def test_clip_items_read_the_right_frames_and_label_the_last_one():
    dm = MemoryVideos(num_frames=3, frame_stride=2, image_size=8, test_fraction=0.0, val_fraction=0.0,
                      train_videos=None)
    train = dm.dataset("train")
    item = train[0]
    assert set(item) == {"video", "label", "video_id", "video_index", "frame_index", "frame_indices"}
    assert item["video"].shape == (3, 3, 8, 8) and item["video"].dtype == torch.float32
    for i in range(len(train)):
        item = train[i]
        end = int(item["frame_index"])
        assert _values(item["video"]) == clip_indices(end, 3, 2) == item["frame_indices"].tolist()
        video = dm.videos[item["video_id"]]
        assert int(item["label"]) == video.labels[end] >= 0  # training clips end at labelled frames only
        assert dm.video_ids[int(item["video_index"])] == item["video_id"]
    n_labelled = sum(int((v.labels >= 0).sum()) for v in dm.videos.values())
    assert len(train) == n_labelled


def test_evaluation_windows_cover_every_frame_exactly_once():
    dm = MemoryVideos(num_frames=4, image_size=8, train_videos=["video1"], val_videos=["video2", "video3"],
                      test_videos=["video4"], batch_size=3)
    seen = []
    for batch in dm.val_dataloader():
        seen += list(zip(batch["video_id"], batch["frame_index"].tolist()))
    expected = [(v, k) for v in ("video2", "video3") for k in range(len(dm.videos[v].frames))]
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))
    labels = {(v, k): int(dm.videos[v].labels[k]) for v, k in expected}
    assert -1 in labels.values()  # unlabelled frames are evaluated too (and ignored by the metrics)


def test_train_every_thins_clip_ends():
    dm = MemoryVideos(lengths=(20,), num_frames=2, image_size=8, train_videos=["video1"], val_videos=[],
                      test_videos=[], train_every=3)
    ends = [e for _, e in dm.dataset("train").items]
    labelled = np.flatnonzero(dm.videos["video1"].labels >= 0)
    assert ends == labelled[::3].tolist()


def test_training_order_depends_on_seed_and_epoch_only():
    dm = MemoryVideos(num_frames=2, image_size=8, seed=3, test_fraction=0.0, val_fraction=0.0)
    order = lambda epoch: [list(zip(b["video_id"], b["frame_index"].tolist()))  # noqa: E731
                           for b in _epoch(dm.train_dataloader(), epoch)]
    assert order(0) == order(0) and order(0) != order(1)
    assert isinstance(dm.train_dataloader().sampler, EpochShuffleSampler)


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_augment_flips_whole_clips_only_in_training():
    dm = MemoryVideos(num_frames=2, image_size=8, augment=True)
    assert dm.dataset("train").flip and not dm.dataset("val").flip


def test_unreadable_frames_are_substituted_and_logged_or_fatal(tmp_path, caplog):
    paths = []
    for k in range(4):
        path = tmp_path / f"{k}.png"
        Image.new("RGB", (8, 8), (k * 60, 0, 0)).save(path)
        paths.append(path)
    paths[2].write_bytes(b"not an image")
    video = LabelledVideo("v", ImageFrames(paths), [0, 1, 0, 1])

    class One(VideoClipData):
        def __init__(self, **kw):
            super().__init__(**kw)
            self._set_videos([video], ["a", "b"])

    dm = One(num_frames=2, image_size=8, train_videos=["v"], val_videos=[], test_videos=[])
    with caplog.at_level(logging.WARNING, logger="vision_ft"):
        clip = dm.dataset("train")[3]["video"]  # frames 2 (broken) and 3
    assert str(paths[2]) in caplog.text and dm.on_corrupt == "skip"
    assert torch.equal(clip[0], clip[1])  # the broken frame became its nearest readable neighbour
    strict = One(num_frames=2, image_size=8, train_videos=["v"], val_videos=[], test_videos=[], on_corrupt="error")
    with pytest.raises(DataError, match=r"2\.png.*on_corrupt=skip"):
        strict.dataset("train")[3]


# ---- splits -----------------------------------------------------------------------------------
def test_default_split_is_by_video_and_matches_cholec80_convention():
    ids = [f"video{i:02d}" for i in range(80, 0, -1)]
    splits = split_videos(ids)
    assert splits["train"] == [f"video{i:02d}" for i in range(1, 33)]
    assert splits["val"] == [f"video{i:02d}" for i in range(33, 41)]
    assert splits["test"] == [f"video{i:02d}" for i in range(41, 81)]
    natural = split_videos(["v10", "v9", "v1", "v2"], val_fraction=0.0, test_fraction=0.5)
    assert natural == {"train": ["v1", "v2"], "val": [], "test": ["v9", "v10"]}  # natural order, not string order


def test_given_splits_are_kept_and_the_rest_fills_the_others():
    ids = [f"v{i}" for i in range(1, 11)]
    out = split_videos(ids, test=["v1", "v2"], val_fraction=0.25, test_fraction=0.5)
    assert out["test"] == ["v1", "v2"] and out["val"] == ["v9", "v10"] and out["train"] == [f"v{i}" for i in range(3, 9)]
    out = split_videos(ids, train=["v1"], val=["v2"], test=["v3"])
    assert out == {"train": ["v1"], "val": ["v2"], "test": ["v3"]}  # the other 7 are unused


def test_a_video_in_two_splits_is_refused():
    with pytest.raises(ConfigError, match=r"v2 \(train and test\)"):
        split_videos(["v1", "v2", "v3"], train=["v1", "v2"], test=["v2"])
    with pytest.raises(ConfigError, match="more than one split"):
        check_disjoint({"train": ["a"], "val": ["b"], "test": ["a"]})
    with pytest.raises(ConfigError, match=r"val_videos: unknown video\(s\) \['v9'\]"):
        split_videos(["v1", "v2"], val=["v9"])
    with pytest.raises(ConfigError, match="must be a list"):
        split_videos(["v1", "v2"], test="v1")
    dm = MemoryVideos(num_frames=2, image_size=8, test_fraction=0.25, val_fraction=0.34)
    check_disjoint(dm.splits)  # the datamodule's own splits: disjoint and covering every video
    assert sorted(sum(dm.splits.values(), [])) == sorted(dm.video_ids)


def test_datamodule_exposes_what_the_cli_links_before_setup():
    dm = MemoryVideos(num_frames=2, image_size=8)
    assert (dm.num_classes, dm.class_names, dm.multilabel) == (3, ["c0", "c1", "c2"], False)
    assert dm.clip_spec()["num_frames"] == 2
    with pytest.raises(ConfigError, match="data.init_args.num_frames"):
        MemoryVideos(num_frames=0)
    with pytest.raises(ConfigError, match="data.init_args.fps"):
        MemoryVideos(fps=0)


# ---- PyAV -------------------------------------------------------------------------------------
def _colour_frames(n: int, fps: int, h: int = 16, w: int = 24) -> np.ndarray:
    """Frame i: a solid colour that changes every second, plus a moving bright column."""
    rng = np.random.default_rng(0)
    colours = rng.integers(20, 235, (n // fps + 1, 3))
    frames = np.stack([np.full((h, w, 3), colours[i // fps], np.uint8) for i in range(n)])
    for i in range(n):
        frames[i, :, i % w] = 255
    return frames


def test_lossless_video_round_trip_and_sampling_at_fps(tmp_path):
    frames = _colour_frames(30, fps=5)
    path = write_video(tmp_path / "v.mkv", frames, fps=5, codec="ffv1")
    info = probe_video(path)
    assert len(info.pts) == 30 and math.isclose(info.native_fps, 5.0)
    assert np.allclose(info.times, np.arange(30) / 5)
    at_1fps = VideoFrames(path, fps=1.0)
    assert len(at_1fps) == 6 and at_1fps.source_index.tolist() == [0, 5, 10, 15, 20, 25]
    got = at_1fps.read([4, 1, 4])  # any order, duplicates: one seek + forward decode
    assert sorted(got) == [1, 4] and np.array_equal(got[4], frames[20]) and np.array_equal(got[1], frames[5])
    every, times = decode_video(path)
    assert np.array_equal(every, frames) and np.allclose(times, np.arange(30) / 5)  # lossless: exact
    at_2fps, _ = decode_video(path, fps=2.0)
    # nearest frame to k/2 s; at 0.5 s the frames at 0.4 s and 0.6 s tie: the earlier wins
    assert np.array_equal(at_2fps, frames[[0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27]])


def test_lossy_codec_round_trip_and_frame_extraction(tmp_path):
    frames = _colour_frames(20, fps=4, h=32, w=32)
    path = write_video(tmp_path / "v.mp4", frames, fps=4, codec="mpeg4", bit_rate=4_000_000)
    decoded, _ = decode_video(path, fps=1.0)
    assert decoded.shape == (5, 32, 32, 3)
    assert np.abs(decoded.astype(float) - frames[::4]).mean() < 6  # lossy, but the same pictures
    written = extract_frames(path, tmp_path / "frames", fps=1.0)
    assert [p.name for p in written] == ["0.jpg", "4.jpg", "8.jpg", "12.jpg", "16.jpg"]
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8), fps=1)
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match="broken.mp4"):
        probe_video(tmp_path / "broken.mp4")


# ---- sequence metrics -------------------------------------------------------------------------
TARGET = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
PRED = [0, 0, 1, 1, 1, 1, 2, 2, 2, 0]


def test_strict_metrics_match_hand_computation():
    m = sequence_metrics(TARGET, PRED, num_classes=4)
    assert m["frames"] == 10 and m["accuracy"] == pytest.approx(0.7)
    # class 0: TP 2 (frames 0,1), predicted at 0,1,9, true at 0,1,2 -> union 4
    # class 1: TP 3 (3,4,5), predicted 2-5, true 3-6 -> union 5; class 2: TP 2 (7,8), union 4
    assert np.allclose(m["precision"][:3], [2 / 3, 3 / 4, 2 / 3])
    assert np.allclose(m["recall"][:3], [2 / 3, 3 / 4, 2 / 3])
    assert np.allclose(m["jaccard"][:3], [2 / 4, 3 / 5, 2 / 4])
    assert np.allclose(m["f1"][:3], [2 / 3, 3 / 4, 2 / 3])
    assert all(np.isnan(m[k][3]) for k in ("precision", "recall", "jaccard", "f1"))  # class 3 absent: undefined


def test_relaxed_boundary_forgives_only_adjacent_phases_near_transitions():
    # tolerance 1: frame 2 (end of phase 0, predicted 1 = next phase) and frame 6 (end of phase 1,
    # predicted 2) are forgiven; frame 9 (end of phase 2, predicted 0) is not
    assert forgiven_frames(np.array(TARGET), np.array(PRED), 3, 1).nonzero()[0].tolist() == [2, 6]
    m = sequence_metrics(TARGET, PRED, num_classes=3, tolerance=1)
    assert m["accuracy"] == pytest.approx(0.9)
    assert np.allclose(m["jaccard"], [3 / 4, 5 / 5, 3 / 4])
    assert np.allclose(m["precision"], [1.0, 1.0, 1.0])  # class 1: 5 TP / 4 predicted, clipped to 1
    assert np.allclose(m["recall"], [1.0, 1.0, 1.0]) and np.allclose(m["f1"], [1.0, 1.0, 1.0])
    # late transition: the start of a phase predicted as the previous one
    late = sequence_metrics([0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], 2, tolerance=2)
    assert late["accuracy"] == 1.0
    assert sequence_metrics([0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], 2, tolerance=1)["accuracy"] == pytest.approx(5 / 6)


def test_cholec80_rule_also_forgives_two_phase_jumps_at_the_end():
    target = np.array([3] * 4 + [4] * 4)
    pred = np.array([3, 3, 3, 5] + [4] * 4)  # dissection ending predicted as cleaning (+2)
    assert not forgiven_frames(target, pred, 7, 2, rule="general").any()
    assert forgiven_frames(target, pred, 7, 2, rule="cholec80").tolist() == [False] * 3 + [True] + [False] * 4
    with pytest.raises(ValueError, match="7 Cholec80 phases"):
        forgiven_frames(target, pred, 5, 2, rule="cholec80")


def test_undefined_precision_and_ignored_frames():
    never = sequence_metrics([0, 0, 1, 1], [0, 0, 0, 0], 2)
    assert np.isnan(never["precision"][1]) and never["recall"][1] == 0 and never["f1"][1] == 0
    assert sequence_metrics([0, 0, 1, 1], [0, 0, 0, 0], 2, zero_division=0.0)["precision"][1] == 0
    ignored = sequence_metrics([0, -1, -1, 1], [0, 1, 1, 1], 2)
    assert ignored["frames"] == 2 and ignored["accuracy"] == 1.0
    with pytest.raises(ValueError, match="equal length"):
        sequence_metrics([0, 1], [0], 2)


def test_aggregate_averages_per_video_then_per_phase():
    a = sequence_metrics(TARGET, PRED, 3)  # 10 frames, accuracy 0.7
    b = sequence_metrics([1] * 30, [1] * 30, 3)  # 30 frames, accuracy 1; phases 0 and 2 absent
    agg = aggregate([a, b])
    assert agg["video_acc"] == pytest.approx(0.85) and agg["frame_acc"] == pytest.approx(37 / 40)
    assert agg["video_acc_std"] == pytest.approx(0.15)
    assert np.allclose(agg["jaccard_per_class"], [0.5, (0.6 + 1.0) / 2, 0.5])  # absent phases skipped
    assert agg["jaccard"] == pytest.approx((0.5 + 0.8 + 0.5) / 3)


def test_segments_and_per_frame_collector_dedupes_padding():
    assert segments(np.array([0, 1, 1, 0, 1])) == [(1, 3), (4, 5)]
    c = PerFramePredictions()
    c.update(torch.tensor([1, 1, 0]), torch.tensor([2, 0, 0]), torch.tensor([5, 4, 3]), torch.tensor([5, 4, 3]))
    c.update(torch.tensor([1, 1]), torch.tensor([1, 2]), torch.tensor([6, 5]), torch.tensor([6, 5]))  # (1, 2) again
    out = c.compute()
    assert sorted(out) == [0, 1]
    frames, pred, target = out[1]
    assert frames.tolist() == [0, 1, 2] and pred.tolist() == [4, 6, 5] and target.tolist() == [4, 6, 5]


def test_ribbon_plot_is_written(tmp_path):
    path = plot_phase_ribbon([0, 0, 1, -1, 2], [0, 1, 1, 1, 2], ["a", "b", "c"], tmp_path / "r.png", fps=1.0,
                             title="v")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 200


# ---- the task ---------------------------------------------------------------------------------
def _task(method="ssf", temporal="mean", classes=5):
    from vision_ft.backbones import TimmViT
    from vision_ft.tasks.video import VideoPhaseTask

    return VideoPhaseTask(TimmViT("vit_test_tiny"), method=method, num_classes=classes, temporal=temporal,
                          clip={"num_frames": 3, "frame_stride": 1, "fps": 1.0})


@pytest.mark.parametrize("temporal", ["mean", "gru"])
def test_task_forward_shapes_and_heads(temporal):
    task = _task(temporal=temporal)
    clips = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = task.forward_outputs(clips)
    assert out["logits"].shape == (2, 5) and out["frame_features"].shape == (2, 3, 32)
    assert out["inputs"].shape == (6, 3, 32, 32)
    heads = task.head_modules()
    assert ("temporal" in heads) == (temporal == "gru")
    saved = task.adapter_tensors()
    assert any(k.startswith("head.") for k in saved) and (any(k.startswith("temporal.") for k in saved)
                                                          == (temporal == "gru"))
    if temporal == "mean":  # mean pooling is order-blind
        assert torch.allclose(task(clips), task(clips.flip(1)), atol=1e-5)


def test_shared_frames_of_overlapping_windows_are_encoded_once_with_the_same_result():
    task = _task().eval()
    frames = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ends = torch.arange(6)
    index = torch.stack([torch.tensor(clip_indices(int(e), 3, 1)) for e in ends])
    clips = frames[index]
    calls = []
    handle = task.backbone.model.patch_embed.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        plain = task.forward_outputs(clips)["logits"]
        shared = task.forward_outputs(clips, frame_keys=index)["logits"]
    handle.remove()
    assert calls == [18, 6] and torch.allclose(plain, shared, atol=1e-5)
    assert torch.equal(task.predict_frames(frames, batch_size=4), plain.argmax(-1))


@pytest.mark.parametrize("method,prefix", [("ssf", "ssf_"), ("lora", "lora_")])
def test_method_on_the_frame_encoder_trains_only_its_parameters_and_the_heads(method, prefix):
    task = _task(method=method, temporal="gru")
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all(prefix in n or n.startswith(("head.", "temporal.")) for n in trainable)
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=1.0)
    clips = torch.rand(4, 3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    task.loss(task(clips), torch.tensor([0, 1, 2, -1])).backward()  # -1: unlabelled, ignored
    opt.step()
    changed = {n for n, p in task.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any(prefix in n for n in changed) and any(n.startswith("temporal.") for n in changed)


def test_task_refuses_image_only_methods_and_multilabel():
    from vision_ft.backbones import TimmViT
    from vision_ft.tasks.video import VideoPhaseTask

    for method in ("spt_lora", "dr_tune"):
        with pytest.raises(ConfigError, match="needs image batches"):
            VideoPhaseTask(TimmViT("vit_test_tiny"), method=method, num_classes=3)
    with pytest.raises(ConfigError, match="multilabel"):
        VideoPhaseTask(TimmViT("vit_test_tiny"), method="linear", num_classes=3, multilabel=True)
    with pytest.raises(ConfigError, match="temporal"):
        VideoPhaseTask(TimmViT("vit_test_tiny"), method="linear", num_classes=3, temporal="lstm")
