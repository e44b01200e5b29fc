"""Multiple-choice questions in the TeleQnA layout, read from JSON, JSONL or the password-protected zip.

A TeleQnA file is one JSON object ``{"question 0": {...}, "question 1": {...}, ...}``; each question has
``question``, ``option 1`` ... ``option N`` (N from 2 to 5), ``answer`` written as ``"option k: text"``,
``explanation`` and ``category``. The same records one per line (``.jsonl``, each with an optional ``id``)
or as a JSON list are read too. The official archive is a WinZip-AES zip, which Python's ``zipfile``
cannot open: ``.zip`` files are read with ``pyzipper`` and the password from config.

Answers are kept as the option *number*: in the public file a few answers' text differs from the option's
text, so scoring compares numbers.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, DataError

log = logging.getLogger("vision_ft")

_ANSWER = re.compile(r"^\s*option\s*(\d+)\s*(?::|$)", re.IGNORECASE)
_OPTION = re.compile(r"^option (\d+)$")


@dataclass(frozen=True)
class MCQItem:
    """One question: ``answer`` is the 0-based index into ``options``."""

    id: str
    question: str
    options: tuple[str, ...]
    answer: int
    category: str = ""
    explanation: str = ""
    source: str = ""


def parse_item(key: str, record: Any, where: str) -> MCQItem:
    """One TeleQnA record; ``where`` (file and question key or line) goes into every error."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a question is a JSON object, got {type(record).__name__}")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: missing or empty 'question'")
    numbered = sorted((int(m.group(1)), k) for k in record if (m := _OPTION.match(k)))
    if not numbered:
        raise DataError(f"{where}: no options ('option 1', 'option 2', ...)")
    numbers = [n for n, _ in numbered]
    if numbers != list(range(1, len(numbers) + 1)):
        raise DataError(f"{where}: options must be numbered 1..N without gaps, got {numbers}")
    if len(numbers) < 2:
        raise DataError(f"{where}: a multiple-choice question needs at least 2 options")
    options = tuple(str(record[k]) for _, k in numbered)
    if any(not o.strip() for o in options):
        raise DataError(f"{where}: an option is empty")
    answer = record.get("answer")
    m = _ANSWER.match(answer) if isinstance(answer, str) else None
    if m is None:
        raise DataError(f"{where}: 'answer' must read 'option k: text', got {answer!r}")
    k = int(m.group(1))
    if not 1 <= k <= len(options):
        raise DataError(f"{where}: the answer names option {k}, but the question has options 1..{len(options)}")
    return MCQItem(id=str(record.get("id", key)), question=question, options=options, answer=k - 1,
                   category=str(record.get("category") or ""), explanation=str(record.get("explanation") or ""),
                   source=where)


def _load_text(path: Path, password: str | None) -> tuple[str, str]:
    """The JSON text of ``path`` and the name of the member read (zip archives)."""
    if path.suffix != ".zip":
        return path.read_text(encoding="utf-8"), path.name
    try:
        import pyzipper
    except ImportError:
        raise ConfigError(f"{path} is a zip archive (TeleQnA's is WinZip-AES encrypted): pip install pyzipper") from None
    try:
        with pyzipper.AESZipFile(path) as zf:
            members = [n for n in zf.namelist() if n.endswith((".txt", ".json", ".jsonl")) and not n.startswith("__")]
            if len(members) != 1:
                raise DataError(f"{path}: expected one .txt/.json/.jsonl question file inside, found {members}")
            if password:
                zf.setpassword(password.encode())
            try:
                return zf.read(members[0]).decode("utf-8"), members[0]
            except RuntimeError as e:  # encrypted without / with a wrong password
                raise DataError(f"{path}: cannot decrypt {members[0]} ({e}); set the archive password "
                                "(data.init_args.mcq_password)") from None
    except pyzipper.BadZipFile as e:
        raise DataError(f"{path}: not a readable zip archive ({e})") from None


def read_mcq(path: str | Path, password: str | None = None,
             on_bad: Literal["error", "skip"] = "error") -> tuple[list[MCQItem], list[str]]:
    """The questions of a TeleQnA-style file (``.json``/``.txt``, ``.jsonl`` or ``.zip``) and skipped errors."""
    if on_bad not in ("error", "skip"):
        raise ConfigError(f"on_bad={on_bad!r}: choose error or skip")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (data.init_args.test_mcq)")
    text, member = _load_text(path, password)
    label = f"{path}" if member == path.name else f"{path}!{member}"
    entries: list[tuple[str, Any, str]] = []
    stripped = text.lstrip()
    if path.suffix == ".jsonl" or member.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((f"line {n}", json.loads(line), f"{label}:{n}"))
                except json.JSONDecodeError as e:
                    entries.append((f"line {n}", DataError(f"{label}:{n}: not valid JSON ({e.msg})"), f"{label}:{n}"))
    else:
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise DataError(f"{label}:{e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict):
            entries = [(k, v, f"{label} [{k!r}]") for k, v in data.items()]
        elif isinstance(data, list):
            entries = [(f"item {i}", v, f"{label} [item {i}]") for i, v in enumerate(data)]
        else:
            raise DataError(f"{label}: expected an object of questions or a list")
    items, skipped = [], []
    for key, record, where in entries:
        try:
            if isinstance(record, DataError):
                raise record
            items.append(parse_item(key, record, where))
        except DataError as e:
            if on_bad == "error":
                raise
            skipped.append(str(e))
    if skipped:
        log.warning("[vision_ft] %s: %d bad question(s) skipped, first: %s", label, len(skipped), skipped[0])
    if not items:
        raise DataError(f"{label}: no usable questions")
    return items, skipped


def mcq_prompt(item: MCQItem, instruction: str = "Answer with the number and the text of the correct option.") -> str:
    """The user turn for ``item``: the question, its numbered options and the answering instruction."""
    lines = [item.question.strip(), *(f"option {k}: {text}" for k, text in enumerate(item.options, 1))]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)


def answer_text(item: MCQItem, k: int, answer_format: str = "option {k}: {text}") -> str:
    """The reply naming option ``k`` (0-based) in ``answer_format`` (``{k}`` 1-based, ``{text}``)."""
    return answer_format.format(k=k + 1, text=item.options[k])
