"""Image and video conversations for vision-language fine-tuning: reading, label masks in token space, collation.

Layouts (JSON list or JSONL, one conversation per record; image and video paths relative to ``image_root``):

- LLaVA: ``{"image": "a.png"`` or ``"images": [...]`` and/or ``"video": "v.mp4"`` or ``"videos": [...],
  "conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\nWhat is shown?"}, ...]}``;
- messages: ``{"messages": [{"role": "user"|"assistant"|"system", "content": "<video>\\n..."}], "images": [...],
  "videos": [...]}``.

Each ``<image>`` / ``<video>`` tag becomes an image / video part of its turn (the number of tags must equal
the number of images / videos; text-only records have none). A video is a file or a folder of frames, sampled
by :mod:`vision_ft.data.vl_video`. ``references`` (a list of strings) holds every reference answer of the last
turn, for metrics with several references (captioning). Label masks: the text is the chat template's,
rendered once; for each supervised assistant turn the template is rendered up to that turn (with the
generation prompt) and through it, as for text models, and the spans are mapped to token positions by
replacing every image / video placeholder by the text the processor put in its place (its own replacement
strings, ``return_text_replacement_offsets``: image tokens, and for Qwen3-VL videos the frame timestamps
between them). The kit checks that its expansion tokenises to exactly the processor's ids, so a mask can never
be off by an image or a frame.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import ConfigError, DataError
from .chat import IGNORE, render
from .vl_video import VideoSampling, sample_video, temporal_patch_of

log = logging.getLogger("vision_ft")

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
_TAG_SPLIT = re.compile(r"(<image>|<video>)")
_FROM = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Conversation:
    """One record: chat messages whose content is a list of ``{"type": "text"|"image"|"video"}`` parts, its
    images and videos."""

    messages: list[dict[str, Any]]
    images: list[Path] = field(default_factory=list)
    source: str = ""
    #: grounding ground truth carried by the record: ``{"task": "detect"|"point"|"count", "objects":
    #: [{"bbox": [x1, y1, x2, y2] in original pixels, "label"}]}``
    grounding: dict[str, Any] | None = None
    videos: list[Path] = field(default_factory=list)
    #: every reference answer of the last turn (captioning: several per video); ``None``: the reply itself
    references: list[str] | None = None
    #: how frames are taken from the videos (set by the datamodule; default :class:`VideoSampling`)
    sampling: VideoSampling | None = None


def _parts(text: str, where: str, j: int) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    after_tag = False
    for piece in _TAG_SPLIT.split(text):
        if piece in (IMAGE_TAG, VIDEO_TAG):
            parts.append({"type": piece[1:-1]})
            after_tag = True
            continue
        piece = piece.lstrip("\n") if after_tag else piece
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _paths(record: dict[str, Any], many: str, one: str) -> list[Any]:
    value = record.get(many, record.get(one, []))
    return [value] if isinstance(value, str) else list(value or [])


def parse_record(record: Any, where: str, image_root: Path) -> Conversation:
    """A record of either layout as a :class:`Conversation`; ``where`` (``file:line``) is in every error."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record is a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: 'conversations' must be a non-empty list")
        raw = []
        for j, t in enumerate(turns):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise DataError(f"{where}: conversations[{j}] needs 'from' and 'value'")
            if t["from"] not in _FROM:
                raise DataError(f"{where}: conversations[{j}] has unknown speaker {t['from']!r} "
                                "(human, gpt, system)")
            raw.append((_FROM[t["from"]], t["value"]))
    elif "messages" in record:
        turns = record["messages"]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        raw = []
        for j, m in enumerate(turns):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: messages[{j}] needs 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant"):
                raise DataError(f"{where}: messages[{j}] has unknown role {m['role']!r} (system, user, assistant)")
            raw.append((m["role"], m["content"]))
    else:
        raise DataError(f"{where}: a record needs 'conversations' (LLaVA layout) or 'messages'")
    images, videos = _paths(record, "images", "image"), _paths(record, "videos", "video")
    messages = []
    for j, (role, content) in enumerate(raw):
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {j} content must be text (with <image> tags)")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: turn {j} is an empty assistant turn")
        if role == "assistant" and (IMAGE_TAG in content or VIDEO_TAG in content):
            raise DataError(f"{where}: turn {j}: images and videos go in user turns, not assistant replies")
        messages.append({"role": role, "content": _parts(content, where, j)})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn to learn from")
    for kind, paths in (("image", images), ("video", videos)):
        tags = sum(p["type"] == kind for m in messages for p in m["content"])
        if tags != len(paths):
            raise DataError(f"{where}: {tags} <{kind}> tag(s) but {len(paths)} {kind}(s)")
    references = record.get("references")
    if references is not None and (not isinstance(references, list) or not references
                                   or not all(isinstance(r, str) and r.strip() for r in references)):
        raise DataError(f"{where}: 'references' must be a non-empty list of non-empty strings")
    grounding = record.get("grounding")
    if grounding is not None:
        ok = (isinstance(grounding, dict) and grounding.get("task") in ("detect", "point", "count")
              and isinstance(grounding.get("objects"), list)
              and all(isinstance(o, dict) and len(o.get("bbox", [])) == 4 for o in grounding["objects"]))
        if not ok:
            raise DataError(f"{where}: 'grounding' needs task detect|point|count and objects with a 4-number bbox")
    return Conversation(messages, [image_root / str(p) for p in images], where, grounding,
                        videos=[image_root / str(p) for p in videos], references=references)


