"""COCO category ids (arbitrary, often with gaps) <-> the contiguous indices ``0..K-1`` a model needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ...errors import DataError
from ._values import as_int


@dataclass(frozen=True)
class CategoryMap:
    """COCO category ids (sorted) ↔ contiguous indices ``0..K-1``, with names."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_categories(cls, categories: Sequence[dict], source: str = "") -> "CategoryMap":
        if not categories:
            raise DataError(f"{source}: 'categories' is empty; a detection dataset needs at least one category")
        seen: dict[int, str] = {}
        for c in categories:
            if not isinstance(c, dict) or "id" not in c:
                raise DataError(f"{source}: every category needs an 'id' (got {c!r})")
            cid = as_int(c["id"])
            if cid is None:
                raise DataError(f"{source}: category id {c['id']!r} is not an integer")
            if cid in seen:
                raise DataError(f"{source}: category id {cid} appears twice in 'categories'")
            seen[cid] = str(c.get("name", cid))
        ids = tuple(sorted(seen))
        return cls(ids, tuple(seen[i] for i in ids))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def index(self) -> dict[int, int]:
        return {cid: i for i, cid in enumerate(self.ids)}

    def to_index(self, category_ids: Sequence[int]) -> list[int]:
        index = self.index
        return [index[int(c)] for c in category_ids]

    def to_category_id(self, indices: Sequence[int]) -> list[int]:
        return [self.ids[int(i)] for i in indices]
