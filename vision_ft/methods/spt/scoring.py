"""SPT stage 1: what is scored (:func:`score_sites`) and the sensitivity pass (:func:`sensitivity`)."""

from __future__ import annotations

import logging
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset, default_collate

from ...errors import ConfigError
from .. import sites as S
from ..base import run_device

if TYPE_CHECKING:  # pragma: no cover
    from ...backbones import Backbone
    from ...backbones.base import WeightRef

log = logging.getLogger("vision_ft")

NONE, SPARSE, STRUCTURED = 0, 1, 2
MATRIX_ROLES = ("q", "k", "v", "proj", "fc1", "fc2")


# --- what is scored ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoredTensor:
    """One scored tensor: a weight matrix (q k v proj fc1 fc2) or a vector (bias, norm affine).

    ``ref`` is the weight's site (where it lives, :class:`~vision_ft.backbones.base.WeightRef`);
    ``attr`` names the scored parameter of ``ref.module`` (the weight, or its bias) and the tensor is
    its rows ``start:stop`` (q, k, v inside a fused or packed projection; the whole tensor otherwise).
    """

    block: int  # -1: the final norm
    label: str  # "q", "fc1", "q.bias", "norm1.weight", ...
    ref: WeightRef
    attr: str  # the parameter name: "weight"/"in_proj_weight", or its bias
    start: int
    stop: int
    shape: tuple[int, ...]  # (d_out, d_in) for a matrix, (d,) for a vector

    @property
    def module(self) -> str:
        return self.ref.module

    @property
    def suffix(self) -> str:
        """``_q`` / ``_k`` / ``_v`` inside a packed projection, ``""`` otherwise."""
        return f"_{self.ref.key}" if self.ref.key else ""

    @property
    def matrix(self) -> bool:
        return len(self.shape) == 2

    @property
    def is_bias(self) -> bool:
        return self.attr != self.ref.param

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def tensor_name(self, prefix: str, part: str = "") -> str:
        """Name (inside the host module) of this tensor's delta: ``<prefix><attr><suffix><part>``."""
        return f"{prefix}{self.attr}{self.suffix}{part}"

    def site(self, model: nn.Module) -> S.Site:
        return S.Site(model, self.ref, self.label.split(".")[0], self.block)


def score_sites(backbone: Backbone, vectors: bool = True) -> list[ScoredTensor]:
    """The tensors SPT scores, in the official ``named_parameters`` order.

    Per block: norm1 (w, b), q, k, v (weight, bias), proj, norm2, fc1, fc2; then the
    final norm. Vectors only with ``vectors``; norms only when they are LayerNorms
    with an affine part; biases only where the layer has one.
    """
    out: list[ScoredTensor] = []

    def add_norm(block: int, key: str, module: nn.Module) -> None:
        if not vectors or not isinstance(module, nn.LayerNorm) or module.weight is None:
            return
        site = S.of_module(backbone, module, key, block)
        for attr in ("weight", "bias"):
            p = getattr(module, attr)
            if p is not None:
                out.append(ScoredTensor(block, f"{key}.{attr}", site.ref, attr, 0, p.numel(), (p.numel(),)))

    def add_linear(block: int, role: str) -> None:
        site = S.at(backbone, block, role)
        start, stop = site.start, site.stop
        out.append(ScoredTensor(block, role, site.ref, site.ref.param, start, stop,
                                (stop - start, site.in_features)))
        if vectors and site.bias is not None:
            out.append(ScoredTensor(block, f"{role}.bias", site.ref, site.ref.bias, start, stop, (stop - start,)))

    for i in range(backbone.num_blocks):
        norms = backbone.norms(i)
        add_norm(i, "norm1", norms["norm1"])
        for role in ("q", "k", "v", "proj"):
            add_linear(i, role)
        add_norm(i, "norm2", norms["norm2"])
        for role in ("fc1", "fc2"):
            add_linear(i, role)
    add_norm(-1, "norm", backbone.final_norm())
    return out


# --- stage 1: sensitivity ------------------------------------------------------------------------


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch (CPU + the scoring GPU), ``random`` and numpy; restore all afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _images_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    return batch[0], batch[1]


def sensitivity_batches(datamodule: Any, n_images: int, batch_size: int, seed: int
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``n_images`` training samples in batches of ``batch_size``, drawn with ``seed``.

    From the training loader's (map-style) dataset: a seeded permutation, collated
    with the loader's ``collate_fn``. Otherwise the first ``n_images`` the loader
    yields (re-batched). Call inside :func:`_seeded` so augmentations are seeded too.
    """
    loader_fn = getattr(datamodule, "train_dataloader", None)
    if loader_fn is None:
        raise ConfigError("SPT scores its parameters on training data: the datamodule needs a "
                          "train_dataloader() (fit with a LightningDataModule)")
    loader = loader_fn()
    dataset = getattr(loader, "dataset", None)
    collate = getattr(loader, "collate_fn", None) or default_collate
    if dataset is not None and not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__"):
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(dataset), generator=g)[:n_images].tolist()
        for s in range(0, len(order), batch_size):
            yield _images_labels(collate([dataset[i] for i in order[s:s + batch_size]]))
        return
    xs, ys, seen = [], [], 0
    for batch in loader:
        x, y = _images_labels(batch)
        xs.append(x[:n_images - seen])
        ys.append(y[:n_images - seen])
        seen += len(ys[-1])
        while sum(len(t) for t in ys) >= batch_size:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            yield x_all[:batch_size], y_all[:batch_size]
            xs, ys = [x_all[batch_size:]], [y_all[batch_size:]]
        if seen >= n_images:
            break
    if sum(len(t) for t in ys):
        yield torch.cat(xs), torch.cat(ys)


def sensitivity(task: Any, datamodule: Any, sites: list[ScoredTensor], n_images: int = 512, batch_size: int = 32,
                seed: int = 0) -> list[torch.Tensor]:
    """Per site, the flat scores ``sum_batches (dL/dw)^2`` (float32, on the scoring device).

    ``task(images)`` gives logits, ``task.loss(logits, labels)`` the batch-mean loss.
    Nothing of the task changes: no ``.grad`` is written, ``requires_grad`` and the
    train/eval modes are restored, the task returns to its device.
    """
    model = task.backbone.model
    hosts: dict[tuple[str, str], nn.Parameter] = {}
    for site in sites:
        key = (site.module, site.attr)
        if key not in hosts:
            hosts[key] = getattr(model.get_submodule(site.module), site.attr)
    params = list(hosts.values())
    position = {key: i for i, key in enumerate(hosts)}
    home = next(task.parameters()).device
    device = run_device(task, home)
    flags = [p.requires_grad for p in params]
    modes = {m: m.training for m in task.modules()}
    used, batches = 0, 0
    try:
        task.to(device)
        acc = [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in params]
        for p in params:
            p.requires_grad_(True)
        task.train()
        with _seeded(seed, device):
            for images, labels in sensitivity_batches(datamodule, n_images, batch_size, seed):
                loss = task.loss(task(images.to(device)), labels.to(device))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"SPT sensitivity: non-finite loss on batch {batches}")
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g.detach().float().square())
                used += len(labels)
                batches += 1
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.train(mode)
        task.to(home)
    if used == 0:
        raise ConfigError("SPT sensitivity: the training dataloader yielded no samples")
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:  # one allocation for all ranks
        for a in acc:
            torch.distributed.broadcast(a, src=0)
    log.info("SPT sensitivity: %d training images in %d batches on %s", used, batches, device)
    return [acc[position[(s.module, s.attr)]][s.start:s.stop].reshape(-1) for s in sites]
