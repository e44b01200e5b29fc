"""Multiple-choice scoring: option log-likelihoods, answer extraction from generated text, summaries.

Two modes:

- ``loglik`` (default): the log-probability of each option's reply given the prompt, summed over the
  reply's tokens (``mean``: divided by their number); the highest wins. Needs no parsing, so it is robust
  for small models.
- ``generate``: greedy generation, then :func:`extract_choice`: ``option k`` / ``option k: ...``, a bare
  number ``k``, or the exact text of one option. What cannot be read is wrong, and counted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..data.chat import IGNORE

_OPTION_K = re.compile(r"\boption\s*[:#]?\s*(\d+)\b", re.IGNORECASE)
_BARE_K = re.compile(r"^\s*[\(\[]?(\d+)[\)\]\.:]?(?:\s|$)")


def extract_choice(text: str, options: Sequence[str]) -> int | None:
    """The 0-based option an answer names, or ``None`` when it names none (or several).

    Rules, in order: the first ``option k`` (any case) with ``k`` in range; a reply that starts with a bare
    number ``k`` (``2``, ``(2)``, ``2.``, ``2:``); a reply whose text equals one option's text (ignoring case
    and surrounding punctuation/space) or contains exactly one option's text."""
    m = _OPTION_K.search(text)
    if m:
        k = int(m.group(1))
        return k - 1 if 1 <= k <= len(options) else None
    m = _BARE_K.match(text)
    if m:
        k = int(m.group(1))
        return k - 1 if 1 <= k <= len(options) else None
    norm = _norm(text)
    if not norm:
        return None
    exact = [i for i, o in enumerate(options) if _norm(o) == norm]
    if len(exact) == 1:
        return exact[0]
    inside = [i for i, o in enumerate(options) if _norm(o) and _norm(o) in norm]
    return inside[0] if len(inside) == 1 else None


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().strip(".:;,!?\"'").strip()).lower()


@torch.no_grad()
def option_logliks(logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], prompts: Sequence[list[int]],
                   continuations: Sequence[Sequence[list[int]]], pad_id: int, device: Any = None,
                   ) -> list[list[tuple[float, int]]]:
    """``(sum of log-probabilities, token count)`` of every continuation of every prompt, in one padded batch.

    ``logits_fn(input_ids, attention_mask)`` returns logits (B, L, V); ``prompts[i]`` are token ids and
    ``continuations[i][k]`` the ids of option ``k``'s reply."""
    rows, where = [], []
    for i, (prompt, conts) in enumerate(zip(prompts, continuations)):
        for k, cont in enumerate(conts):
            if not cont:
                raise ValueError(f"option {k + 1} of prompt {i} tokenises to nothing")
            rows.append((prompt + cont, len(prompt)))
            where.append((i, k))
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    target = torch.full_like(ids, IGNORE)
    for r, (seq, start) in enumerate(rows):
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        target[r, start: len(seq)] = torch.tensor(seq[start:])
    if device is not None:
        ids, mask, target = ids.to(device), mask.to(device), target.to(device)
    logp = torch.log_softmax(logits_fn(ids, mask)[:, :-1].float(), dim=-1)
    tgt = target[:, 1:]
    picked = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (tgt != IGNORE)
    sums, counts = picked.sum(-1).tolist(), (tgt != IGNORE).sum(-1).tolist()
    out: list[list[tuple[float, int]]] = [[] for _ in prompts]
    for (i, _k), s, n in zip(where, sums, counts):
        out[i].append((float(s), int(n)))
    return out


def choose(scores: Sequence[tuple[float, int]], normalise: str = "sum") -> int:
    """The option with the highest score: summed log-likelihood (``sum``) or per token (``mean``)."""
    values = [s if normalise == "sum" else s / max(n, 1) for s, n in scores]
    return max(range(len(values)), key=values.__getitem__)


def category_key(category: str) -> str:
    """A metric-name-safe form of a category (``Standards specifications`` -> ``standards_specifications``)."""
    return re.sub(r"[^a-z0-9]+", "_", category.lower()).strip("_") or "uncategorised"


def summarise(records: Sequence[dict[str, Any]], prefix: str = "test/") -> dict[str, float]:
    """``mcq_acc``, ``mcq_unparsed`` (count) and ``mcq_acc_<category>`` from per-question records
    (``pred`` is ``None`` when unparsed, which counts as wrong)."""
    if not records:
        return {}
    out = {f"{prefix}mcq_acc": sum(r["pred"] == r["answer"] for r in records) / len(records),
           f"{prefix}mcq_unparsed": float(sum(r["pred"] is None for r in records)),
           f"{prefix}mcq_count": float(len(records))}
    for cat in sorted({r["category"] for r in records if r["category"]}):
        rs = [r for r in records if r["category"] == cat]
        out[f"{prefix}mcq_acc_{category_key(cat)}"] = sum(r["pred"] == r["answer"] for r in rs) / len(rs)
    return out
