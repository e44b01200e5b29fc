"""Deterministic generator of SYNTHETIC "procedure" videos in the Cholec80 layout.

This is not surgical data. It exists so the surgery video pack trains offline, end to end,
on a fresh machine. Each video runs through the 7 Cholec80 phases in order, with variable
phase lengths, over a drifting pink "tissue" background, and every phase shows its own
instruments, shapes and motion (loosely styled after the real procedure):

- ``Preparation``: no instrument; dark trocar openings; the camera pans fast.
- ``CalotTriangleDissection``: a yellow fatty patch; a grey grasper and a thin white hook
  whose tips circle slowly.
- ``ClippingCutting``: a dark red vessel; silver clips appear one by one under a blue-grey
  clip applier; golden scissors in the second half.
- ``GallbladderDissection``: a large olive gallbladder; the white hook sweeps along its edge
  fast; white smoke haze.
- ``GallbladderPackaging``: a beige specimen bag with the shrinking gallbladder going in.
- ``CleaningCoagulation``: a cyan irrigator moving sideways, water droplets, dark blood pools.
- ``GallbladderRetraction``: the closed beige bag pulled up and out of view.

Frames are ``size × (size + 2·margin)`` RGB JPEGs with black side margins (as endoscope
frames have), written at 1 fps as ``frames/videoXX/<25·k>.jpg`` (named by the 25-fps frame
index, like the usual Cholec80 extraction), with ``phase_annotations/videoXX-phase.txt``
holding one row per 25-fps frame, as the real files do. Same arguments → same bytes.
Run ``python -m domains.surgery_video.sample OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vision_ft.io import atomic_dir

from .formats import write_cholec80_phases
from .phases import CHOLEC80_PHASES

CLASS_NAMES = list(CHOLEC80_PHASES)
ANNOTATION_FPS = 25
MARKER = "SYNTHETIC_SAMPLE.json"
VERSION = 1
#: the sample's split by video (the Cholec80 32/8/40 rule needs more videos than the sample has)
SAMPLE_SPLITS = {"train": [f"video{i:02d}" for i in range(1, 7)], "val": ["video07", "video08"],
                 "test": ["video09", "video10"]}
#: relative share of each phase in a procedure (jittered per video)
_PHASE_SHARE = np.array([0.08, 0.26, 0.12, 0.22, 0.10, 0.12, 0.10])
_MIN_PHASE = 3


def phase_lengths(rng: np.random.Generator, total: int) -> list[int]:
    """Lengths (frames) of the 7 phases of one video, each at least 3, summing to ``total``."""
    share = rng.dirichlet(_PHASE_SHARE * 40)
    extra = total - _MIN_PHASE * len(share)
    lengths = _MIN_PHASE + np.floor(share * extra).astype(int)
    lengths[np.argmax(share)] += total - lengths.sum()
    return lengths.tolist()


def _tissue(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth pink field twice the frame size; frames crop a drifting window from it."""
    n = 2 * size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    colour = np.array([0.78, 0.38, 0.40]) + rng.normal(0, 0.03, 3)
    field = np.zeros((n, n))
    for _ in range(4):
        k = rng.uniform(1.0, 3.0, 2) * 2 * np.pi / n
        field += rng.uniform(0.04, 0.08) * np.sin(k[0] * xx + k[1] * yy + rng.uniform(0, 2 * np.pi))
    return np.clip(colour[None, None] * (1 + field[..., None]), 0, 1)


def _line(draw: ImageDraw.ImageDraw, a, b, colour, width: int) -> None:
    draw.line([tuple(map(float, a)), tuple(map(float, b))], fill=colour, width=width)


def _disc(draw: ImageDraw.ImageDraw, c, r: float, colour, outline=None) -> None:
    draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=colour, outline=outline, width=2)


