"""What an interrupted run needs besides the weights: the global RNG streams and the training
loaders' position inside the epoch (both saved in checkpoints, restored at ``on_train_start``)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain containers (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                       float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (dropout, drop-path, MoSA's expert draws continue)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_loader_states(loaders: Any, states: list[Any]) -> None:
    """Hand a checkpoint's position inside the epoch to the resumable training loaders.

    Lightning 2.6 restores loader states only when the loaders are built after the checkpoint
    is read, but ``estimated_stepping_batches`` (our LR schedule) builds them first; the
    loaders' iterators are lazy, so passing the state at ``on_train_start`` is still in time.
    """
    flat = loaders if isinstance(loaders, (list, tuple)) else (
        list(loaders.values()) if isinstance(loaders, dict) else [loaders])
    stateful = [dl for dl in flat if hasattr(dl, "load_state_dict") and hasattr(dl, "state_dict")]
    for loader, state in zip(stateful, states):
        loader.load_state_dict(state)
