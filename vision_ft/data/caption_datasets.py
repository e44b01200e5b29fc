"""Video captioning datasets converted to the kit's conversation records: MSR-VTT and MSVD.

Each video becomes one record (JSONL, read by :class:`~vision_ft.data.ConversationData`)::

    {"id": "video7010", "video": "TestVideo/video7010.mp4",
     "conversations": [{"from": "human", "value": "<video>\\nDescribe the video in one sentence."},
                       {"from": "gpt", "value": "<first reference caption>"}],
     "references": ["<every reference caption>", ...]}

``video`` is relative to ``video_root`` (the folder holding the videos, found in any sub-folder by file
name: ``<video id>.<mp4|avi|webm|mkv|mov|...>``, or a folder of frames named ``<video id>``). The reply
trains on the first reference; captioning metrics score against all of them.

Splits (the captioning literature's):

- MSR-VTT (Xu et al., CVPR 2016), 10,000 clips, 20 captions each: 6513 train / 497 val / 2990 test. A
  video's split is the file's ``split`` field (``train``, ``validate``, ``test``) when present, else its
  number (``id``, or the ``N`` of ``videoN``): 0-6512 train, 6513-7009 val, 7010-9999 test.
- MSVD (Chen & Dolan, ACL 2011), 1970 clips: 1200 train / 100 val / 670 test, taken in that order from
  the clip names (``<youtube id>_<start>_<end>``) sorted by code point (Python's ``sorted``). That is the
  order of ``youtube_mapping.txt`` (``<clip> vid1`` ... ``vid1970``) published with Yao et al. (ICCV 2015),
  whose code takes vid1-1200 / 1201-1300 / 1301-1970; a mapping file given as ``mapping`` is used as is.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, DataError
from ..io import atomic_write_text

log = logging.getLogger("vision_ft")

DEFAULT_PROMPT = "Describe the video in one sentence."
SPLITS = ("train", "val", "test")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp")

#: MSR-VTT: videos per split and the number ranges of the standard split
MSRVTT_SIZES = {"train": 6513, "val": 497, "test": 2990}
_MSRVTT_RANGES = {"train": range(0, 6513), "val": range(6513, 7010), "test": range(7010, 10000)}
_MSRVTT_SPLIT_NAMES = {"train": "train", "validate": "val", "val": "val", "valid": "val", "validation": "val",
                       "test": "test"}
_VIDEO_N = re.compile(r"^video(\d+)$")

#: MSVD: videos per split (train, val, test), in sorted clip-name order
MSVD_SIZES = (1200, 100, 670)
_MSVD_CLIP = re.compile(r"^(.+)_(\d+)_(\d+)$")
_MAPPING_LINE = re.compile(r"^(\S+)\s+vid(\d+)$")


def caption_record(video_id: str, video: str, references: Sequence[str], prompt: str = DEFAULT_PROMPT) -> dict:
    """One conversation record: the prompt with a ``<video>`` tag, the first reference as the reply."""
    return {"id": video_id, "video": video,
            "conversations": [{"from": "human", "value": f"<video>\n{prompt}"},
                              {"from": "gpt", "value": references[0]}],
            "references": list(references)}


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """``records`` one per line (UTF-8, written atomically: a reader never sees half a file)."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: choose one of {list(SPLITS)}")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start}: {e.reason}); re-save it as UTF-8") from None


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: no such annotation file")
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _as_paths(annotations: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(annotations, (str, Path)):
        return [Path(annotations)]
    paths = [Path(p) for p in annotations]
    if not paths:
        raise ConfigError("no annotation files given")
    return paths


# --- finding the videos ----------------------------------------------------------------------------

def _find_videos(video_root: str | Path, ids: Iterable[str]) -> dict[str, str]:
    """``{video id: path relative to video_root}`` for the ids whose file (or frames folder) exists."""
    root = Path(video_root)
    if not root.is_dir():
        raise DataError(f"{root}: video folder not found (video_root)")
    wanted, found = set(ids), {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        names = [(d, d) for d in dirs if d in wanted]
        names += [(f, Path(f).stem) for f in files if Path(f).suffix.lower() in VIDEO_EXTENSIONS
                  and Path(f).stem in wanted]
        for name, vid in names:
            rel = (here / name).relative_to(root).as_posix()
            if vid in found:
                raise DataError(f"{root}: video {vid!r} is there twice ({found[vid]} and {rel}): keep one")
            found[vid] = rel
        dirs[:] = [d for d in dirs if d not in wanted]  # a frames folder is not searched further
    return found


def _with_videos(ids: Sequence[str], video_root: str | Path, missing: str, label: str) -> tuple[dict[str, str],
                                                                                               list[str]]:
    """The video paths of ``ids`` and the ids whose video is missing (an error unless ``missing='skip'``)."""
    if missing not in ("error", "skip"):
        raise ConfigError(f"missing={missing!r}: choose error or skip")
    found = _find_videos(video_root, ids)
    absent = [v for v in ids if v not in found]
    if absent and missing == "error":
        raise DataError(f"{label}: {len(absent)} video(s) not found under {video_root} (first: {absent[:5]}); "
                        "check video_root, or pass missing='skip' to leave them out")
    if absent:
        log.warning("[vision_ft] %s: %d video(s) not found under %s and left out (first: %s)", label, len(absent),
                    video_root, absent[:5])
    return found, absent


# --- MSR-VTT ---------------------------------------------------------------------------------------

def _msrvtt_number(video: dict, vid: str, where: str) -> int:
    if "id" in video:
        try:
            return int(video["id"])
        except (TypeError, ValueError):
            raise DataError(f"{where}: video {vid!r} has a non-integer 'id' {video['id']!r}") from None
    m = _VIDEO_N.match(vid)
    if m is None:
        raise DataError(f"{where}: video {vid!r} has no 'split' and no 'id', and its name is not videoN: "
                        "its split cannot be told")
    return int(m.group(1))


def read_msrvtt(annotations: str | Path | Sequence[str | Path]
                ) -> tuple[dict[str, str], dict[str, list[str]], str]:
    """``({video id: split}, {video id: captions}, how the split was decided)`` from one or more
    ``videodatainfo.json``-style files (the public release ships ``train_val_videodatainfo.json`` and
    ``test_videodatainfo.json``; give both)."""
    splits: dict[str, str] = {}
    captions: dict[str, list[str]] = {}
    origin: dict[str, Path] = {}
    by_field = by_number = 0
    for path in _as_paths(annotations):
        data = _load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("videos"), list) \
                or not isinstance(data.get("sentences"), list):
            raise DataError(f"{path}: expected an object with lists 'videos' and 'sentences' (MSR-VTT "
                            "videodatainfo.json)")
        here: list[str] = []
        for i, video in enumerate(data["videos"]):
            where = f"{path} [videos][{i}]"
            if not isinstance(video, dict) or not isinstance(video.get("video_id"), str):
                raise DataError(f"{where}: missing 'video_id'")
            vid = video["video_id"]
            if vid in splits:
                raise DataError(f"{where}: video {vid!r} is listed twice (also in {origin[vid]})")
            if "split" in video:
                name = _MSRVTT_SPLIT_NAMES.get(str(video["split"]).lower())
                if name is None:
                    raise DataError(f"{where}: video {vid!r} has unknown split {video['split']!r} "
                                    f"(expected one of {sorted(_MSRVTT_SPLIT_NAMES)})")
                by_field += 1
            else:
                n = _msrvtt_number(video, vid, where)
                name = next((s for s, r in _MSRVTT_RANGES.items() if n in r), None)
                if name is None:
                    raise DataError(f"{where}: video {vid!r} has number {n}, outside 0-9999 of the standard split")
                by_number += 1
            splits[vid], origin[vid] = name, path
            captions[vid] = []
            here.append(vid)
        for i, sentence in enumerate(data["sentences"]):
            where = f"{path} [sentences][{i}]"
            if not isinstance(sentence, dict):
                raise DataError(f"{where}: a sentence is an object with 'video_id' and 'caption'")
            for key in ("video_id", "caption"):
                if not isinstance(sentence.get(key), str):
                    raise DataError(f"{where}: missing '{key}'")
            vid, text = sentence["video_id"], sentence["caption"].strip()
            if vid not in captions or origin[vid] != path:
                raise DataError(f"{where}: caption for video {vid!r}, which this file's 'videos' does not list")
            if not text:
                raise DataError(f"{where}: empty caption for video {vid!r}")
            captions[vid].append(text)
        bare = [v for v in here if not captions[v]]
        if bare:
            raise DataError(f"{path}: {len(bare)} video(s) without captions in 'sentences' (first: {bare[:5]})")
    rules = []
    if by_field:
        rules.append(f"the 'split' field ({by_field} videos)")
    if by_number:
        rules.append(f"the video number, 0-6512 train / 6513-7009 val / 7010-9999 test ({by_number} videos)")
    return splits, captions, " and ".join(rules)


def msrvtt_records(annotations: str | Path | Sequence[str | Path], video_root: str | Path,
                   split: Literal["train", "val", "test"], *, prompt: str = DEFAULT_PROMPT,
                   missing: Literal["error", "skip"] = "error") -> list[dict]:
    """MSR-VTT videos of ``split`` as conversation records, in annotation order. Logs which rule placed
    the videos and whether the split sizes are the standard 6513/497/2990."""
    _check_split(split)
    return _msrvtt_splits(annotations, video_root, (split,), prompt, missing)[split]


def _msrvtt_splits(annotations: str | Path | Sequence[str | Path], video_root: str | Path, wanted: Sequence[str],
                   prompt: str, missing: str) -> dict[str, list[dict]]:
    splits, captions, rule = read_msrvtt(annotations)
    counts = {s: sum(v == s for v in splits.values()) for s in SPLITS}
    label = ", ".join(str(p) for p in _as_paths(annotations))
    standard = all(counts[s] in (0, MSRVTT_SIZES[s]) for s in SPLITS)
    log.log(logging.INFO if standard else logging.WARNING,
            "[vision_ft] MSR-VTT %s: split from %s: train %d, val %d, test %d (%s)", label, rule, counts["train"],
            counts["val"], counts["test"],
            "the standard 6513/497/2990" if standard else "not the standard 6513/497/2990")
    ids = [v for v, s in splits.items() if s in wanted]
    found, _ = _with_videos(ids, video_root, missing, f"MSR-VTT {label}")
    return {s: [caption_record(v, found[v], captions[v], prompt) for v in ids if splits[v] == s and v in found]
            for s in wanted}


# --- MSVD ------------------------------------------------------------------------------------------

def read_msvd(descriptions: str | Path) -> dict[str, list[str]]:
    """``{clip: English captions}`` from ``AllVideoDescriptions.txt`` (``<clip> <caption>`` lines, ``#``
    comments) or the corpus CSV (columns ``VideoID, Start, End, ..., Language, Description``: rows whose
    ``Language`` is English; every row when there is no such column)."""
    path = Path(descriptions)
    if not path.is_file():
        raise DataError(f"{path}: no such descriptions file")
    captions: dict[str, list[str]] = {}
    if path.suffix.lower() == ".csv":
        with io.StringIO(_read_text(path), newline="") as f:
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or ())
            need = [c for c in ("VideoID", "Start", "End", "Description") if c not in columns]
            if need:
                raise DataError(f"{path}: missing column(s) {need} (MSVD corpus CSV: VideoID, Start, End, ..., "
                                "Language, Description)")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if "Language" in columns and (row["Language"] or "").strip().lower() != "english":
                    continue
                try:
                    start, end = int(row["Start"]), int(row["End"])
                except (TypeError, ValueError):
                    raise DataError(f"{where}: Start/End must be whole seconds, got {row['Start']!r}, "
                                    f"{row['End']!r}") from None
                text = (row["Description"] or "").strip()
                if not text:
                    raise DataError(f"{where}: empty English description for {row['VideoID']}")
                captions.setdefault(f"{row['VideoID']}_{start}_{end}", []).append(text)
    else:
        for n, line in enumerate(_read_text(path).splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 1)
            if len(parts) < 2 or not parts[1].strip():
                raise DataError(f"{path}:{n}: expected '<clip> <caption>', got {line[:80]!r}")
            if not _MSVD_CLIP.match(parts[0]):
                raise DataError(f"{path}:{n}: clip name {parts[0]!r} is not <youtube id>_<start>_<end>")
            captions.setdefault(parts[0], []).append(parts[1].strip())
    if not captions:
        raise DataError(f"{path}: no captions")
    return captions


