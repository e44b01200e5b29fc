"""Digests of tensors and the rank-safety checks built on them (DDP replicas, FSDP shards).

A digest names the exact values of a set of tensors; comparing it across ranks proves that the
replicas agree before one of them is written (``weights_digest`` in adapter.json) and that a
method's data-dependent set-up is the same everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch

from ..errors import TrainingError


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (16 hex digits) over names, shapes, dtypes and exact values."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class RankSafetyMixin:
    """Rank checks of :class:`~vision_ft.tasks.base.BaseTask` (mixed into the LightningModule)."""

    def _require_same_on_all_ranks(self, tensors: dict[str, torch.Tensor], message: str) -> str:
        """Digest of ``tensors``; raises :class:`TrainingError` on every rank if any rank's differs."""
        digest = tensor_digest(tensors)
        if self._trainer is not None and self.trainer.world_size > 1:
            reference = self.trainer.strategy.broadcast(digest, src=0)
            if self.trainer.strategy.reduce_boolean_decision(reference != digest, all=False):
                raise TrainingError(f"{message} (rank {self.trainer.global_rank}: {digest}, rank 0: {reference})")
        return digest

    def _differs_from_rank_zero(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether any rank's ``tensors`` differ from rank 0's (the same answer on every rank)."""
        strategy = self.trainer.strategy
        digest = tensor_digest(tensors)
        reference = strategy.broadcast(digest, src=0)
        return strategy.reduce_boolean_decision(reference != digest, all=False)

    def _sharded(self) -> bool:
        from lightning.pytorch.strategies import FSDPStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)

    def _full_parameters(self):
        """Context in which every parameter holds its full value on every rank (FSDP), else a no-op.

        Under FSDP each rank holds a shard: reading the adapter's tensors outside this
        context would write a silently sharded (or empty) adapter.
        """
        if not self._sharded():
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(self.trainer.strategy.model, writeback=False)
