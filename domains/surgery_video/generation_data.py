"""Surgery video generation: continue a procedure clip (first frames as condition, the next frames as target).

The data is the paired-clip layout (:class:`~vision_ft.data.paired_clips.PairedClipData`): ``videos.txt`` +
``prompts.txt`` + ``videos/*.mp4``, each video the condition frames followed by the target frames. With
``root`` unset the pack writes its SYNTHETIC sample there first: short clips cut from the surgery pack's
generated "procedure" videos (:func:`~domains.surgery_video.sample.render_video`, drawn shapes, not surgical
data), each prompted with the Cholec80 phase its target frames start in. Real clips: ``root`` = a folder in
the same layout (see ``datasets_cards/surgery_video_generation.md``).

    python -m domains.surgery_video.generation_data OUT_DIR      # the synthetic sample alone
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import numpy as np

from vision_ft.data.paired_clips import PROMPTS, VIDEOS, PairedClipData
from vision_ft.io import atomic_dir

from .phases import CHOLEC80_PHASES
from .sample import phase_lengths, render_video

log = logging.getLogger("vision_ft")

MARKER = "SYNTHETIC_SAMPLE.json"
VERSION = 1
TEMPLATE = "laparoscopic cholecystectomy, {} phase, endoscopic view"


def phase_words(name: str) -> str:
    """``CalotTriangleDissection`` -> ``calot triangle dissection``."""
    return " ".join(re.findall(r"[A-Z][a-z]*", name)).lower()


def write_clip_pairs(root: str | Path, n_clips: int = 12, frames: int = 21, size: int = 64, fps: float = 4.0,
                     seed: int = 0) -> Path:
    """``n_clips`` clips of ``frames`` frames (``size`` x ``size``) cut from synthetic procedures, with
    ``videos.txt`` / ``prompts.txt`` (written atomically; reused when complete)."""
    from vision_ft.data.video import write_video

    root = Path(root)
    params = {"version": VERSION, "n_clips": n_clips, "frames": frames, "size": size, "fps": fps, "seed": seed,
              "synthetic": True}
    if _is_complete(root, params):
        return root
    with atomic_dir(root, complete=lambda d: _is_complete(d, params), replace_incomplete=True) as tmp:
        videos, prompts = [], []
        for i in range(n_clips):
            rng = np.random.default_rng([seed, 100 + i])
            lengths = phase_lengths(rng, 40)
            video = render_video(rng, lengths, size, margin=0)
            start = int(rng.integers(0, len(video) - frames + 1))
            phase_of = [p for p, n in enumerate(lengths) for _ in range(n)]
            target_phase = CHOLEC80_PHASES[phase_of[min(start + frames // 2, len(video) - 1)]]
            name = f"videos/clip{i:03d}.mp4"
            write_video(tmp / name, np.stack(video[start:start + frames]), fps)
            videos.append(name)
            prompts.append(TEMPLATE.format(phase_words(target_phase)))
        (tmp / VIDEOS).write_text("\n".join(videos) + "\n")
        (tmp / PROMPTS).write_text("\n".join(prompts) + "\n")
        (tmp / MARKER).write_text(json.dumps(params, indent=1) + "\n")
    return root


def _is_complete(root: Path, params: dict) -> bool:
    marker = root / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == params


class SurgeryClipPairs(PairedClipData):
    """Paired surgery clips; the SYNTHETIC sample when ``root`` is unset (see the module doc).

    Args:
        root: a paired-clip folder (``videos.txt`` + ``prompts.txt``, or ``pairs.jsonl``); takes precedence.
        sample_dir: where the synthetic sample is written.
        **kwargs: :class:`~vision_ft.data.paired_clips.PairedClipData` options.
    """

    def __init__(self, root: str | None = None, sample_dir: str = "data/surgery_video_generation_sample",
                 condition_frames: int = 13, target_frames: int = 8, **kwargs) -> None:
        if root is None:
            folder = write_clip_pairs(Path(sample_dir) / "clips_v1", frames=condition_frames + target_frames)
            log.warning("data: using the embedded SYNTHETIC clip sample %s (generated shapes, not surgical video); "
                        "set data.init_args.root to a paired-clip folder (see "
                        "datasets_cards/surgery_video_generation.md)", folder)
            root = str(folder)
        super().__init__(root=root, condition_frames=condition_frames, target_frames=target_frames, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the SYNTHETIC paired surgery clips (videos.txt layout).")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--n-clips", type=int, default=12)
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--size", type=int, default=64)
    a = parser.parse_args(argv)
    out = write_clip_pairs(a.out, a.n_clips, a.frames, a.size)
    print(f"wrote {out}: SYNTHETIC procedure clips, not surgical video")


if __name__ == "__main__":
    main()
