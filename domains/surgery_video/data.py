"""Surgery video datamodules: Cholec80 layout and HeiCo-style video files.

Both are :class:`~vision_ft.data.video.VideoClipData`: causal clips labelled by their last
frame, split by video, decoded lazily. With ``root`` unset, :class:`Cholec80Data` runs on the
embedded SYNTHETIC sample (:mod:`domains.surgery_video.sample`), generated on first use, and
says so. A given ``root`` must exist: nothing is generated at a user path.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np

from vision_ft.data.video import (
    VIDEO_EXTENSIONS, ImageFrames, LabelledVideo, VideoClipData, VideoFrames, natural_key,
)
from vision_ft.errors import ConfigError, DataError

from .formats import ranges_to_labels, read_cholec80_phases, read_heico_phase_csv, read_phase_json
from .phases import CHOLEC80_PHASES, HEICO_PHASES
from .sample import SAMPLE_SPLITS, write_sample
from .transforms import crop_black_margin

log = logging.getLogger("vision_ft")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class Cholec80Data(VideoClipData):
    """Cholec80: ``videoXX-phase.txt`` annotations (25 fps) with frames extracted at ``fps``, or the videos.

    Layout under ``root`` (folder names configurable)::

        phase_annotations/video01-phase.txt     Frame<TAB>Phase, one row per 25-fps frame
        frames/video01/0.jpg 25.jpg 50.jpg …    frames at 1 fps, named by 25-fps frame index
                                                (folders ``video01``, ``01`` or ``1`` all work)
        videos/video01.mp4                      with source="videos" instead of frames/

    Sampled frame ``k`` is annotation frame ``k · annotation_fps / fps``; its label is that
    row's phase. Default split: the common 32 / 8 / 40 by video number (:func:`split_videos`);
    on the synthetic sample, 6 / 2 / 2.

    Args:
        root: dataset folder; ``None`` = the embedded synthetic sample (generated in ``sample_dir``).
        sample_dir: where the synthetic sample lives.
        source: ``frames`` (extracted images) or ``videos`` (decode the video files with PyAV).
        frames_dir, annotations_dir, videos_dir: sub-folders of ``root``.
        frame_names: ``native_index`` (``<25-fps frame index>.jpg``) or ``sequential`` (the i-th
            image in numeric order is sampled frame i, e.g. ffmpeg's ``%d.png`` from 1).
        annotation_fps: frame rate of the annotation files (25 for Cholec80).
        class_names: phase vocabulary in class order (default: the 7 Cholec80 phases).
        crop_black_margin: crop the endoscope's black border from every frame.
        **kwargs: :class:`~vision_ft.data.video.VideoClipData` options (``num_frames``,
            ``frame_stride``, ``fps``, ``image_size``, ``batch_size``, splits …).
    """

    def __init__(
        self,
        root: str | None = None,
        sample_dir: str = "data/surgery_video_sample",
        source: Literal["frames", "videos"] = "frames",
        frames_dir: str = "frames",
        annotations_dir: str = "phase_annotations",
        videos_dir: str = "videos",
        frame_names: Literal["native_index", "sequential"] = "native_index",
        annotation_fps: float = 25.0,
        class_names: list[str] | None = None,
        crop_black_margin: bool = False,
        **kwargs,
    ) -> None:
        self.synthetic = root is None
        if root is None:
            root = str(write_sample(Path(sample_dir)))
            log.warning("data: using the embedded SYNTHETIC sample %s (generated procedure videos, not surgical "
                        "data); set data.init_args.root to a Cholec80 folder (see datasets_cards/cholec80.md)", root)
            if not any(kwargs.get(f"{s}_videos") for s in ("train", "val", "test")):
                kwargs.update({f"{s}_videos": list(ids) for s, ids in SAMPLE_SPLITS.items()})
        super().__init__(**kwargs)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data.init_args.root={str(root)!r} does not exist")
        if source not in ("frames", "videos"):
            raise ConfigError(f"data.init_args.source must be 'frames' or 'videos', got {source!r}")
        if frame_names not in ("native_index", "sequential"):
            raise ConfigError(f"data.init_args.frame_names must be 'native_index' or 'sequential', got {frame_names!r}")
        step = annotation_fps / self.fps
        if source == "frames" and (step < 1 or abs(step - round(step)) > 1e-6):
            raise ConfigError(f"data.init_args.fps={self.fps} must divide annotation_fps={annotation_fps} "
                              "(frames are the annotation rows every annotation_fps/fps frames)")
        self.source, self.frame_names, self.annotation_fps, self.step = source, frame_names, annotation_fps, int(round(step))
        self.skipped: list[str] = []
        names = list(class_names) if class_names else list(CHOLEC80_PHASES)
        index = {n: i for i, n in enumerate(names)}
        ann_dir = self.root / annotations_dir
        files = sorted(ann_dir.glob("*-phase.txt"), key=lambda p: natural_key(p.name))
        if not files:
            raise DataError(f"no '*-phase.txt' annotation files in {ann_dir} (data.init_args.root / annotations_dir)")
        videos = []
        for path in files:
            video_id = path.name[: -len("-phase.txt")]
            frames, phases = read_cholec80_phases(path)
            unknown = sorted(set(phases) - set(index))
            if unknown:
                raise DataError(f"{path}: unknown phase(s) {unknown}; known: {names} (data.init_args.class_names)")
            labels = np.array([index[p] for p in phases], dtype=np.int64)
            video = (self._from_video(video_id, frames, labels, self.root / videos_dir) if source == "videos"
                     else self._from_frames(video_id, frames, labels, self.root / frames_dir))
            if video is not None:
                videos.append(video)
        self._set_videos(videos, names)
        if crop_black_margin:
            self.frame_transform = crop_black_margin_transform

    # ---- layouts ----------------------------------------------------------------------
    def _missing(self, what: str, key: str) -> None:
        if self.on_corrupt == "error":
            raise DataError(f"{what} (data.init_args.{key}); or set data.init_args.on_corrupt=skip to skip it")
        self.skipped.append(what)
        log.warning("skipped: %s (data.init_args.on_corrupt=skip)", what)

    def _frame_folder(self, video_id: str, frames_root: Path) -> Path | None:
        digits = video_id[len("video"):] if video_id.startswith("video") else video_id
        candidates = [video_id, digits] + ([str(int(digits))] if digits.isdigit() else [])
        return next((frames_root / c for c in candidates if (frames_root / c).is_dir()), None)

    def _from_frames(self, video_id: str, frames: np.ndarray, labels: np.ndarray,
                     frames_root: Path) -> LabelledVideo | None:
        folder = self._frame_folder(video_id, frames_root)
        if folder is None:
            self._missing(f"no frame folder for {video_id} in {frames_root}", "frames_dir")
            return None
        images = {int(p.stem): p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem.isdigit()}
        keep = frames % self.step == 0
        frames, labels = frames[keep], labels[keep]
        if self.frame_names == "sequential":
            ordered = [images[k] for k in sorted(images)]
            if len(ordered) > len(frames):
                log.info("%s: %d frame images beyond the last annotated frame ignored", folder, len(ordered) - len(frames))
            paths = ordered[: len(frames)]
            if len(paths) < len(frames):
                self._missing(f"{folder}: {len(frames) - len(paths)} annotated frame(s) without an image at the end",
                              "frames_dir")
            labels = labels[: len(paths)]
        else:
            found = np.array([int(f) in images for f in frames], dtype=bool)
            if not found.all():
                missing = frames[~found]
                self._missing(f"{folder}: {len(missing)} annotated frame(s) without an image "
                              f"(e.g. {int(missing[0])}.jpg)", "frames_dir")
            paths = [images[int(f)] for f in frames[found]]
            labels = labels[found]
        if not paths:
            self._missing(f"{folder}: no frame images matching the annotations", "frames_dir")
            return None
        return LabelledVideo(video_id, ImageFrames(paths), labels)

    def _from_video(self, video_id: str, frames: np.ndarray, labels: np.ndarray,
                    videos_root: Path) -> LabelledVideo | None:
        path = next((videos_root / f"{video_id}{ext}" for ext in VIDEO_EXTENSIONS
                     if (videos_root / f"{video_id}{ext}").is_file()), None)
        if path is None:
            self._missing(f"no video file for {video_id} in {videos_root}", "videos_dir")
            return None
        source = VideoFrames(path, self.fps)
        by_frame = dict(zip(frames.tolist(), labels.tolist()))
        per_sample = np.array([by_frame.get(int(i), -1) for i in source.source_index], dtype=np.int64)
        return LabelledVideo(video_id, source, per_sample)


def crop_black_margin_transform(frame: np.ndarray) -> np.ndarray:
    """:func:`~domains.surgery_video.transforms.crop_black_margin` with its defaults (picklable for workers)."""
    return crop_black_margin(frame)


class HeiCoData(VideoClipData):
    """Video files with phase annotations: HeiCo frame-wise CSVs or JSON phase ranges.

    Every video file under ``root`` (any depth; ``.mp4 .avi .mkv …``) whose annotation sits
    beside it is used; its id is its path relative to ``root`` without the extension.
    Annotation beside ``<name>.<ext>``, first found:

    - ``<name>.json``: JSON phase ranges in seconds (this kit's interchange format,
      :func:`~domains.surgery_video.formats.read_phase_json`);
    - ``<name>_Phase.csv`` / ``<name>_phase.csv`` / ``<name>.csv``: one ``frame,phase_id`` row
      per video frame (HeiCo / EndoVis 2017), ids into :data:`HEICO_PHASES`.

    Frames are sampled at ``fps`` and decoded with PyAV; a sampled frame takes the label of
    the video frame it was decoded from (CSV) or of the range covering its time (JSON);
    frames without one are unlabelled (ignored by loss and metrics).

    Args:
        root: folder holding the videos.
        class_names: class order (default: HEICO_PHASES with CSV annotations; else the JSON
            files' ``classes`` list, else their phase names sorted).
        ignore_phases: phases whose frames become unlabelled and which are not classes
            (default ``["Exception"]``, ignored by the EndoVis 2017 evaluation).
        crop_black_margin: crop the endoscope's black border from every frame.
        **kwargs: :class:`~vision_ft.data.video.VideoClipData` options.
    """

    def __init__(self, root: str, class_names: list[str] | None = None, ignore_phases: list[str] | None = None,
                 crop_black_margin: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data.init_args.root={str(root)!r} does not exist")
        ignore = ["Exception"] if ignore_phases is None else list(ignore_phases)
        self.skipped: list[str] = []
        found = []
        for path in sorted(self.root.rglob("*"), key=lambda p: natural_key(p.as_posix())):
            if path.suffix.lower() not in VIDEO_EXTENSIONS or not path.is_file():
                continue
            annotation = self._annotation(path)
            if annotation is None:
                what = f"{path}: no annotation beside it ({path.stem}.json or {path.stem}_Phase.csv)"
                if self.on_corrupt == "error":
                    raise DataError(what + "; or set data.init_args.on_corrupt=skip")
                self.skipped.append(what)
                log.warning("skipped: %s", what)
                continue
            found.append((path, annotation))
        if not found:
            raise DataError(f"no annotated video files under {self.root} (data.init_args.root)")
        parsed = [(p, a, read_phase_json(a) if a.suffix == ".json" else read_heico_phase_csv(a)) for p, a in found]
        vocabulary = self._vocabulary(parsed, class_names)
        names = [n for n in vocabulary if n not in ignore]
        index = {n: i for i, n in enumerate(names)}
        index.update({n: -1 for n in ignore})
        videos = []
        for path, annotation, content in parsed:
            frames = VideoFrames(path, self.fps)
            if annotation.suffix == ".json":
                ranges, _ = content
                labels = ranges_to_labels(ranges, frames.times, {**index}, source=str(annotation))
            else:
                frame_ids, phase_ids = content
                if phase_ids.size and (phase_ids.min() < 0 or phase_ids.max() >= len(vocabulary)):
                    raise DataError(f"{annotation}: phase id {int(phase_ids.max())} outside [0, {len(vocabulary)}) "
                                    "(data.init_args.class_names)")
                per_frame = dict(zip(frame_ids.tolist(), (index[vocabulary[i]] for i in phase_ids.tolist())))
                labels = np.array([per_frame.get(int(i), -1) for i in frames.source_index], dtype=np.int64)
            unlabelled = int((labels < 0).sum())
            if unlabelled:
                log.info("%s: %d of %d sampled frames unlabelled (ignored)", path, unlabelled, len(labels))
            video_id = path.relative_to(self.root).with_suffix("").as_posix()
            videos.append(LabelledVideo(video_id, frames, labels))
        self._set_videos(videos, names)
        if crop_black_margin:
            self.frame_transform = crop_black_margin_transform

    @staticmethod
    def _annotation(video: Path) -> Path | None:
        for name in (f"{video.stem}.json", f"{video.stem}_Phase.csv", f"{video.stem}_phase.csv", f"{video.stem}.csv"):
            if (video.parent / name).is_file():
                return video.parent / name
        return None

    @staticmethod
    def _vocabulary(parsed, class_names: list[str] | None) -> list[str]:
        if class_names:
            return list(class_names)
        if any(a.suffix != ".json" for _, a, _ in parsed):
            return list(HEICO_PHASES)
        declared = [tuple(c[1]) for _, a, c in parsed if c[1] is not None]
        if declared:
            if len(set(declared)) > 1:
                raise DataError("the JSON files declare different 'classes' lists; make them agree or set "
                                "data.init_args.class_names")
            return list(declared[0])
        return sorted({name for _, _, (ranges, _) in parsed for _, _, name in ranges})
