"""Paired clips (condition -> target + prompt) for video diffusion fine-tuning, in the layouts people already have.

A split folder holds either

- ``videos.txt`` + ``prompts.txt`` (``prompt.txt`` also read) + the videos: one video path per line
  (relative to the folder, e.g. ``videos/00001.mp4``) and the prompt on the same line of the prompt file,
  the layout the finetrainers and public TIC-FT scripts read. Each video holds the condition frames followed
  by the target frames (TIC-FT's image-to-video data: 13 condition frames, one image repeated, then 36);
- or ``pairs.jsonl``: one JSON object per line, ``{"condition": <video or image>, "target": <video>,
  "prompt": <text>}``, paths relative to the folder; an image condition is repeated (image-to-video).

``condition: image`` turns a plain video into an image-to-video pair: its first frame, repeated, is the
condition and the frames after it are the target. ``root`` is one split folder (the validation pairs are
then its last ``val_count`` entries) or holds ``train/`` and optionally ``val/`` and ``test/``.

Frame counts: ``condition_frames`` must be ``1 + 4k`` and ``target_frames`` a multiple of 4 (the video VAE's
rule for the joint clip, ``4k + 1`` frames); a video with fewer frames than needed is a bad sample. Videos are
decoded with PyAV (:class:`~vision_ft.data.video.VideoFrames`) at ``fps`` (``null``: every frame), resized
to ``height x width``. Batches: ``{"condition": float32 (B, Fc, 3, H, W), "target": float32 (B, Ft, 3, H,
W)`` in [0, 1], ``"prompt": list[str]}``.

Bad input (``on_corrupt``): a listed file that is missing or unreadable, a video too short, a JSONL line that
is not JSON or lacks a key: skipped with a count and the paths in the log (``skip``), or an error naming the
file (``error``). A ``videos.txt`` whose line count differs from its prompt file's is always an error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .base import SplitLoaders
from .captioned import IMAGE_SUFFIXES
from .labelled_images import pil_to_array

log = logging.getLogger("vision_ft")

VIDEOS, PROMPTS, PAIRS = "videos.txt", "prompts.txt", "pairs.jsonl"
_KEY = "data.init_args"


@dataclass
class ClipPair:
    """Where one pair's condition and target frames come from."""

    condition: Path
    target: Path
    prompt: str


def read_split(folder: Path) -> tuple[list[ClipPair], list[str]]:
    """Pairs listed in ``folder`` (``pairs.jsonl`` or ``videos.txt`` + prompts) and the problems found."""
    if (folder / PAIRS).is_file():
        return _read_jsonl(folder)
    if (folder / VIDEOS).is_file():
        return _read_lists(folder)
    raise DataError(f"{folder} has neither {VIDEOS} (+ {PROMPTS}) nor {PAIRS} ({_KEY}.root)")


def _read_lists(folder: Path) -> tuple[list[ClipPair], list[str]]:
    prompt_file = next((folder / n for n in (PROMPTS, "prompt.txt") if (folder / n).is_file()), None)
    if prompt_file is None:
        raise DataError(f"{folder / VIDEOS} has no prompt file beside it ({PROMPTS} or prompt.txt)")
    videos = [line.strip() for line in (folder / VIDEOS).read_text(encoding="utf-8").splitlines()]
    prompts = [line.strip() for line in prompt_file.read_text(encoding="utf-8").splitlines()]
    while videos and not videos[-1]:
        videos.pop()
    while prompts and not prompts[-1]:
        prompts.pop()
    if len(videos) != len(prompts):
        raise DataError(f"{folder / VIDEOS} lists {len(videos)} videos but {prompt_file} has {len(prompts)} prompts: "
                        "one prompt per video, on the same line")
    pairs, problems = [], []
    for i, (video, prompt) in enumerate(zip(videos, prompts), 1):
        path = folder / video
        if not video or not path.is_file():
            problems.append(f"{folder / VIDEOS}:{i}: video {video!r} not found")
        elif not prompt:
            problems.append(f"{prompt_file}:{i}: empty prompt")
        else:
            pairs.append(ClipPair(path, path, prompt))
    return pairs, problems