def _read_mapping(mapping: str | Path) -> dict[str, int]:
    path = Path(mapping)
    if not path.is_file():
        raise DataError(f"{path}: no such mapping file")
    out: dict[str, int] = {}
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        m = _MAPPING_LINE.match(line.strip())
        if m is None:
            raise DataError(f"{path}:{n}: expected '<clip> vid<N>', got {line[:80]!r}")
        if m.group(1) in out:
            raise DataError(f"{path}:{n}: clip {m.group(1)!r} mapped twice")
        out[m.group(1)] = int(m.group(2))
    return out


def msvd_split_clips(descriptions: str | Path, clips: Iterable[str], *, mapping: str | Path | None = None,
                     sizes: Sequence[int] = MSVD_SIZES) -> dict[str, list[str]]:
    """``{split: clips}``: with ``mapping``, vid1..vid{sizes[0]} train and so on; without, ``clips`` in
    sorted order cut at ``sizes`` (their number must equal ``sum(sizes)``)."""
    if len(sizes) != 3 or any(int(s) < 0 for s in sizes):
        raise ConfigError(f"sizes={list(sizes)}: three counts (train, val, test)")
    edges = (sizes[0], sizes[0] + sizes[1], sum(sizes))
    clips = list(clips)
    if mapping is not None:
        numbers = _read_mapping(mapping)
        unmapped = [c for c in clips if c not in numbers]
        if unmapped:
            log.warning("[vision_ft] MSVD: %d clip(s) of %s are not in %s and are left out (first: %s)",
                        len(unmapped), descriptions, mapping, unmapped[:5])
        kept = set(clips)
        bare = [c for c in numbers if c not in kept]
        if bare:
            raise DataError(f"{mapping}: {len(bare)} mapped clip(s) have no captions in {descriptions} "
                            f"(first: {bare[:5]})")
        ordered = sorted((numbers[c], c) for c in clips if c in numbers)
        out = {s: [] for s in SPLITS}
        for n, c in ordered:
            if not 1 <= n <= edges[2]:
                raise DataError(f"{mapping}: clip {c!r} is vid{n}, outside vid1..vid{edges[2]} of sizes {list(sizes)}")
            out[SPLITS[0 if n <= edges[0] else 1 if n <= edges[1] else 2]].append(c)
        return out
    ordered = sorted(clips)
    if len(ordered) != edges[2]:
        raise DataError(f"{descriptions}: {len(ordered)} clips with captions (and videos), but the split "
                        f"{'/'.join(map(str, sizes))} needs {edges[2]}; give the published clip order "
                        "(mapping=youtube_mapping.txt), leave out clips without videos (missing='skip'), or set sizes")
    return {"train": ordered[:edges[0]], "val": ordered[edges[0]:edges[1]], "test": ordered[edges[1]:]}


