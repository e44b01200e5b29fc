"""Video input for vision-language conversations: which frames to take, read lazily with PyAV.

A conversation's ``video`` is a video file or a folder of frame images (sorted by natural order, taken
as ``folder_fps`` frames per second). :func:`sample_video` picks frames evenly over the whole video:

- how many: ``frames`` when set, else ``fps`` x duration (Qwen3-VL's own default is 2 frames per second),
  then clamped to ``[min_frames, max_frames]`` and to the frames the video has, then rounded down to a
  multiple of the model's temporal patch (2 for Qwen-VL, whose vision tower folds two frames into one
  patch; 1 for LLaVA-OneVision); fewer frames than one temporal patch is an error;
- which: ``round(linspace(0, N - 1, n))`` of the N decoded frames, so the first and last frames are in.

Only the chosen frames are kept: a file is decoded forward from the keyframe before the first chosen frame
to the last chosen one (:class:`~vision_ft.data.video_io.VideoFrames`), so a long video never sits in memory.
The frames go to the processor with ``do_sample_frames=False`` and the video's metadata (native frame rate,
chosen indices), from which the processor derives what each family needs: Qwen2.5-VL's seconds per temporal
patch, Qwen3-VL's per-frame timestamps; each processor then resizes by its own pixel rules (Qwen3-VL's budget
covers the whole clip).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class VideoSampling:
    """How frames are taken from each video (see the module doc); ``data.init_args.video_*`` keys."""

    fps: float | None = 2.0
    frames: int | None = None
    min_frames: int = 4
    max_frames: int = 32
    folder_fps: float = 1.0

    def __post_init__(self) -> None:
        if self.frames is None and (self.fps is None or self.fps <= 0):
            raise ConfigError("video sampling needs data.init_args.video_fps > 0 or data.init_args.video_frames")
        if self.frames is not None and self.frames < 1:
            raise ConfigError(f"data.init_args.video_frames={self.frames}: at least 1")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ConfigError(f"data.init_args.video_min_frames={self.min_frames} / video_max_frames="
                              f"{self.max_frames}: need 1 <= min <= max")
        if self.folder_fps <= 0:
            raise ConfigError(f"data.init_args.video_folder_fps={self.folder_fps}: must be > 0")


@dataclass
class SampledVideo:
    """The chosen frames ``(T, H, W, 3)`` uint8 RGB and what the processor needs to know about them."""

    frames: np.ndarray
    total_num_frames: int
    fps: float
    frames_indices: list[int]

    @property
    def duration(self) -> float:
        return self.total_num_frames / self.fps

    def metadata(self) -> Any:
        from transformers.video_utils import VideoMetadata

        t, h, w = self.frames.shape[:3]
        return VideoMetadata(total_num_frames=self.total_num_frames, fps=self.fps, width=w, height=h,
                             duration=self.duration, frames_indices=list(self.frames_indices))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("frames")
        return d


def _frame_files(folder: Path) -> list[Path]:
    from .video import natural_key

    return sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS),
                  key=lambda p: natural_key(p.name))


def frame_count(total: int, fps: float, sampling: VideoSampling, temporal_patch: int, where: str) -> int:
    """How many frames to take from a video of ``total`` frames at ``fps`` (see the module doc)."""
    if total < 1:
        raise DataError(f"{where}: the video has no frames")
    want = sampling.frames if sampling.frames is not None else int(round(total / fps * float(sampling.fps or 0)))
    want = min(max(want, sampling.min_frames), sampling.max_frames, total)
    want -= want % temporal_patch
    if want < temporal_patch:
        raise DataError(f"{where}: the video has {total} frame(s), fewer than the model's temporal patch "
                        f"({temporal_patch} frames)")
    return want


def sample_video(path: Path, sampling: VideoSampling, temporal_patch: int, where: str) -> SampledVideo:
    """The frames of ``path`` chosen by ``sampling`` (see the module doc); errors name ``where`` and the file."""
    from .video import ImageFrames, VideoFrames

    if path.is_dir():
        files = _frame_files(path)
        if not files:
            raise DataError(f"{where}: video folder {path} holds no frame images ({', '.join(FRAME_EXTENSIONS)})")
        source: Any = ImageFrames(files)
        total, fps = len(files), float(sampling.folder_fps)
    elif path.is_file():
        try:
            source = VideoFrames(path, fps=None)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        total = len(source)
        native = source.info.native_fps
        if not np.isfinite(native) or native <= 0:
            span = float(source.times[-1]) if total > 1 else 0.0
            native = (total - 1) / span if span > 0 else 1.0
        fps = float(native)
    else:
        raise DataError(f"{where}: video {path} not found")
    n = frame_count(total, fps, sampling, temporal_patch, f"{where}: {path}")
    indices = np.round(np.linspace(0, total - 1, n)).astype(int).tolist()
    try:
        read = source.read(indices)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    except OSError as e:  # a frame image that cannot be read
        raise DataError(f"{where}: cannot read a frame of {path} ({type(e).__name__}: {e})") from None
    frames = [read[i] for i in indices]
    if len({f.shape for f in frames}) != 1:
        raise DataError(f"{where}: the frames of {path} differ in size")
    return SampledVideo(np.stack(frames), total, fps, indices)


def temporal_patch_of(processor: Any) -> int:
    """Frames per temporal patch of the processor's video side (1 where frames are encoded one by one)."""
    vp = getattr(processor, "video_processor", None)
    if vp is None or getattr(processor, "video_token", None) is None:
        raise ConfigError(f"{type(processor).__name__} takes no video: use a Qwen-VL or LLaVA-OneVision model for "
                          "conversations with videos")
    return int(getattr(vp, "temporal_patch_size", 1) or 1)
