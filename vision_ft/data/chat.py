"""Chat conversations to token ids with label masks the kit builds itself, plus packing and collation.

Shared by every language-model task (text SFT now, the vision-language tasks next). The rules:

- The text is the tokenizer's own chat template, rendered once for the whole conversation; training,
  export and prediction use that same template (the export writes it with the tokenizer).
- Supervised spans are found by rendering prefixes: for assistant turn ``i``, the text of turns ``< i``
  with the generation prompt and the text of turns ``<= i``; the span between them is the assistant's
  reply *including* its end-of-turn token (the model must learn to stop). A template that does not
  render prefixes of a conversation as prefixes of its text is refused with a clear error.
- Labels are ``-100`` outside the spans and the token id inside, aligned with ``input_ids`` (not
  shifted: the loss shifts once). Masks never come from the pad id: many chat models pad with their
  end-of-turn token, which must stay supervised where it ends a reply.
- Too long for ``max_length``: ``drop`` (counted and reported), ``truncate`` (right; kept while a
  supervised token remains) or ``error``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import ConfigError, DataError

IGNORE = -100
ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


def render(tokenizer: Any, messages: Messages, add_generation_prompt: bool = False) -> str:
    """The chat template's text for ``messages`` (a clear error where the tokenizer has no template)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the tokenizer has no chat template: set backbone.init_args.chat_template to a Jinja "
                          "template (or 'chatml'), the one training, export and prediction will share")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: Any, messages: Messages, train_on: Literal["all", "last"] = "all"
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans ``[start, end)`` of the supervised replies."""
    full = render(tokenizer, messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    spans = []
    for i in turns:
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise ConfigError("the chat template does not render a conversation's first turns as a prefix of the "
                              "whole text (it rewrites earlier turns), so reply masks cannot be built from it; set "
                              "backbone.init_args.chat_template to one that does")
        if len(through) > len(before):
            spans.append((len(before), len(through)))
    return full, spans


def tokenize_conversation(tokenizer: Any, messages: Messages, train_on: Literal["all", "last"] = "all"
                          ) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: labels are the ids of tokens overlapping the supervised spans, ``-100`` elsewhere."""
    text, spans = assistant_spans(tokenizer, messages, train_on)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        # a token overlapping a reply is learned (a template whose prompt ends in a space merges it into the
        # reply's first token)
        labels = [t if any(b > s and a < e for s, e in spans) else IGNORE for t, (a, b) in zip(ids, offsets)]
        return list(ids), labels
    # slow tokenizers have no offsets: tokenise the pieces between span boundaries separately
    ids, labels, pos = [], [], 0
    for s, e in spans:
        for piece, supervised in ((text[pos:s], False), (text[s:e], True)):
            if piece:
                part = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += part
                labels += part if supervised else [IGNORE] * len(part)
        pos = e
    if text[pos:]:
        part = tokenizer(text[pos:], add_special_tokens=False)["input_ids"]
        ids += part
        labels += [IGNORE] * len(part)
    return ids, labels


@dataclass
class Tokenized:
    """Tokenised samples of one split and what was left out."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_all(tokenizer: Any, conversations: Sequence[tuple[Messages, str]], max_length: int,
                 on_overlength: Literal["drop", "truncate", "error"] = "drop",
                 train_on: Literal["all", "last"] = "all") -> Tokenized:
    """Tokenise ``(messages, source)`` pairs (``source``: ``file:line``) under the length policy."""
    if on_overlength not in ("drop", "truncate", "error"):
        raise ConfigError(f"on_overlength={on_overlength!r}: choose drop, truncate or error")
    out = Tokenized()
    for messages, source in conversations:
        ids, labels = tokenize_conversation(tokenizer, messages, train_on)
        if len(ids) > max_length:
            if on_overlength == "error":
                raise DataError(f"{source}: {len(ids)} tokens > max_length={max_length} (data.init_args.max_length; "
                                "or on_overlength: drop / truncate)")
            if on_overlength == "drop" or all(x == IGNORE for x in labels[:max_length]):
                out.dropped.append(source)
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            out.truncated += 1
        if all(x == IGNORE for x in labels):
            out.dropped.append(source)
            continue
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.sources.append(source)
    return out


def pack(samples: Tokenized, max_length: int) -> list[list[int]]:
    """Greedy first-fit packing in sample order: lists of sample indices whose lengths sum to ``<= max_length``."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, ids in enumerate(samples.input_ids):
        n = len(ids)
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


def collate(rows: Sequence[Sequence[tuple[list[int], list[int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch rows, each one or more ``(input_ids, labels)`` samples (several = packed), padded on the right.

    One sample per row: ``attention_mask`` marks the padding. Packed rows: ``position_ids`` restart at 0 for
    each sample (and for the padding tail) and no ``attention_mask`` is given, so transformers builds a
    block-diagonal causal mask: no token attends across samples.
    """
    packed = any(len(r) > 1 for r in rows)
    width = max(sum(len(ids) for ids, _ in r) for r in rows)
    ids_t = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels_t = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for ids, labels in row:
            n = len(ids)
            ids_t[b, at: at + n] = torch.tensor(ids)
            labels_t[b, at: at + n] = torch.tensor(labels)
            mask[b, at: at + n] = 1
            pos[b, at: at + n] = torch.arange(n)
            at += n
        pos[b, at:] = torch.arange(width - at)  # the padding tail is its own segment
    if packed:
        return {"input_ids": ids_t, "labels": labels_t, "position_ids": pos}
    return {"input_ids": ids_t, "labels": labels_t, "attention_mask": mask}


def shifted_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over supervised positions, and the number of them.

    Logits at position ``t`` predict the token at ``t + 1``: the one shift happens here, on the labels (shifted
    left, ``-100`` appended) rather than on the logits, whose sliced copy would cost a (B, L, V) tensor."""
    target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    n = (target != IGNORE).sum()
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    return loss / n.clamp(min=1), n
