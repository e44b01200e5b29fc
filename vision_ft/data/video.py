"""Videos with a label per frame: decoding, clip sampling, and a datamodule split by video.

A video is a sequence of frames at a fixed sampling rate ``fps`` (1 frame per second is the
convention for surgical phase recognition), either image files already extracted at that
rate (:class:`ImageFrames`) or a video file sampled on the fly (:class:`VideoFrames`), plus
one label per sampled frame (``-1`` = unlabelled: ignored by the loss and the metrics).

Clips: a training or evaluation item is the *causal* clip of ``num_frames`` frames,
``frame_stride`` apart, that **ends** at a frame; its label is the label of that last frame
(:func:`clip_indices`). Online recognition (EndoVis workflow challenges, Cholec80 online
setting) may not look at the future, and a clip labelled by its last frame is exactly what
such a model sees at that moment; a centre-frame label would need ``(T-1)/2·stride`` frames of
future. Before the start of a video the first frame is repeated (padding). Training draws
clips ending at every labelled frame (``train_every`` thins them) in an order that depends on
``(seed, epoch)`` only (:func:`~vision_ft.data.base.train_loader`: the kit's
:class:`~vision_ft.data.base.EpochShuffleSampler`, split across ranks, resumable); evaluation has one
clip per frame, every frame exactly once, so a per-frame prediction exists for the sequence
metrics (:mod:`vision_ft.metrics.temporal`).

Splits are by video, never by frame: neighbouring frames of one video are near duplicates,
so a frame-level split leaks. :func:`check_disjoint` refuses a video in two splits.

Decoding uses PyAV (the ``video`` extra): FFmpeg-backed, maintained, seeks by timestamp and
also encodes (sample data, tests). ``torchvision.io`` video decoding was deprecated in
torchvision 0.22 in favour of TorchCodec and is absent from the torchvision 0.29 build used
here (``torchvision.io`` exports no ``read_video``); TorchCodec is not a dependency.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from ..io import atomic_write_text
from .base import SplitLoaders
from .labelled_images import to_tensor
from .video_io import (  # noqa: F401 - decoding and frame sources, importable from here as before
    FrameSource, ImageFrames, VideoFrames, VideoInfo, _av, decode_video, extract_frames, probe_video,
    sample_times, write_video,
)

log = logging.getLogger("vision_ft")

SPLITS = ("train", "val", "test")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".m4v")


# --- clips -------------------------------------------------------------------------------------
def clip_indices(end: int, num_frames: int, stride: int = 1) -> list[int]:
    """Frame indices of the causal clip ending at ``end``: ``end-(T-1)·stride, …, end-stride, end``.

    Indices before the start of the video are clamped to 0 (the first frame is repeated).
    """
    if num_frames < 1 or stride < 1:
        raise ValueError(f"num_frames and stride must be >= 1, got {num_frames}, {stride}")
    return [max(0, end - (num_frames - 1 - i) * stride) for i in range(num_frames)]


@dataclass
class LabelledVideo:
    """A video's frames and one label per frame (``-1`` = unlabelled)."""

    video_id: str
    frames: FrameSource
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.frames):
            raise DataError(f"video {self.video_id}: {len(self.labels)} labels for {len(self.frames)} frames")