def msvd_records(descriptions: str | Path, video_root: str | Path, split: Literal["train", "val", "test"], *,
                 prompt: str = DEFAULT_PROMPT, missing: Literal["error", "skip"] = "error",
                 mapping: str | Path | None = None, sizes: Sequence[int] = MSVD_SIZES) -> list[dict]:
    """MSVD clips of ``split`` as conversation records, in split order. Without ``mapping``, clips whose
    video is missing are left out *before* the sorted split when ``missing='skip'`` (the 1970 clips of the
    literature are those with a video in the released ``YouTubeClips`` archive)."""
    _check_split(split)
    return _msvd_splits(descriptions, video_root, prompt, missing, mapping, sizes)[split]


def _msvd_splits(descriptions: str | Path, video_root: str | Path, prompt: str, missing: str,
                 mapping: str | Path | None, sizes: Sequence[int]) -> dict[str, list[dict]]:
    captions = read_msvd(descriptions)
    clips = list(captions)
    found, absent = _with_videos(clips, video_root, missing, f"MSVD {descriptions}")
    gone = set(absent)
    parts = msvd_split_clips(descriptions, [c for c in clips if c not in gone] if mapping is None else clips,
                             mapping=mapping, sizes=sizes)
    log.info("[vision_ft] MSVD %s: split by %s: train %d, val %d, test %d", descriptions,
             f"the mapping {mapping}" if mapping is not None else "sorted clip names",
             *(len(parts[s]) for s in SPLITS))
    return {s: [caption_record(c, found[c], captions[c], prompt) for c in parts[s] if c in found] for s in SPLITS}


