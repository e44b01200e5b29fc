"""Instruction-tuning files to chat messages, with file-and-line errors.

Two layouts, one record per line (``.jsonl``) or a JSON list (``.json``):

- instruction: ``{"instruction": ..., "input": ... (optional), "response": ...}`` (``output`` is accepted for
  ``response``, as in Alpaca-style files); becomes one user turn (instruction, a blank line, input) and one
  assistant turn.
- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``: multi-turn, system
  prompts allowed.

Bad records (malformed JSON, missing or empty fields, unknown roles, no assistant turn, an empty assistant
turn) raise :class:`~vision_ft.errors.DataError` naming the file and line, or with ``on_bad: skip`` are
skipped and counted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, DataError
from .chat import ROLES, Messages

log = logging.getLogger("vision_ft")


def _records(path: Path) -> list[tuple[int, Any]]:
    """``(line, record)`` pairs; a malformed line yields ``(line, DataError)``."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json instruction file holds a list of records (or use .jsonl)")
        return [(i + 1, r) for i, r in enumerate(data)]  # record number stands in for the line
    out: list[tuple[int, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((n, DataError(f"{path}:{n}: not valid JSON ({e.msg})")))
    return out


def to_messages(record: Any, where: str, system_prompt: str | None = None) -> Messages:
    """One record (either layout) as chat messages; ``where`` (``file:line``) goes into every error."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record is a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: messages[{j}] needs 'role' and 'content'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: messages[{j}] has unknown role {m['role']!r} (roles: {', '.join(ROLES)})")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: messages[{j}].content must be text")
            if m["role"] == "assistant" and not m["content"].strip():
                raise DataError(f"{where}: messages[{j}] is an empty assistant turn")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: no assistant turn to learn from")
        if system_prompt and out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": system_prompt})
        return out
    instruction = record.get("instruction")
    response = record.get("response", record.get("output"))
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{where}: missing or empty 'instruction' (or give 'messages')")
    if not isinstance(response, str) or not response.strip():
        raise DataError(f"{where}: missing or empty 'response'")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: 'input' must be text")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    out = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    if system_prompt:
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def read_conversations(path: str | Path, system_prompt: str | None = None,
                       on_bad: Literal["error", "skip"] = "error") -> tuple[list[tuple[Messages, str]], list[str]]:
    """All records of ``path`` as ``(messages, "file:line")``, and the errors of skipped records."""
    if on_bad not in ("error", "skip"):
        raise ConfigError(f"on_bad={on_bad!r}: choose error or skip")
    path = Path(path)
    good, skipped = [], []
    for n, record in _records(path):
        where = f"{path}:{n}"
        try:
            if isinstance(record, DataError):
                raise record
            good.append((to_messages(record, where, system_prompt), where))
        except DataError as e:
            if on_bad == "error":
                raise
            skipped.append(str(e))
    if skipped:
        log.warning("[vision_ft] %s: %d bad record(s) skipped, first: %s", path, len(skipped), skipped[0])
    if not good:
        raise DataError(f"{path}: no usable records")
    return good, skipped
