"""Per-sample records (answers, predictions) of every rank, each sample once: what corpus-level test metrics
(MCQ accuracy per category, CIDEr's document frequencies, box mAP) must be computed on under DDP."""

from __future__ import annotations

from typing import Any


def gather_records(world_size: int, records: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Every rank's ``records`` (all ranks must call it), in rank order, each ``record[key]`` once: a
    distributed sampler pads the last batches by repeating samples, which must not count twice."""
    if world_size == 1:
        return records
    import torch.distributed as dist

    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, records)
    seen, out = set(), []
    for part in parts:
        for r in part:
            if r[key] not in seen:
                seen.add(r[key])
                out.append(r)
    return out
