"""Checks of raw JSON values in COCO files (ids that must be integers, sizes that must be positive)."""

from __future__ import annotations

import math
from typing import Any


def as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_positive(value: Any) -> bool:
    return is_finite(value) and value > 0


def entry_ids(entries: list) -> set[int]:
    return {i for i in (as_int(e.get("id")) for e in entries if isinstance(e, dict)) if i is not None}