# --- conversion ------------------------------------------------------------------------------------

def convert_captions(dataset: Literal["msrvtt", "msvd"], annotations: str | Path | Sequence[str | Path],
                     video_root: str | Path, out_dir: str | Path, *, prompt: str = DEFAULT_PROMPT,
                     missing: Literal["error", "skip"] = "error", **options: Any) -> dict[str, Path]:
    """Writes ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` into ``out_dir`` and returns their paths;
    point ``data.init_args.train`` / ``val`` / ``test`` at them and ``data.init_args.image_root`` at
    ``video_root``. ``options``: ``mapping``, ``sizes`` (MSVD)."""
    if dataset == "msrvtt":
        if options:
            raise ConfigError(f"MSR-VTT takes no options {sorted(options)}")
        parts = _msrvtt_splits(annotations, video_root, SPLITS, prompt, missing)
    elif dataset == "msvd":
        if not isinstance(annotations, (str, Path)):
            raise ConfigError("MSVD reads one descriptions file")
        unknown = sorted(set(options) - {"mapping", "sizes"})
        if unknown:
            raise ConfigError(f"unknown MSVD option(s) {unknown}: mapping, sizes")
        parts = _msvd_splits(annotations, video_root, prompt, missing, options.get("mapping"),
                             options.get("sizes", MSVD_SIZES))
    else:
        raise ConfigError(f"dataset={dataset!r}: choose msrvtt or msvd")
    if missing not in ("error", "skip"):
        raise ConfigError(f"missing={missing!r}: choose error or skip")
    out = Path(out_dir)
    return {s: write_jsonl(parts[s], out / f"{s}.jsonl") for s in SPLITS}