def read_records(path: str | Path, image_root: str | Path | None = None, on_bad: Literal["error", "skip"] = "error"
                 ) -> tuple[list[Conversation], list[str]]:
    """Every record of a ``.json`` list or ``.jsonl`` file, and the errors of skipped ones."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    root = Path(image_root) if image_root else path.parent
    text = path.read_text(encoding="utf-8")
    entries: list[tuple[str, Any]] = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json conversation file holds a list of records (or use .jsonl)")
        entries = [(f"{path}:{i + 1}", r) for i, r in enumerate(data)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    entries.append((f"{path}:{n}", DataError(f"{path}:{n}: not valid JSON ({e.msg})")))
    good, skipped = [], []
    for where, record in entries:
        try:
            if isinstance(record, DataError):
                raise record
            conv = parse_record(record, where, root)
            for img in conv.images:
                if not img.is_file():
                    raise DataError(f"{where}: image {img} not found (data.init_args.image_root)")
            for vid in conv.videos:
                if not vid.exists():
                    raise DataError(f"{where}: video {vid} not found (data.init_args.image_root)")
            good.append(conv)
        except DataError as e:
            if on_bad == "error":
                raise
            skipped.append(str(e))
    if skipped:
        log.warning("[vision_ft] %s: %d record(s) skipped, first: %s", path, len(skipped), skipped[0])
    if not good:
        raise DataError(f"{path}: no usable records")
    return good, skipped


def load_images(conv: Conversation, min_side: int = 14) -> list[Any]:
    from PIL import Image

    out = []
    for p in conv.images:
        try:
            with Image.open(p) as im:
                img = im.convert("RGB")
        except Exception as e:  # truncated or not an image
            raise DataError(f"{conv.source}: cannot read image {p} ({type(e).__name__}: {e})") from None
        if min(img.size) < min_side:
            raise DataError(f"{conv.source}: image {p} is {img.size[0]}x{img.size[1]}, smaller than one patch "
                            f"({min_side} px)")
        out.append(img)
    return out


def load_videos(conv: Conversation, processor: Any) -> list[Any]:
    """The conversation's videos as :class:`~vision_ft.data.vl_video.SampledVideo` (frames chosen, decoded)."""
    if not conv.videos:
        return []
    patch = temporal_patch_of(processor)
    return [sample_video(p, conv.sampling or VideoSampling(), patch, conv.source) for p in conv.videos]


def process(processor: Any, text: str, images: list[Any], videos: list[Any], **kwargs: Any) -> Any:
    """The processor on one conversation's text and media (one sample's images as one nested list, so
    LLaVA-OneVision tiles a lone image and keeps several at base resolution, as it counts their tokens;
    videos as the chosen frames with their metadata, never re-sampled)."""
    media: dict[str, Any] = {}
    if images:
        media["images"] = [images]
    if videos:
        media.update(videos=[v.frames for v in videos], do_sample_frames=False,
                     video_metadata=[v.metadata() for v in videos])
    return processor(text=[text], return_tensors="pt", **media, **kwargs)


