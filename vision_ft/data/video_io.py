"""Video files and frame folders: PyAV probing, decoding, encoding and frame extraction, and the frame sources
(one image per frame, or a video file sampled at a rate) that clips and conversations read from.

Decoding uses PyAV (the ``video`` extra): FFmpeg-backed, maintained, seeks by timestamp and also encodes
(sample data, tests); see :mod:`vision_ft.data.video` for why not ``torchvision.io``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import DataError
from .labelled_images import pil_to_array


def _av():
    try:
        import av
    except ImportError:  # pragma: no cover - av is in the dev and video extras
        raise DataError("reading video files needs PyAV: pip install 'vision_ft[video]' (package av)") from None
    return av


# --- decoding and encoding -------------------------------------------------------------------
@dataclass(frozen=True)
class VideoInfo:
    """Presentation timestamps of every frame of a video's first video stream."""

    pts: np.ndarray  # (N,) int64, ascending, in stream time_base units
    time_base: Fraction
    start: int
    native_fps: float
    width: int
    height: int

    @property
    def times(self) -> np.ndarray:
        """Frame times in seconds from the first frame."""
        return (self.pts - self.start).astype(np.float64) * float(self.time_base)


def probe_video(path: str | Path) -> VideoInfo:
    """Frame timestamps from the container's packets (no decoding); decodes only if packets lack them."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            pts = [p.pts for p in container.demux(stream) if p.size > 0]
            if not pts or any(p is None for p in pts):
                container.seek(0)
                pts = [f.pts for f in container.decode(stream)]
            if not pts or any(p is None for p in pts):
                raise DataError(f"{path}: video frames carry no timestamps")
            tb = stream.time_base or Fraction(1, 1)
            rate = stream.average_rate or stream.base_rate
            pts_arr = np.unique(np.asarray(pts, dtype=np.int64))
            return VideoInfo(pts=pts_arr, time_base=Fraction(tb), start=int(pts_arr[0]),
                             native_fps=float(rate) if rate else float("nan"),
                             width=stream.codec_context.width, height=stream.codec_context.height)
    except (IndexError, av.error.FFmpegError, OSError) as e:  # no video stream, unreadable file
        raise DataError(f"cannot read video {path}: {type(e).__name__}: {e}") from None


def sample_times(info: VideoInfo, fps: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into ``info.pts``) and times of the frames sampled at ``fps``.

    Sample ``k`` is the decoded frame nearest to ``k / fps`` seconds (ties: the earlier frame);
    ``fps=None`` keeps every frame.
    """
    times = info.times
    if fps is None:
        return np.arange(len(times)), times
    count = int(np.floor(times[-1] * fps + 1e-6)) + 1
    grid = np.arange(count) / fps
    right = np.clip(np.searchsorted(times, grid), 0, len(times) - 1)
    left = np.clip(right - 1, 0, len(times) - 1)
    nearest = np.where(np.abs(times[left] - grid) <= np.abs(times[right] - grid), left, right)
    return nearest.astype(np.int64), grid