def _read_jsonl(folder: Path) -> tuple[list[ClipPair], list[str]]:
    pairs, problems = [], []
    for i, line in enumerate((folder / PAIRS).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{folder / PAIRS}:{i}"
        try:
            row = json.loads(line)
            cond, target, prompt = folder / row["condition"], folder / row["target"], str(row["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            problems.append(f"{where}: not a JSON object with condition, target and prompt ({type(e).__name__})")
            continue
        missing = [p for p in (cond, target) if not p.is_file()]
        if missing:
            problems.append(f"{where}: {missing[0]} not found")
        elif not prompt.strip():
            problems.append(f"{where}: empty prompt")
        else:
            pairs.append(ClipPair(cond, target, prompt))
    return pairs, problems


def _frames(path: Path, count: int, start: int, fps: float | None) -> np.ndarray:
    """``count`` frames of a video from frame ``start`` (``(count, H, W, 3)`` uint8)."""
    from .video import VideoFrames

    source = VideoFrames(path, fps)
    if len(source) < start + count:
        raise DataError(f"{path}: {len(source)} frames{'' if fps is None else f' at {fps} fps'}, needs "
                        f"{start + count}")
    got = source.read(range(start, start + count))
    return np.stack([got[i] for i in range(start, start + count)])


def _image(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return pil_to_array(img.convert("RGB"))


def _tensor(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1)


class PairedClipDataset(Dataset):
    """Decoded pairs: ``{"condition": (Fc, 3, H, W), "target": (Ft, 3, H, W), "prompt": str}``."""

    def __init__(self, pairs: list[ClipPair], condition_frames: int, target_frames: int, height: int, width: int,
                 condition: Literal["clip", "image"] = "clip", fps: float | None = None) -> None:
        self.pairs, self.fc, self.ft = pairs, int(condition_frames), int(target_frames)
        self.height, self.width, self.condition, self.fps = int(height), int(width), condition, fps

    def __len__(self) -> int:
        return len(self.pairs)

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.pairs[i]
        if p.condition == p.target:  # one video: condition frames, then target frames
            if self.condition == "image":
                frames = _frames(p.target, 1 + self.ft, 0, self.fps)
                return np.repeat(frames[:1], self.fc, axis=0), frames[1:]
            frames = _frames(p.target, self.fc + self.ft, 0, self.fps)
            return frames[:self.fc], frames[self.fc:]
        if p.condition.suffix.lower() in IMAGE_SUFFIXES:
            cond = np.repeat(_image(p.condition)[None], self.fc, axis=0)
        elif self.condition == "image":
            cond = np.repeat(_frames(p.condition, 1, 0, self.fps), self.fc, axis=0)
        else:
            cond = _frames(p.condition, self.fc, 0, self.fps)
        return cond, _frames(p.target, self.ft, 0, self.fps)

    def check(self, i: int) -> None:
        """Refuse (DataError) a pair whose files cannot be opened or whose videos are too short, from the
        containers' frame tables (no decoding)."""
        from .video import VideoFrames

        p = self.pairs[i]
        needs = {p.target: (1 + self.ft if self.condition == "image" else self.fc + self.ft)} \
            if p.condition == p.target else {p.target: self.ft}
        if p.condition != p.target:
            if p.condition.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    with Image.open(p.condition) as img:
                        img.verify()
                except Exception as e:  # noqa: BLE001 - any decode failure means unreadable
                    raise DataError(f"{p.condition}: unreadable image ({type(e).__name__})") from None
            else:
                needs[p.condition] = 1 if self.condition == "image" else self.fc
        for path, count in needs.items():
            n = len(VideoFrames(path, self.fps))
            if n < count:
                raise DataError(f"{path}: {n} frames{'' if self.fps is None else f' at {self.fps} fps'}, needs {count}")

    def __getitem__(self, i: int) -> dict:
        cond, target = self.raw(i)
        return {"condition": _tensor(cond, self.height, self.width),
                "target": _tensor(target, self.height, self.width), "prompt": self.pairs[i].prompt}


class PairedClipData(SplitLoaders, L.LightningDataModule):
    """Condition -> target clip pairs with prompts (``videos.txt`` + ``prompts.txt``, or ``pairs.jsonl``).

    Args:
        root: a split folder, or a folder with ``train/`` (and optionally ``val/``, ``test/``).
        condition_frames: condition frames per pair, ``1 + 4k`` (13 in the TIC-FT paper).
        target_frames: target frames per pair, a multiple of 4 (36 in the paper).
        condition: ``clip`` (video-to-video: the condition frames as they are) or ``image`` (image-to-video:
            the first frame repeated).
        height, width: frame size given to the model.
        fps: sampling rate of the decoded frames (``null``: every frame).
        batch_size: pairs per batch (per device).
        val_count: pairs held out for validation (the split's last ones) when there is no ``val/``.
        on_corrupt: ``skip`` bad pairs (counted, paths logged, kept in ``self.skipped``) or ``error``.
        num_workers, seed: dataloader workers; seed of the training shuffle.
    """

    def __init__(self, root: str, condition_frames: int = 13, target_frames: int = 36,
                 condition: Literal["clip", "image"] = "clip", height: int = 480, width: int = 832,
                 fps: float | None = None, batch_size: int = 1, val_count: int = 1,
                 on_corrupt: Literal["skip", "error"] = "skip", num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if condition_frames < 1 or (condition_frames - 1) % 4:
            raise ConfigError(f"{_KEY}.condition_frames={condition_frames}: condition frames must be 1 + 4k "
                              "(1, 5, 9, 13, ...) so the joint clip has the video VAE's 4k + 1 frames")
        if target_frames < 4 or target_frames % 4:
            raise ConfigError(f"{_KEY}.target_frames={target_frames}: target frames must be a multiple of 4 "
                              "(4, 8, ..., 36)")
        if condition not in ("clip", "image"):
            raise ConfigError(f"{_KEY}.condition must be 'clip' or 'image', got {condition!r}")
        if on_corrupt not in ("skip", "error"):
            raise ConfigError(f"{_KEY}.on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
        for key, value, low in (("batch_size", batch_size, 1), ("height", height, 8), ("width", width, 8),
                                ("val_count", val_count, 1), ("num_workers", num_workers, 0)):
            if int(value) < low:
                raise ConfigError(f"{_KEY}.{key} must be >= {low}, got {value}")
        if fps is not None and fps <= 0:
            raise ConfigError(f"{_KEY}.fps must be > 0 or null, got {fps}")
        self.root = Path(root).expanduser()
        self.condition_frames, self.target_frames, self.condition = int(condition_frames), int(target_frames), condition
        self.height, self.width, self.fps = int(height), int(width), fps
        self.batch_size, self.val_count, self.on_corrupt = int(batch_size), int(val_count), on_corrupt
        self.num_workers, self.seed = int(num_workers), int(seed)
        self.skipped: list[str] = []
        self._splits: dict[str, list[ClipPair]] = {}

    def _folder(self, split: str) -> Path | None:
        if not self.root.is_dir():
            raise DataError(f"{_KEY}.root={str(self.root)!r} is not a folder")
        if (self.root / split).is_dir():
            return self.root / split
        return self.root if split == "train" and not (self.root / "val").is_dir() else None

    def _read(self, split: str) -> list[ClipPair] | None:
        folder = self._folder(split)
        if folder is None:
            return None
        pairs, problems = read_split(folder)
        probe = PairedClipDataset(pairs, self.condition_frames, self.target_frames, 8, 8, self.condition, self.fps)
        good = []
        for i, pair in enumerate(pairs):
            try:
                probe.check(i)
                good.append(pair)
            except (DataError, OSError) as e:
                problems.append(str(e))
        if problems and self.on_corrupt == "error":
            raise DataError(f"{problems[0]}. Fix or remove it, or set {_KEY}.on_corrupt=skip to skip such pairs "
                            f"({len(problems)} problem(s) in {folder})")
        if problems:
            self.skipped.extend(problems)
            log.warning("skipped %d bad pair(s) in %s (%s.on_corrupt=skip):\n  %s", len(problems), folder, _KEY,
                        "\n  ".join(problems))
        return good

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        train = self._read("train")
        if not train:
            raise DataError(f"no usable clip pairs in {self.root} ({_KEY}.root)")
        val = self._read("val")
        if val is None:
            if len(train) <= self.val_count:
                raise DataError(f"cannot hold out {self.val_count} validation pair(s) from {len(train)}; add a val/ "
                                f"folder or lower {_KEY}.val_count")
            train, val = train[:-self.val_count], train[-self.val_count:]
        test = self._read("test")
        self._splits = {"train": train, "val": val, "test": test if test is not None else val}

    def dataset(self, split: str) -> PairedClipDataset:
        self.setup()
        return PairedClipDataset(self._splits[split], self.condition_frames, self.target_frames, self.height,
                                 self.width, self.condition, self.fps)