def _draw_phase(img: Image.Image, phase: int, p: float, t: float, size: int, v: dict) -> Image.Image:
    """Draw phase ``phase`` at progress ``p`` in [0, 1) and absolute time ``t`` (s)."""
    d = ImageDraw.Draw(img)
    s = size / 64.0
    jitter = v["jitter"] * s
    if phase == 0:  # trocar openings
        for cx, cy in v["trocars"]:
            _disc(d, (cx * s, cy * s), 6 * s, (25, 20, 22), outline=(120, 120, 125))
    elif phase == 1:  # fatty Calot triangle, grasper + hook circling
        d.ellipse([22 * s, 20 * s, 44 * s, 40 * s], fill=(222, 196, 92))
        ang = 2 * np.pi * t / 4.0
        tip = np.array([30, 34]) * s + 4 * s * np.array([np.cos(ang), np.sin(ang)]) + jitter
        _line(d, (0, size), tip, (150, 152, 162), int(4 * s))
        _line(d, tip, tip + np.array([-4, -6]) * s, (150, 152, 162), int(2 * s))
        _line(d, tip, tip + np.array([4, -6]) * s, (150, 152, 162), int(2 * s))
        hook = np.array([40, 26]) * s + 4 * s * np.array([np.sin(ang), np.cos(ang)])
        _line(d, (size, 8 * s), hook, (238, 238, 238), max(1, int(2 * s)))
        _line(d, hook, hook + np.array([0, 5]) * s, (238, 238, 238), max(1, int(2 * s)))
    elif phase == 2:  # vessel, clips appearing, clip applier, scissors later
        _line(d, (0, 30 * s), (size, 36 * s), (118, 18, 30), int(4 * s))
        n_clips = 1 + int(p * 4)
        for i in range(n_clips):
            x = (14 + 10 * i) * s
            d.rectangle([x - 1.5 * s, (28 + i * 0.6) * s, x + 1.5 * s, (38 + i * 0.6) * s], fill=(205, 205, 225))
        target = np.array([(14 + 10 * min(n_clips, 4)) * s, 30 * s]) + jitter
        _line(d, (size, 0), target, (70, 82, 122), int(5 * s))
        if p >= 0.5:
            c = np.array([20, 48]) * s
            _line(d, c - np.array([8, 8]) * s, c + np.array([8, 8]) * s, (205, 172, 60), int(2 * s))
            _line(d, c - np.array([8, -8]) * s, c + np.array([8, -8]) * s, (205, 172, 60), int(2 * s))
    elif phase == 3:  # gallbladder, hook sweeping fast, smoke
        d.ellipse([10 * s, 14 * s, 54 * s, 46 * s], fill=(112, 140, 62))
        x = (16 + 32 * (0.5 + 0.5 * np.sin(2 * np.pi * t / 3.0))) * s
        tip = np.array([x, 14 * s]) + jitter
        _line(d, (size, 0), tip, (240, 240, 240), max(1, int(2 * s)))
        _line(d, tip, tip + np.array([-4, 0]) * s, (240, 240, 240), max(1, int(2 * s)))
    elif phase == 4:  # specimen bag with the gallbladder going in
        d.rounded_rectangle([12 * s, 16 * s, 52 * s, 50 * s], radius=8 * s, fill=(236, 226, 200))
        r = (14 - 10 * p) * s
        _disc(d, (32 * s, 33 * s), max(r, 2 * s), (112, 140, 62))
        _line(d, (0, 0), (14 * s, 18 * s) + jitter, (150, 152, 162), int(4 * s))
    elif phase == 5:  # irrigator, droplets, blood pools
        for cx, cy, r in v["pools"]:
            _disc(d, (cx * s, cy * s), r * s, (96, 10, 18))
        x = (14 + 36 * (0.5 + 0.5 * np.sin(2 * np.pi * t / 5.0))) * s
        _line(d, (x, 0), (x, 40 * s), (92, 172, 222), int(6 * s))
        for dx, dy in v["drops"]:
            _disc(d, (x + dx * s, (42 + dy) * s), 1.2 * s, (185, 232, 255))
    elif phase == 6:  # closed bag pulled out of view
        cy = (38 - 40 * p) * s
        w = (16 - 6 * p) * s
        d.rounded_rectangle([32 * s - w, cy - 0.8 * w, 32 * s + w, cy + 0.8 * w], radius=6 * s, fill=(236, 226, 200))
        _line(d, (32 * s, 0), (32 * s, cy - 0.8 * w) + jitter, (150, 152, 162), int(4 * s))
    return img