class ClipDataset(Dataset):
    """Clips ``{"video": (T,3,S,S) float32 in [0,1], "label", "video_id", "video_index", "frame_index",
    "frame_indices"}`` (``frame_index``: the clip's last frame, whose label it carries; ``frame_indices``:
    the ``T`` frames it holds).

    ``items`` are ``(position in videos, end frame)`` pairs. ``video_index`` is the video's
    position in ``video_indices`` (defaults to its position in ``videos``), stable across
    processes so per-video metrics can be gathered under DDP.
    """

    def __init__(self, videos: Sequence[LabelledVideo], items: Sequence[tuple[int, int]], num_frames: int,
                 stride: int, image_size: int, flip: bool = False,
                 frame_transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 on_corrupt: Literal["skip", "error"] = "error", video_indices: Sequence[int] | None = None) -> None:
        self.videos, self.items = list(videos), list(items)
        self.num_frames, self.stride, self.image_size = int(num_frames), int(stride), int(image_size)
        self.flip, self.frame_transform, self.on_corrupt = flip, frame_transform, on_corrupt
        self.video_indices = list(video_indices) if video_indices is not None else list(range(len(self.videos)))
        self.substituted: list[str] = []

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, video: LabelledVideo, indices: list[int]) -> dict[int, np.ndarray]:
        if not isinstance(video.frames, ImageFrames):
            return video.frames.read(indices)
        out: dict[int, np.ndarray] = {}
        for i in dict.fromkeys(indices):
            try:
                out.update(video.frames.read([i]))
            except Exception as e:  # noqa: BLE001 - any decode failure
                if self.on_corrupt == "error":
                    raise DataError(f"unreadable frame {video.frames.describe(i)} ({type(e).__name__}: {e}); fix "
                                    "or remove it, or set data.init_args.on_corrupt=skip") from None
                self.substituted.append(video.frames.describe(i))
                log.warning("unreadable frame %s (%s): replaced by the nearest readable frame of its clip "
                            "(data.init_args.on_corrupt=skip)", video.frames.describe(i), type(e).__name__)
        if not out:
            raise DataError(f"no readable frame in the clip {indices} of video {video.video_id}")
        for i in indices:  # substitute unreadable frames by the nearest readable one
            if i not in out:
                out[i] = out[min(out, key=lambda j: (abs(j - i), j))]
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | str]:
        position, end = self.items[i]
        video = self.videos[position]
        indices = clip_indices(end, self.num_frames, self.stride)
        arrays = self._read(video, indices)
        frames = []
        for k in indices:
            array = arrays[k]
            if self.frame_transform is not None:
                array = self.frame_transform(array)
            frames.append(to_tensor(array, self.image_size))
        clip = torch.stack(frames)
        if self.flip and torch.rand(()) < 0.5:  # one flip for the whole clip
            clip = clip.flip(-1)
        return {"video": clip, "label": torch.tensor(int(video.labels[end]), dtype=torch.int64),
                "video_id": video.video_id, "video_index": torch.tensor(self.video_indices[position]),
                "frame_index": torch.tensor(end, dtype=torch.int64),
                "frame_indices": torch.tensor(indices, dtype=torch.int64)}