def encode(processor: Any, conv: Conversation, train_on: Literal["all", "last"] = "all") -> dict[str, Any]:
    """Processor inputs for one conversation plus ``labels`` (ids inside supervised replies, ``-100`` elsewhere)."""
    tok = processor.tokenizer
    images, videos = load_images(conv), load_videos(conv, processor)
    full = render(tok, conv.messages)
    enc = process(processor, full, images, videos, return_text_replacement_offsets=True)
    offsets_list = enc.pop("text_replacement_offsets", None)
    replacements = list(offsets_list[0]) if offsets_list else []
    ids = enc["input_ids"][0].tolist()
    kinds = [r["type"] for r in replacements]
    if kinds.count("image") != len(images) or kinds.count("video") != len(videos):
        raise DataError(f"{conv.source}: the processor replaced {kinds.count('image')} image and "
                        f"{kinds.count('video')} video placeholder(s) for {len(images)} image(s) and {len(videos)} "
                        "video(s); media features and their tokens would not match")
    marks = {"image": getattr(processor, "image_token", IMAGE_TAG), "video": getattr(processor, "video_token", None)}

    def expand(text: str) -> str:
        """``text`` (a prefix of ``full``) with each placeholder replaced as the processor replaced it."""
        out, pos, k = [], 0, 0
        pattern = "|".join(re.escape(m) for m in marks.values() if m)
        for hit in re.finditer(pattern, text):
            out.append(text[pos:hit.start()])
            out.append(replacements[k]["replacement"])
            k, pos = k + 1, hit.end()
        out.append(text[pos:])
        return "".join(out)

    expanded = expand(full)
    mine = tok(expanded, add_special_tokens=False, return_offsets_mapping=True)
    if mine["input_ids"] != ids:
        raise ConfigError(f"{conv.source}: the processor's token ids differ from the chat text's (does the processor "
                          "add special tokens or rewrite the text?); label masks cannot be placed safely")
    offsets = mine["offset_mapping"]
    labels = [IGNORE] * len(ids)
    turns = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
    for i in turns[-1:] if train_on == "last" else turns:
        before = render(tok, conv.messages[:i], add_generation_prompt=True)
        through = render(tok, conv.messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise ConfigError("the chat template does not render a conversation's first turns as a prefix of the "
                              "whole text, so reply masks cannot be built from it; set backbone.init_args.chat_template")
        s, e = len(expand(before)), len(expand(through))
        for j, (a, b) in enumerate(offsets):  # a token overlapping the reply (" A" after "ASSISTANT:") is learned
            if b > s and a < e:
                labels[j] = ids[j]
    out = {k: v[0] if k in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids") else v
           for k, v in enc.items()}
    out["labels"] = torch.tensor(labels)
    return out


def collate_vl(samples: list[dict[str, Any]], pad_id: int, side: Literal["right", "left"] = "right") -> dict[str, Any]:
    """Padded batch: token tensors padded (labels with ``-100``) on ``side`` (``left`` for generation, so every
    prompt ends where the new tokens start), pixel tensors concatenated in order."""
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r}: right or left")
    width = max(len(s["input_ids"]) for s in samples)
    batch: dict[str, Any] = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE), ("mm_token_type_ids", 0),
                      ("token_type_ids", 0)):
        if key not in samples[0]:
            continue
        t = torch.full((len(samples), width), fill, dtype=samples[0][key].dtype)
        for i, s in enumerate(samples):
            if side == "right":
                t[i, : len(s[key])] = s[key]
            else:
                t[i, width - len(s[key]):] = s[key]
        batch[key] = t
    for key in ("pixel_values", "image_grid_thw", "image_sizes", "batch_num_images", "pixel_values_videos",
                "video_grid_thw", "second_per_grid_ts"):
        parts = [s[key] for s in samples if key in s]
        if not parts:
            continue
        if key == "pixel_values_videos" and parts[0].dim() == 5 and len({p.shape[1] for p in parts}) > 1:
            raise DataError(f"videos of {sorted({p.shape[1] for p in parts})} frames in one batch: this model's video "
                            "inputs are frame tensors that cannot be padded; set data.init_args.video_frames so "
                            "every video gives the same number of frames")
        if key == "pixel_values" and parts[0].dim() == 5:
            # any-resolution tiles (LLaVA-OneVision): (images, tiles, C, H, W), tile counts differ per image;
            # zero tiles pad to the widest, the model keeps each image's own count from ``image_sizes``
            tiles = max(p.shape[1] for p in parts)
            parts = [torch.cat([p, p.new_zeros(p.shape[0], tiles - p.shape[1], *p.shape[2:])], dim=1)
                     if p.shape[1] < tiles else p for p in parts]
        batch[key] = torch.cat(parts, dim=0)
    return batch