def render_video(rng: np.random.Generator, lengths: list[int], size: int = 64, margin: int = 8) -> list[np.ndarray]:
    """The frames (1 fps) of one synthetic procedure with the given phase lengths."""
    tissue = _tissue(rng, size)
    v = {"trocars": [(rng.uniform(8, 20), rng.uniform(8, 56)), (rng.uniform(44, 56), rng.uniform(8, 56))],
         "pools": [(rng.uniform(8, 56), rng.uniform(40, 58), rng.uniform(3, 6)) for _ in range(3)],
         "drops": rng.uniform(-5, 5, (10, 2)), "jitter": np.zeros(2)}
    mirror = bool(rng.integers(2))
    frames = []
    t = 0
    drift = rng.uniform(0, 2 * np.pi, 2)
    for phase, length in enumerate(lengths):
        speed = 3.0 if phase == 0 else 1.0
        for i in range(length):
            v["jitter"] = rng.normal(0, 1.0, 2)
            ox = int(size / 2 + size / 3 * np.sin(drift[0] + speed * 0.15 * t))
            oy = int(size / 2 + size / 3 * np.cos(drift[1] + speed * 0.11 * t))
            base = (tissue[oy:oy + size, ox:ox + size] * 255).astype(np.uint8)
            img = _draw_phase(Image.fromarray(base), phase, i / length, float(t), size, v)
            arr = np.asarray(img, dtype=np.float64)
            if phase == 3:  # smoke haze, thickening through the phase
                haze = (0.15 + 0.25 * i / length) * (0.6 + 0.4 * rng.random((size, size, 1)))
                arr = arr * (1 - haze) + 245 * haze
            if mirror:
                arr = arr[:, ::-1]
            arr = np.clip(arr + rng.normal(0, 4.0, arr.shape), 0, 255).astype(np.uint8)
            frame = np.zeros((size, size + 2 * margin, 3), np.uint8)  # black endoscope margins
            frame[:, margin:margin + size] = arr
            frames.append(frame)
            t += 1
    return frames


def write_sample(root: str | Path, n_videos: int = 10, min_seconds: int = 40, max_seconds: int = 70,
                 size: int = 64, seed: int = 0) -> Path:
    """Write the synthetic sample in the Cholec80 layout under ``root`` (atomically; reused if complete).

    ``root/frames/videoXX/<25k>.jpg`` and ``root/phase_annotations/videoXX-phase.txt``; a
    marker file ``SYNTHETIC_SAMPLE.json`` records the arguments.
    """
    root = Path(root)
    params = {"version": VERSION, "n_videos": n_videos, "min_seconds": min_seconds, "max_seconds": max_seconds,
              "size": size, "seed": seed, "synthetic": True}
    if _is_complete(root, params):
        return root
    if min_seconds < _MIN_PHASE * len(CLASS_NAMES) or max_seconds < min_seconds:
        raise ValueError(f"need {_MIN_PHASE * len(CLASS_NAMES)} <= min_seconds <= max_seconds")
    # a sample with these params written meanwhile by another process is kept; an incomplete or older one replaced
    with atomic_dir(root, complete=lambda d: _is_complete(d, params), replace_incomplete=True) as tmp:
        for v in range(1, n_videos + 1):
            rng = np.random.default_rng([seed, v])
            lengths = phase_lengths(rng, int(rng.integers(min_seconds, max_seconds + 1)))
            vid = f"video{v:02d}"
            folder = tmp / "frames" / vid
            folder.mkdir(parents=True)
            for k, frame in enumerate(render_video(rng, lengths, size)):
                Image.fromarray(frame).save(folder / f"{k * ANNOTATION_FPS}.jpg", quality=92)
            per_second = [name for name, n in zip(CLASS_NAMES, lengths) for _ in range(n)]
            write_cholec80_phases(tmp / "phase_annotations" / f"{vid}-phase.txt",
                                  [name for name in per_second for _ in range(ANNOTATION_FPS)])
        (tmp / MARKER).write_text(json.dumps(params, indent=1) + "\n")
    return root


def _is_complete(root: Path, params: dict) -> bool:
    marker = root / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the SYNTHETIC surgery video sample (Cholec80 layout).")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--n-videos", type=int, default=10)
    parser.add_argument("--min-seconds", type=int, default=40)
    parser.add_argument("--max-seconds", type=int, default=70)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    out = write_sample(a.out, a.n_videos, a.min_seconds, a.max_seconds, a.size, a.seed)
    print(f"wrote {out}: SYNTHETIC procedure videos, not surgical data; phases {CLASS_NAMES}")


if __name__ == "__main__":
    main()