# --- splits ------------------------------------------------------------------------------------
def natural_key(text: str) -> list:
    """Sort key treating digit runs as numbers: ``video2`` < ``video10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def check_disjoint(splits: dict[str, Sequence[str]]) -> None:
    """Raise :class:`ConfigError` if a video is in more than one split."""
    seen: dict[str, str] = {}
    clashes = []
    for split, ids in splits.items():
        for vid in ids:
            if vid in seen and seen[vid] != split:
                clashes.append(f"{vid} ({seen[vid]} and {split})")
            seen.setdefault(vid, split)
    if clashes:
        raise ConfigError(f"videos in more than one split (frames of one video must never be split): "
                          f"{', '.join(clashes[:5])}; fix data.init_args.train_videos / val_videos / test_videos")


def split_videos(ids: Sequence[str], train: Sequence[str] | None = None, val: Sequence[str] | None = None,
                 test: Sequence[str] | None = None, val_fraction: float = 0.2,
                 test_fraction: float = 0.5) -> dict[str, list[str]]:
    """Train / val / test video ids.

    Given lists are used as they are. The other videos, in natural order, fill the missing
    splits: the last ``round(n·test_fraction)`` go to test, then the last
    ``round(m·val_fraction)`` of the rest to val, and the rest to train (when ``train`` is not
    given; otherwise they are unused). On Cholec80's 80 videos the defaults give the common
    32 / 8 / 40 split (videos 1-32 / 33-40 / 41-80).
    """
    ids = sorted(ids, key=natural_key)
    given = {"train": train, "val": val, "test": test}
    known = set(ids)
    for split, chosen in given.items():
        if chosen is None:
            continue
        if isinstance(chosen, str):
            raise ConfigError(f"data.init_args.{split}_videos must be a list of video ids, got the string {chosen!r}")
        unknown = [v for v in chosen if v not in known]
        if unknown:
            raise ConfigError(f"data.init_args.{split}_videos: unknown video(s) {unknown[:5]}; available: "
                              f"{ids[:10]}{' …' if len(ids) > 10 else ''}")
    check_disjoint({k: v for k, v in given.items() if v is not None})
    taken = {v for chosen in given.values() if chosen for v in chosen}
    pool = [v for v in ids if v not in taken]
    out = {k: list(v) for k, v in given.items() if v is not None}
    if test is None:
        n = int(round(len(pool) * test_fraction))
        out["test"], pool = pool[len(pool) - n:], pool[:len(pool) - n]
    if val is None:
        n = int(round(len(pool) * val_fraction))
        if n == 0 and val_fraction > 0 and len(pool) > 1:
            n = 1
        out["val"], pool = pool[len(pool) - n:], pool[:len(pool) - n]
    if train is None:
        out["train"] = pool
    elif pool:
        log.info("videos in no split (unused): %s", pool)
    return {k: out[k] for k in SPLITS}


# --- datamodule --------------------------------------------------------------------------------
class VideoClipData(SplitLoaders, L.LightningDataModule):
    """Base datamodule for videos with per-frame labels, split by video.

    A format subclass reads its layout in ``__init__`` (so ``num_classes``, ``class_names``
    and ``multilabel=False`` exist before the CLI instantiates the model) and calls
    :meth:`_set_videos`. Frames are decoded lazily, in the dataloaders.

    Args:
        num_frames: frames per clip (T).
        frame_stride: distance between clip frames, in sampled frames.
        fps: sampling rate of the frames (frames per second of video time).
        image_size: frames are resized to ``image_size × image_size``.
        batch_size: clips per batch (per device).
        num_workers: dataloader worker processes.
        augment: random horizontal flip of training clips (the same for all frames of a clip).
        train_every: training clips end at every ``train_every``-th labelled frame.
        train_videos, val_videos, test_videos: video ids per split; missing ones are filled
            from the remaining videos (see :func:`split_videos`).
        val_fraction, test_fraction: shares used to fill missing splits.
        seed: seed of the training order.
        on_corrupt: ``skip`` (unreadable frame files are replaced by the nearest readable frame
            of the clip, each one logged; missing files dropped and listed) or ``error``.
    """

    def __init__(
        self,
        num_frames: int = 4,
        frame_stride: int = 1,
        fps: float = 1.0,
        image_size: int = 224,
        batch_size: int = 8,
        num_workers: int = 0,
        augment: bool = False,
        train_every: int = 1,
        train_videos: list[str] | None = None,
        val_videos: list[str] | None = None,
        test_videos: list[str] | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.5,
        seed: int = 0,
        on_corrupt: Literal["skip", "error"] = "skip",
    ) -> None:
        super().__init__()
        for key, value, low in (("num_frames", num_frames, 1), ("frame_stride", frame_stride, 1),
                                ("image_size", image_size, 1), ("batch_size", batch_size, 1),
                                ("num_workers", num_workers, 0), ("train_every", train_every, 1)):
            if int(value) < low:
                raise ConfigError(f"data.init_args.{key} must be >= {low}, got {value}")
        if not fps > 0:
            raise ConfigError(f"data.init_args.fps must be > 0, got {fps}")
        for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"data.init_args.{key} must be in [0, 1), got {value}")
        if on_corrupt not in ("skip", "error"):
            raise ConfigError(f"data.init_args.on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
        self.num_frames, self.frame_stride, self.fps = int(num_frames), int(frame_stride), float(fps)
        self.image_size, self.batch_size, self.num_workers = int(image_size), int(batch_size), int(num_workers)
        self.augment, self.train_every, self.seed, self.on_corrupt = augment, int(train_every), int(seed), on_corrupt
        self._given_splits = {"train": train_videos, "val": val_videos, "test": test_videos}
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.num_classes: int = 0
        self.class_names: list[str] = []
        self.multilabel: bool = False
        self.videos: dict[str, LabelledVideo] = {}
        self.splits: dict[str, list[str]] = {s: [] for s in SPLITS}
        #: applied to every decoded ``H×W×C`` frame before resizing (set by packs, e.g. margin cropping)
        self.frame_transform: Callable[[np.ndarray], np.ndarray] | None = None
        self.split_file: Path | None = None

    # ---- for subclasses -------------------------------------------------------------
    def _set_videos(self, videos: Sequence[LabelledVideo], class_names: Sequence[str]) -> None:
        """Register the videos and the class names, and resolve the splits."""
        if not videos:
            raise DataError("no videos found")
        if not class_names:
            raise DataError("the data has no classes")
        ids = [v.video_id for v in videos]
        dupes = sorted({v for v in ids if ids.count(v) > 1})
        if dupes:
            raise DataError(f"duplicate video ids {dupes[:5]}")
        for v in videos:
            bad = v.labels[(v.labels < -1) | (v.labels >= len(class_names))]
            if bad.size:
                raise DataError(f"video {v.video_id}: label {int(bad[0])} outside [0, {len(class_names)})")
        self.videos = {v.video_id: v for v in sorted(videos, key=lambda v: natural_key(v.video_id))}
        self.num_classes, self.class_names, self.multilabel = len(class_names), list(class_names), False
        g = self._given_splits
        self.splits = split_videos(list(self.videos), g["train"], g["val"], g["test"],
                                   self.val_fraction, self.test_fraction)
        check_disjoint(self.splits)
        log.info("videos: %s", ", ".join(f"{s} {len(self.splits[s])}" for s in SPLITS))

    # ---- splits and datasets ----------------------------------------------------------
    @property
    def video_ids(self) -> list[str]:
        """All video ids in natural order; ``video_index`` in batches indexes this list."""
        return list(self.videos)

    def _split_ids(self, split: str) -> list[str]:
        if split == "test" and not self.splits["test"]:
            log.warning("no test videos: testing and predicting use the validation videos")
            return self.splits["val"]
        return self.splits[split]

    def dataset(self, split: Literal["train", "val", "test"]) -> ClipDataset:
        """Training clips end at labelled frames; val/test clips end at every frame, once."""
        ids = self._split_ids(split)
        if not ids:
            raise ConfigError(f"the {split} split has no videos; set data.init_args.{split}_videos or the fractions")
        index = {vid: i for i, vid in enumerate(self.videos)}
        videos = [self.videos[v] for v in ids]
        if split == "train":
            items = [(p, int(k)) for p, v in enumerate(videos)
                     for k in np.flatnonzero(v.labels >= 0)[::self.train_every]]
        else:
            items = [(p, k) for p, v in enumerate(videos) for k in range(len(v.frames))]
        return ClipDataset(videos, items, self.num_frames, self.frame_stride, self.image_size,
                           flip=self.augment and split == "train", frame_transform=self.frame_transform,
                           on_corrupt=self.on_corrupt, video_indices=[index[v] for v in ids])

    def clip_spec(self) -> dict:
        """How clips are built, for adapter.json."""
        return {"num_frames": self.num_frames, "frame_stride": self.frame_stride, "fps": self.fps,
                "label": "last frame (causal clip)", "image_size": self.image_size}

    # ---- Lightning hooks --------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        log_dir = getattr(trainer, "log_dir", None) if trainer is not None else None
        if stage in (None, "fit") and log_dir and (trainer.is_global_zero if trainer is not None else True):
            self.split_file = atomic_write_text(Path(log_dir) / "video_splits.json",
                                                json.dumps(self.splits, indent=2) + "\n")
