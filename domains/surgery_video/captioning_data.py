"""Surgery video captioning pack data: short clips of the SYNTHETIC procedure videos with templated captions.

Each clip (``frames`` frames at ``fps``, ``size`` x ``size`` pixels) is cut from inside one phase of a
synthetic procedure (:mod:`domains.surgery_video.sample`: every phase shows its own instruments and
motion), and carries three reference captions of that phase (what is done, with which instruments), as
MSR-VTT carries 20 per video. Records are the kit's video conversations::

    {"video": "videos/train_003.mp4", "conversations": [{"from": "human", "value": "<video>\\nDescribe ..."},
     {"from": "gpt", "value": "<first reference>"}], "references": ["...", "...", "..."]}

so real captioning data converted with :mod:`vision_ft.data.caption_datasets` (MSR-VTT, MSVD) is read by
the same datamodule (``data.init_args.train`` / ``val`` / ``image_root``). Same arguments -> same files.
``python -m domains.surgery_video.captioning_data OUT_DIR`` writes the sample alone.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from vision_ft.data import ConversationData
from vision_ft.io import atomic_dir

from .sample import phase_lengths, render_video

log = logging.getLogger("vision_ft")

MARKER = "SYNTHETIC_CAPTIONS.json"
VERSION = 1
PROMPT = "Describe what happens in this clip."
#: three references per Cholec80 phase, from what the synthetic sample draws in it
CAPTIONS: list[list[str]] = [
    ["the camera pans over the trocar openings", "preparation with no instrument in view",
     "the trocar openings are shown before any instrument enters"],
    ["a grasper and a hook dissect the calot triangle", "calot triangle dissection with a grasper and a hook",
     "the hook circles near the fatty calot triangle"],
    ["a clip applier places clips on the vessel", "clipping and cutting with a clip applier and scissors",
     "clips are put on the vessel before it is cut"],
    ["the hook dissects the gallbladder in smoke", "gallbladder dissection with a hook",
     "the hook sweeps along the edge of the gallbladder"],
    ["the gallbladder goes into a specimen bag", "gallbladder packaging into a bag",
     "a specimen bag receives the gallbladder"],
    ["an irrigator cleans the field", "cleaning and coagulation with an irrigator",
     "the irrigator washes the blood away"],
    ["the closed bag is pulled out", "gallbladder retraction in a closed bag",
     "the specimen bag is retracted out of view"],
]


def _is_complete(root: Path, params: dict) -> bool:
    marker = root / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == params


def write_caption_sample(root: str | Path, n_train: int = 21, n_val: int = 7, frames: int = 4, size: int = 64,
                         fps: float = 2.0, seed: int = 0) -> Path:
    """Write ``n_train`` + ``n_val`` captioned clips (phases in turn) under ``root``; reused when complete."""
    from vision_ft.data.video import write_video

    root = Path(root)
    params = {"version": VERSION, "n_train": n_train, "n_val": n_val, "frames": frames, "size": size, "fps": fps,
              "seed": seed, "synthetic": True}
    if _is_complete(root, params):
        return root
    with atomic_dir(root, complete=lambda d: _is_complete(d, params), replace_incomplete=True) as tmp:
        for split, count, offset in (("train", n_train, 0), ("val", n_val, 10_000)):
            records = []
            for i in range(count):
                phase = i % len(CAPTIONS)
                rng = np.random.default_rng([seed, offset + i])
                lengths = phase_lengths(rng, 12 * len(CAPTIONS))
                while lengths[phase] < frames:  # a phase long enough to cut the clip from
                    lengths = phase_lengths(rng, 12 * len(CAPTIONS))
                video = render_video(rng, lengths, size, margin=0)
                first = sum(lengths[:phase])
                start = first + int(rng.integers(0, lengths[phase] - frames + 1))
                name = f"videos/{split}_{i:03d}.mp4"
                write_video(tmp / name, np.stack(video[start:start + frames]), fps)
                refs = list(CAPTIONS[phase])
                records.append({"video": name, "conversations": [
                    {"from": "human", "value": f"<video>\n{PROMPT}"}, {"from": "gpt", "value": refs[0]}],
                    "references": refs, "phase": phase})
            (tmp / f"captions_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (tmp / MARKER).write_text(json.dumps(params, indent=1) + "\n")
    return root


class SurgeryCaptionData(ConversationData):
    """Video conversations with several reference captions; the embedded SYNTHETIC sample unless ``train`` is set.

    Args:
        train / val / image_root: real data (JSONL from :func:`vision_ft.data.caption_datasets.convert_captions`
            and the video folder); ``None`` writes and uses the synthetic sample in ``sample_dir``.
        sample_dir: where the sample is written.
        n_train / n_val: clips of the sample.
        **kwargs: :class:`~vision_ft.data.ConversationData` options (``video_frames``, ``batch_size``...).
    """

    def __init__(self, train: str | None = None, val: str | None = None, image_root: str | None = None,
                 sample_dir: str = "data/surgery_video_captioning_sample", n_train: int = 21, n_val: int = 7,
                 **kwargs: Any) -> None:
        self.sample_dir, self.n_train, self.n_val = Path(sample_dir), n_train, n_val
        self.use_sample = train is None
        if self.use_sample:
            train, val = str(self.sample_dir / "captions_train.jsonl"), str(self.sample_dir / "captions_val.jsonl")
        super().__init__(train=train, val=val, image_root=image_root, **kwargs)

    def prepare_sample(self) -> None:
        if self.use_sample:
            write_caption_sample(self.sample_dir, self.n_train, self.n_val)
            log.warning("data: using the embedded SYNTHETIC procedure clips in %s (drawn shapes, not surgical video) "
                        "with templated captions; set data.init_args.train / val / image_root "
                        "(see datasets_cards/surgery_video_captioning.md)", self.sample_dir)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="write the synthetic surgery captioning sample")
    p.add_argument("out_dir")
    a = p.parse_args(argv)
    print(write_caption_sample(a.out_dir))


if __name__ == "__main__":
    main()