def decode_video(path: str | Path, fps: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All frames of a video sampled at ``fps`` (``None``: every frame) → ``(N,H,W,3)`` uint8 RGB, times (s)."""
    frames = VideoFrames(path, fps)
    out: list[np.ndarray] = []
    for start in range(0, len(frames), 256):  # one seek per chunk: decoding forward is the cheap direction
        chunk = frames.read(range(start, min(start + 256, len(frames))))
        out.extend(chunk[k] for k in sorted(chunk))
    return np.stack(out), frames.times


def write_video(path: str | Path, frames: np.ndarray | Sequence[np.ndarray], fps: float, codec: str = "mpeg4",
                bit_rate: int = 2_000_000) -> Path:
    """Encode ``(N,H,W,3)`` uint8 RGB frames with PyAV (``mpeg4``, ``libx264``, ``ffv1`` lossless, …).

    Width and height must be even for the 4:2:0 codecs.
    """
    av = _av()
    frames = [np.ascontiguousarray(f, dtype=np.uint8) for f in frames]
    if not frames:
        raise ValueError("no frames to write")
    height, width = frames[0].shape[:2]
    lossless = codec == "ffv1"
    if not lossless and (height % 2 or width % 2):
        raise ValueError(f"codec {codec} needs even width and height, got {width}x{height}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = width, height
        stream.pix_fmt = "bgr0" if lossless else "yuv420p"
        if not lossless:
            stream.bit_rate = int(bit_rate)
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def extract_frames(video: str | Path, out_dir: str | Path, fps: float = 1.0, ext: str = ".jpg",
                   native_index: bool = True) -> list[Path]:
    """Write the frames of ``video`` sampled at ``fps`` as images into ``out_dir``.

    Files are named by the frame's index in the original video when ``native_index`` (as the
    common Cholec80 preprocessing does: ``0.jpg, 25.jpg, …`` at 1 fps from 25 fps), else
    ``0.jpg, 1.jpg, …``. Extracting once is much faster than decoding clips on the fly for
    long videos.
    """
    frames = VideoFrames(video, fps)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(frames), 64):
        chunk = frames.read(range(start, min(start + 64, len(frames))))
        for k, array in chunk.items():
            name = int(frames.source_index[k]) if native_index else k
            path = out_dir / f"{name}{ext}"
            Image.fromarray(array).save(path, **({"quality": 95} if ext.lower() in (".jpg", ".jpeg") else {}))
            paths.append(path)
    return paths


# --- frame sources -----------------------------------------------------------------------------
class FrameSource:
    """The frames of one video at its sampling rate: ``len(source)`` frames, read by index."""

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def read(self, indices: Sequence[int]) -> dict[int, np.ndarray]:  # pragma: no cover - interface
        """Index → ``H×W×C`` array; raises on an unreadable frame."""
        raise NotImplementedError

    def describe(self, index: int) -> str:  # pragma: no cover - interface
        raise NotImplementedError


class ImageFrames(FrameSource):
    """One image file per sampled frame (frames extracted beforehand, e.g. Cholec80 at 1 fps)."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def read(self, indices: Sequence[int]) -> dict[int, np.ndarray]:
        out = {}
        for i in dict.fromkeys(int(i) for i in indices):
            with Image.open(self.paths[i]) as img:
                out[i] = pil_to_array(img)
        return out


class VideoFrames(FrameSource):
    """A video file sampled at ``fps`` (nearest frame to ``k / fps``), decoded with PyAV.

    Reading a clip opens the file, seeks (by timestamp) to the keyframe before its first frame
    and decodes forward to its last, so random clips cost one seek each.
    """

    def __init__(self, path: str | Path, fps: float | None = 1.0, info: VideoInfo | None = None) -> None:
        self.path = Path(path)
        self.fps = fps
        self.info = info or probe_video(self.path)
        self.source_index, self.times = sample_times(self.info, fps)

    def __len__(self) -> int:
        return len(self.source_index)

    def describe(self, index: int) -> str:
        return f"{self.path} @ {self.times[index]:.2f}s"

    def read(self, indices: Sequence[int]) -> dict[int, np.ndarray]:
        av = _av()
        wanted: dict[int, list[int]] = {}
        for k in dict.fromkeys(int(i) for i in indices):
            wanted.setdefault(int(self.info.pts[self.source_index[k]]), []).append(k)
        out: dict[int, np.ndarray] = {}
        last = max(wanted)
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                container.seek(min(wanted), stream=stream, backward=True, any_frame=False)
                for frame in container.decode(stream):
                    if frame.pts is None:
                        continue
                    if frame.pts in wanted:
                        array = frame.to_ndarray(format="rgb24")
                        for k in wanted[frame.pts]:
                            out[k] = array
                    if frame.pts >= last:
                        break
        except av.error.FFmpegError as e:
            raise DataError(f"cannot decode {self.path}: {type(e).__name__}: {e}") from None
        missing = [k for ks in wanted.values() for k in ks if k not in out]
        if missing:
            raise DataError(f"{self.describe(missing[0])}: frame not found when decoding (damaged file?)")
        return out
