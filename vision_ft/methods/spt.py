"""SPT: Sensitivity-aware visual Parameter-efficient fine-Tuning (He et al., ICCV 2023).

Two stages (paper Sec. 3; official code ``ziplab/SPT``: ``engine.get_sensitivity``,
``model/vision_transformer_timm.py``; METHODS.md card "SPT"):

1. **Sensitivity** (paper Sec. 3.1, "parameter sensitivity"; first-order Taylor
   estimate of the loss drop from tuning one parameter): on ``n_images`` training
   images (16 batches x 32) with the task's head as initialised (random) and the
   model in train mode, every weight ``w`` of q, k, v, proj, fc1, fc2 (and, with
   ``vectors``, every bias and LayerNorm entry of the blocks and the final norm)
   gets ``s(w) = sum_batches (dL/dw)^2`` of the batch-mean loss. q, k, v are the
   row blocks of timm's fused ``qkv`` (:class:`~vision_ft.backbones.PackedSlice`).
   The backbone is left unchanged: gradients come from ``torch.autograd.grad`` (no
   ``.grad`` written, no optimiser), ``requires_grad`` and train/eval modes are
   restored, the RNGs are forked and seeded.
2. **Allocation** (paper Sec. 3.2, Algorithm 1): take the weights whose score is
   at least ``tau`` (global top-tau over all scored tensors). A matrix holding
   ``c >= P_mod / alpha`` of them gets a structured module (LoRA:
   ``P_mod = r (d_in + d_out)``; Adapter: ``P_mod = 2 r d_out + r + d_out``), costing
   ``P_mod``; any other matrix has exactly its ``c`` selected entries tuned
   (unstructured sparse delta), costing ``c``. A vector holding ``c >= d / beta`` is
   tuned whole (``d``), otherwise its ``c`` entries (official ``--structured_vector``
   trick). The class token and the head are always trained; patch and position
   embeddings stay frozen. ``tau`` is the smallest threshold whose total fits the
   ``budget`` (bisection on the float32 bit pattern, exact). The slack this leaves
   (less than one structured module) is then filled by going on down the global
   ranking: an entry of a tensor still below its threshold is taken (cost 1), one
   that would make its tensor structured is taken only if the whole module fits in
   the slack (else that tensor is closed). The realised count thus equals the
   budget unless every remaining move would overshoot it (tiny budgets, or
   everything selected), and the final selection still satisfies the rule
   "structured iff ``c >= P_mod / alpha``".

Modules (every tensor named with the method prefix, registered on the timm
modules it acts on, applied by forward hooks; the model keeps its type):

* SPT-LoRA (card; official ``BlockSPTParallel``): ``h = W x + DropPath(B A Dropout(x))``,
  no ``alpha / r`` scaling, ``A`` Kaiming-uniform (``a = sqrt 5``), ``B = 0``.
* SPT-Adapter (card; official ``BlockSPTSeq``): sequential on the matrix output,
  ``h <- h + DropPath(U GELU(D Dropout(h)))``, ``D`` Kaiming-uniform with the
  ``nn.Linear`` default bias, ``U`` weight and bias 0.
* For q / k / v the module acts on that slice of the fused ``qkv`` output.
* Unstructured delta: ``y = x (W + scatter(delta))^T + b`` with ``delta`` (k,) zero at
  init; computed as ``x W^T + b + Delta(x)`` by :mod:`vision_ft.methods._sparse`
  (gradient ``sum_t g[t,i] x[t,j]`` at the k selected pairs only; O(T k), not the
  official O(k^2) matrix).
* Vectors: an additive delta on the bias (``y + db``) or on the LayerNorm affine
  (``y + dw * xhat + db``), whole or at the selected entries.
* Class token: a delta ``spt_*_cls_token`` added to token 0 by a pre-hook on
  ``pos_drop`` (before the dropout, as the token itself would be), so the trained
  token is ``cls_token + delta`` while ``cls_token`` keeps its name and stays frozen
  (the contract: only prefixed tensors train).

The allocation is stored in the backbone as prefixed buffers: ``<prefix>allocation``
(one code per scored tensor, 0 none / 1 sparse / 2 structured, in :func:`score_sites`
order) and ``<...>_index`` (the selected entries), so adapters and Lightning
checkpoints hold it and :meth:`load_adapter` rebuilds the modules without scoring.

Differences from the official code (choices or bug fixes):

* Sensitivity images: a seeded random subset of the training set (the official
  loader reads the first ``16 x 32`` training images in file order).
* The slack fill above (the official sweeps the top-k count in steps of 0.02M and
  keeps the configuration closest to each budget, so its budgets are approximate).
* Unstructured LayerNorm entries are trained (the official counts them in the
  budget but only replaces ``nn.Linear`` layers, so they stay frozen).
* The q/k/v deltas act on slices of timm's fused ``qkv``; the official model
  splits it into three ``nn.Linear`` (same function).
* SPT-Adapter on ``proj``: sequential on its output as the card says; the official
  ``AttentionSPTSeq`` feeds the proj *input* to that adapter (parallel). Dropout on
  the structured input is applied to every module (the official skips it for proj).
* One dropout draw per module (the official shares one draw of ``x`` among q, k, v).
* Weight decay follows the kit: none on 1-D tensors and on the class-token delta
  (the official: none on 1-D tensors, biases and ``cls_token``) -- the same sets.
* The official adapter scripts read the *LoRA* sensitivity files
  (``sensitivity_spt_supervised_lora_a10``) for SPT-Adapter; here each variant
  allocates with its own ``P_mod``.

Cost: the sensitivity stage is ``n_images`` forward+backward passes (seconds on a
GPU for ViT-B/16) plus a sort of the scores (85M floats on ViT-B/16: ~1 GB of
temporary memory on the scoring device). SPT-LoRA merges exactly
(``W' = W + B A + scatter(delta)``, biases / norms / class token likewise) and then
costs nothing at inference. SPT-Adapter cannot merge; unmerged, each structured
matrix adds ``2 r d_out`` multiply-adds per token (+ a GELU), each sparse matrix
``k``, each vector delta ``d`` adds: at a 0.4M budget on ViT-B/16 (197 tokens) at
most ~0.4M MACs per token, i.e. <= 80 MMACs per image over 17.6 GMACs (<= 0.5%),
plus a few small kernels per adapted site (launch overhead dominates at batch 1).
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.data import IterableDataset, default_collate

from ..backbones import Backbone, PackedSlice
from ..errors import AdapterError, ConfigError
from ._sparse import dense_delta, sparse_delta
from .base import Method, run_device
from .registry import register

log = logging.getLogger("vision_ft")

_KEY = "model.init_args.method.init_args"
NONE, SPARSE, STRUCTURED = 0, 1, 2
MATRIX_ROLES = ("q", "k", "v", "proj", "fc1", "fc2")


# --- what is scored ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    """One scored tensor: a weight matrix (q k v proj fc1 fc2) or a vector (bias, norm affine).

    ``module`` / ``attr`` name the host parameter inside ``backbone.model``; the site is
    its rows ``start:stop`` (q, k, v inside the fused ``qkv``; the whole tensor otherwise).
    """

    block: int  # -1: the final norm
    label: str  # "q", "fc1", "q.bias", "norm1.weight", ...
    module: str
    attr: str  # "weight" or "bias"
    suffix: str  # "_q" / "_k" / "_v" inside a packed qkv, "" otherwise
    start: int
    stop: int
    shape: tuple[int, ...]  # (d_out, d_in) for a matrix, (d,) for a vector

    @property
    def matrix(self) -> bool:
        return len(self.shape) == 2

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def tensor_name(self, prefix: str, part: str = "") -> str:
        """Name (inside the host module) of this site's delta: ``<prefix><attr><suffix><part>``."""
        return f"{prefix}{self.attr}{self.suffix}{part}"


def score_sites(backbone: Backbone, vectors: bool = True) -> list[Site]:
    """The tensors SPT scores, in the official ``named_parameters`` order.

    Per block: norm1 (w, b), q, k, v (weight, bias), proj, norm2, fc1, fc2; then the
    final norm. Vectors only with ``vectors``; norms only when they are LayerNorms
    with an affine part; biases only where the layer has one.
    """
    model = backbone.model
    names = {id(m): n for n, m in model.named_modules()}
    sites: list[Site] = []

    def add_norm(block: int, key: str, module: nn.Module) -> None:
        if not vectors or not isinstance(module, nn.LayerNorm) or module.weight is None:
            return
        for attr in ("weight", "bias"):
            p = getattr(module, attr)
            if p is not None:
                sites.append(Site(block, f"{key}.{attr}", names[id(module)], attr, "", 0, p.numel(), (p.numel(),)))

    def add_linear(block: int, role: str) -> None:
        lin = backbone.linear(block, role)
        if isinstance(lin, PackedSlice):
            host, name, start, stop, suffix = lin.linear, lin.name, lin.start, lin.stop, f"_{role}"
        else:
            host, name, start, stop, suffix = lin, backbone.module_name(block, role), 0, lin.out_features, ""
        sites.append(Site(block, role, name, "weight", suffix, start, stop, (stop - start, host.in_features)))
        if vectors and host.bias is not None:
            sites.append(Site(block, f"{role}.bias", name, "bias", suffix, start, stop, (stop - start,)))

    for i in range(backbone.num_blocks):
        norms = backbone.norms(i)
        add_norm(i, "norm1", norms["norm1"])
        for role in ("q", "k", "v", "proj"):
            add_linear(i, role)
        add_norm(i, "norm2", norms["norm2"])
        for role in ("fc1", "fc2"):
            add_linear(i, role)
    add_norm(-1, "norm", backbone.final_norm())
    return sites


def _cls_host(model: nn.Module) -> str | None:
    """The module whose input starts with the class token: ``pos_drop`` (``norm_pre`` without pos-embed)."""
    if getattr(model, "cls_token", None) is None:
        return None
    if getattr(model, "pos_embed", None) is not None and isinstance(getattr(model, "pos_drop", None), nn.Module):
        return "pos_drop"
    if isinstance(getattr(model, "norm_pre", None), nn.Module):
        return "norm_pre"
    return None


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


def sensitivity(task: Any, datamodule: Any, sites: list[Site], n_images: int = 512, batch_size: int = 32,
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


# --- stage 2: allocation -------------------------------------------------------------------------
def _float(bits: int) -> float:
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


def _bits(value: float) -> int:
    return int(np.array([value], dtype=np.float32).view(np.int32)[0])


@dataclass
class Allocation:
    """Result of :func:`allocate`: per site a mode and a count of selected entries."""

    modes: list[int]
    counts: list[int]  # selected entries (after the fill); for structured sites: the top-tau count
    tau: float
    total: int  # trainable parameters of the allocation (structured: P_mod; sparse: count)


def allocate(desc_scores: list[torch.Tensor], costs: list[int], ratios: list[float], budget: int) -> Allocation:
    """Global top-tau selection under ``budget`` (Algorithm 1 of the paper, exact).

    Args:
        desc_scores: per site, its scores sorted in descending order (1-D, >= 0).
        costs: per site, the cost of tuning it whole (``P_mod``, or ``d`` for a vector).
        ratios: per site, ``alpha`` (matrices) or ``beta`` (vectors): a site holding at
            least ``cost / ratio`` of the selected weights is tuned whole.
        budget: parameters to spend.
    """
    thresholds = [c / r for c, r in zip(costs, ratios)]
    ascending = [(-s).contiguous() for s in desc_scores]

    def counts_at(tau: float) -> list[int]:
        out = []
        for a in ascending:
            value = torch.tensor([-tau], dtype=a.dtype, device=a.device)
            out.append(int(torch.searchsorted(a, value, right=True)[0]) if a.numel() else 0)
        return out

    def total(counts: list[int]) -> int:
        return sum(cost if c >= t else c for c, cost, t in zip(counts, costs, thresholds))

    top = max((float(s[0]) for s in desc_scores if s.numel()), default=0.0)
    lo, hi = 0, _bits(top) + 1  # hi: tau above every score, nothing selected (total 0)
    while lo < hi:  # smallest tau (most weights) whose total fits the budget
        mid = (lo + hi) // 2
        if total(counts_at(_float(mid))) <= budget:
            hi = mid
        else:
            lo = mid + 1
    tau = _float(lo)
    counts = counts_at(tau)
    slack = budget - total(counts)
    # Fill the slack: continue down the global ranking over the tensors still below their
    # threshold; an entry that would make its tensor structured is taken only if the whole
    # module fits in what is left (otherwise that tensor is closed). Only the entries a tensor
    # can still take before its threshold matter, so each contributes a short window.
    windows: dict[int, list[float]] = {}
    for m, (s, c, t) in enumerate(zip(desc_scores, counts, thresholds)):
        if c < t and c < s.numel() and slack > 0:
            windows[m] = s[c:min(s.numel(), math.ceil(t), c + slack + 1)].tolist()
    heap = [(-w[0], m, 0) for m, w in windows.items()]
    heapq.heapify(heap)
    while slack > 0 and heap:
        _, m, pos = heapq.heappop(heap)
        c = counts[m]
        if c + 1 >= thresholds[m]:  # this entry makes the tensor structured
            if costs[m] - c <= slack:
                slack -= costs[m] - c
                counts[m] = c + 1
            continue
        counts[m] = c + 1
        slack -= 1
        if pos + 1 < len(windows[m]):
            heapq.heappush(heap, (-windows[m][pos + 1], m, pos + 1))
    modes = [STRUCTURED if c >= t else SPARSE if c > 0 else NONE for c, t in zip(counts, thresholds)]
    return Allocation(modes, counts, tau, total(counts))


# --- the modules ---------------------------------------------------------------------------------
class SPTLoRAModule(nn.Module):
    """``DropPath(B A Dropout(x))`` with ``A`` (r, d_in) Kaiming-uniform, ``B`` (d_out, r) zero."""

    def __init__(self, d_in: int, d_out: int, r: int, dropout: float, drop_path: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, r))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(F.linear(F.linear(self.dropout(x), self.A), self.B))

    def delta_weight(self) -> torch.Tensor:
        return self.B @ self.A


class SPTAdapterModule(nn.Module):
    """``DropPath(U GELU(D Dropout(h)))``; ``D`` as ``nn.Linear`` inits it, ``U`` zero."""

    def __init__(self, d: int, r: int, dropout: float, drop_path: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(d)
            self.down.bias.uniform_(-bound, bound, generator=generator)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.up(self.act(self.down(self.dropout(h)))))


# --- hooks (module level, bound with functools.partial: deepcopy / pickle work) -------------------
@dataclass(frozen=True)
class _LinearSpec:
    prefix: str
    kind: str  # "lora" | "adapter"
    roles: tuple[tuple[str, int, int], ...]  # (suffix, start, stop) of the adapted output slices


def _vector(params: dict, buffers: dict, name: str, size: int) -> torch.Tensor | None:
    """A vector delta: the whole ``name`` or ``name_delta`` scattered at ``name_index``."""
    full = params.get(name)
    if full is not None:
        return full
    values = params.get(f"{name}_delta")
    if values is None:
        return None
    zeros = torch.zeros(size, dtype=values.dtype, device=values.device)
    return zeros.index_add(0, buffers[f"{name}_index"], values)


def _role_output(spec: _LinearSpec, module: nn.Module, suffix: str, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    p, b = module._parameters, module._buffers
    bias = _vector(p, b, f"{spec.prefix}bias{suffix}", h.shape[-1])
    if bias is not None:
        h = h + bias
    values = p.get(f"{spec.prefix}weight{suffix}_delta")
    if values is not None:
        h = h + sparse_delta(x, values, b[f"{spec.prefix}weight{suffix}_index"], h.shape[-1])
    structured = module._modules.get(f"{spec.prefix}module{suffix}")
    if structured is not None:
        h = h + structured(x if spec.kind == "lora" else h)
    return h


def _linear_hook(spec: _LinearSpec, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    x = args[0]
    width = out.shape[-1]
    if len(spec.roles) == 1 and spec.roles[0][1:] == (0, width):
        return _role_output(spec, module, spec.roles[0][0], x, out)
    pieces, prev = [], 0
    for suffix, start, stop in spec.roles:
        if start > prev:
            pieces.append(out[..., prev:start])
        pieces.append(_role_output(spec, module, suffix, x, out[..., start:stop]))
        prev = stop
    if prev < width:
        pieces.append(out[..., prev:])
    return torch.cat(pieces, dim=-1)


def _norm_hook(prefix: str, module: nn.LayerNorm, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    p, b = module._parameters, module._buffers
    size = module.normalized_shape[-1]
    dw = _vector(p, b, f"{prefix}weight", size)
    db = _vector(p, b, f"{prefix}bias", size)
    if dw is not None:  # (w + dw) xhat + b = y + dw xhat
        out = out + F.layer_norm(args[0], module.normalized_shape, None, None, module.eps) * dw
    if db is not None:
        out = out + db
    return out


def _cls_hook(prefix: str, module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    delta = module._parameters[f"{prefix}cls_token"]
    return (torch.cat([x[:, :1] + delta, x[:, 1:]], dim=1),) + tuple(args[1:])


_HOOKS = (_linear_hook, _norm_hook, _cls_hook)


def _hook_prefix(fn: Any) -> str | None:
    if not isinstance(fn, partial) or fn.func not in _HOOKS or not fn.args:
        return None
    first = fn.args[0]
    return first.prefix if isinstance(first, _LinearSpec) else first


# --- the methods ---------------------------------------------------------------------------------
class _SPT(Method):
    """Shared logic of :class:`SPTLoRA` and :class:`SPTAdapter` (see the module docstring)."""

    requires_data = True
    zero_init = True
    #: structured module: "lora" or "adapter"
    kind: ClassVar[str] = ""
    kind_label: ClassVar[str] = ""

    def __init__(
        self,
        budget: int = 400_000,
        r: int = 8,
        alpha: float = 10.0,
        beta: float = 5.0,
        vectors: bool = True,
        dropout: float = 0.1,
        drop_path: float = 0.1,
        n_images: int = 512,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        for arg, value in (("budget", budget), ("r", r), ("n_images", n_images), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{_KEY}.{arg} must be a positive integer, got {value!r}")
        for arg, value in (("alpha", alpha), ("beta", beta)):
            if not value > 0:
                raise ConfigError(f"{_KEY}.{arg} must be > 0, got {value!r}")
        for arg, value in (("dropout", dropout), ("drop_path", drop_path)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{_KEY}.{arg} must be in [0, 1), got {value!r}")
        self.budget, self.r, self.alpha, self.beta, self.vectors = budget, r, float(alpha), float(beta), vectors
        self.dropout, self.drop_path = float(dropout), float(drop_path)
        self.n_images, self.batch_size, self.seed = n_images, batch_size, seed
        #: after prepare / load_adapter: the realised trainable count, tau, the summary table
        self.realised_budget: int | None = None
        self.tau: float | None = None
        self.summary: str = ""

    # --- costs and modules ------------------------------------------------------------------------
    def structured_cost(self, d_out: int, d_in: int) -> int:
        """``P_mod`` of one structured module on a ``d_out x d_in`` matrix."""
        raise NotImplementedError

    def make_module(self, d_out: int, d_in: int, generator: torch.Generator | None) -> nn.Module:
        raise NotImplementedError

    def site_costs(self, sites: list[Site]) -> tuple[list[int], list[float]]:
        costs = [self.structured_cost(*s.shape) if s.matrix else s.numel for s in sites]
        ratios = [self.alpha if s.matrix else self.beta for s in sites]
        return costs, ratios

    @staticmethod
    def fixed_parameters(backbone: Backbone) -> int:
        """Always trained whatever the scores: the class token (its delta)."""
        model = backbone.model
        return model.cls_token.numel() if _cls_host(model) is not None else 0

    # --- life cycle ---------------------------------------------------------------------------------
    def apply(self, backbone: Backbone) -> None:
        """Freeze everything: the modules come from :meth:`prepare` or :meth:`load_adapter`."""
        self.freeze_and_mark(backbone)
        self.applied = True

    def prepare(self, task: Any, datamodule: Any) -> None:
        """Score on training data, allocate the budget, build the modules (deterministic given ``seed``)."""
        backbone = task.backbone
        fixed = self.fixed_parameters(backbone)
        if self.budget <= fixed:
            raise ConfigError(f"{_KEY}.budget={self.budget} does not exceed the always-trained class "
                              f"token ({fixed} parameters)")
        if self.allocation_codes(backbone) is not None:
            log.warning("SPT: prepare() called on a prepared model; its allocation is replaced")
            self.teardown(backbone)
        sites = score_sites(backbone, self.vectors)
        scores = sensitivity(task, datamodule, sites, self.n_images, self.batch_size, self.seed)
        desc, orders = [], []
        for s in scores:
            values, order = torch.sort(s, descending=True, stable=True)
            desc.append(values)
            orders.append(order)
        del scores
        costs, ratios = self.site_costs(sites)
        result = allocate(desc, costs, ratios, self.budget - fixed)
        indices = []
        for site, mode, count, order in zip(sites, result.modes, result.counts, orders):
            if mode != SPARSE:
                indices.append(None)
                continue
            flat = torch.sort(order[:count].long()).values.cpu()
            indices.append(torch.stack([flat // site.shape[1], flat % site.shape[1]]) if site.matrix else flat)
        del desc, orders
        self.build(backbone, sites, result.modes, indices)
        self.freeze_and_mark(backbone)
        self.tau = result.tau
        self.realised_budget = self.trainable_parameters(backbone)
        if self.realised_budget != result.total + fixed:  # pragma: no cover - internal consistency
            raise AssertionError(f"SPT accounting {result.total + fixed} != built {self.realised_budget}")
        if self.realised_budget < 0.98 * self.budget:
            log.warning("SPT: budget %d not reachable on this backbone (everything selected gives %d)",
                        self.budget, self.realised_budget)
        self.summary = self.summarise(backbone, sites, result.modes, result.counts)
        self.prepared = True
        if _rank_zero():
            log.info("%s", self.summary)

    def load_adapter(self, backbone: Backbone, state: dict[str, torch.Tensor]) -> None:
        """Rebuild the modules from the saved allocation (no scoring), then load the values."""
        key = f"{self.prefix}allocation"
        if key not in state:
            raise AdapterError(f"adapter lacks {key!r}: it was not written by {self.name!r} "
                               "(or prepare() never ran before it was saved)")
        sites = score_sites(backbone, self.vectors)
        codes = [int(c) for c in state[key].reshape(-1).tolist()]
        if len(codes) != len(sites) or any(c not in (NONE, SPARSE, STRUCTURED) for c in codes):
            raise AdapterError(f"adapter allocation has {len(codes)} entries, this backbone and config "
                               f"(vectors={self.vectors}) score {len(sites)} tensors: another backbone or config?")
        indices: list[torch.Tensor | None] = []
        for site, code in zip(sites, codes):
            if code != SPARSE:
                indices.append(None)
                continue
            name = f"{site.module}.{site.tensor_name(self.prefix, '_index')}"
            idx = state.get(name)
            expected = 2 if site.matrix else 1
            if idx is None or idx.dim() != expected or idx.shape[-1] == 0:
                raise AdapterError(f"adapter lacks a valid {name!r} for its sparse entries of {site.label} "
                                   f"in block {site.block}")
            bounds = site.shape if site.matrix else (site.numel,)
            rows = idx.reshape(expected, -1)
            if (rows < 0).any() or any(int(rows[i].max()) >= bounds[i] for i in range(expected)):
                raise AdapterError(f"adapter indices {name!r} fall outside the {tuple(bounds)} tensor")
            indices.append(idx.clone().long())
        self.teardown(backbone)
        self.build(backbone, sites, codes, indices)
        super().load_adapter(backbone, state)
        self.freeze_and_mark(backbone)
        self.realised_budget = self.trainable_parameters(backbone)
        counts = [0 if i is None else i.shape[-1] for i in indices]
        self.summary = self.summarise(backbone, sites, codes, counts)
        self.prepared = True

    def nominal_trainable_parameters(self, backbone: Backbone) -> int | None:
        """The budget before :meth:`prepare`; the realised count after."""
        return self.trainable_parameters(backbone) if self.prepared else self.budget

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        return param.ndim <= 1 or name.endswith(f"{self.prefix}cls_token")

    # --- building and removing ----------------------------------------------------------------------
    def build(self, backbone: Backbone, sites: list[Site], modes: list[int],
              indices: list[torch.Tensor | None]) -> None:
        """Register the modules / deltas / buffers of an allocation and their hooks."""
        model, prefix = backbone.model, self.prefix
        generator = torch.Generator().manual_seed(self.seed)
        roles: dict[str, list[tuple[str, int, int]]] = {}
        norms: list[str] = []
        for site, mode, idx in zip(sites, modes, indices):
            if mode == NONE:
                continue
            host = model.get_submodule(site.module)
            ref = getattr(host, site.attr)
            like = dict(device=ref.device, dtype=ref.dtype)
            if site.matrix and mode == STRUCTURED:
                with torch.random.fork_rng(devices=[]):  # nn.Linear's own init must not move the global RNG
                    module = self.make_module(site.shape[0], site.shape[1], generator)
                host.add_module(f"{prefix}module{site.suffix}", module.to(**like).train(host.training))
            elif site.matrix:
                host.register_parameter(site.tensor_name(prefix, "_delta"),
                                        nn.Parameter(torch.zeros(idx.shape[-1], **like)))
                host.register_buffer(site.tensor_name(prefix, "_index"), idx.to(ref.device))
            elif mode == STRUCTURED:
                host.register_parameter(site.tensor_name(prefix), nn.Parameter(torch.zeros(site.numel, **like)))
            else:
                host.register_parameter(site.tensor_name(prefix, "_delta"),
                                        nn.Parameter(torch.zeros(idx.shape[-1], **like)))
                host.register_buffer(site.tensor_name(prefix, "_index"), idx.to(ref.device))
            if isinstance(host, nn.Linear):
                slots = roles.setdefault(site.module, [])
                if (site.suffix, site.start, site.stop) not in slots:
                    slots.append((site.suffix, site.start, site.stop))
            elif site.module not in norms:
                norms.append(site.module)
        for name, slots in roles.items():
            spec = _LinearSpec(prefix, self.kind, tuple(sorted(slots, key=lambda s: s[1])))
            model.get_submodule(name).register_forward_hook(partial(_linear_hook, spec))
        for name in norms:
            model.get_submodule(name).register_forward_hook(partial(_norm_hook, prefix))
        cls_host = _cls_host(model)
        if cls_host is not None:
            host = model.get_submodule(cls_host)
            host.register_parameter(f"{prefix}cls_token", nn.Parameter(torch.zeros_like(model.cls_token)))
            host.register_forward_pre_hook(partial(_cls_hook, prefix))
        ref = next(model.parameters())
        model.register_buffer(f"{prefix}allocation", torch.tensor(modes, dtype=torch.long, device=ref.device))

    def teardown(self, backbone: Backbone) -> None:
        """Remove every hook, tensor and module this method added (the base weights untouched)."""
        prefix = self.prefix
        for module in list(backbone.model.modules()):
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for key in [k for k, fn in hooks.items() if _hook_prefix(fn) == prefix]:
                    del hooks[key]
            for store in (module._parameters, module._buffers, module._modules):
                for name in [n for n in store if n.startswith(prefix)]:
                    del store[name]

    def allocation_codes(self, backbone: Backbone) -> list[int] | None:
        buf = backbone.model._buffers.get(f"{self.prefix}allocation")
        return None if buf is None else [int(c) for c in buf.tolist()]

    # --- reporting ------------------------------------------------------------------------------------
    def summarise(self, backbone: Backbone, sites: list[Site], modes: list[int], counts: list[int]) -> str:
        """A table block x matrix (structured / sparse k / -) with the vector and total counts."""
        costs, _ = self.site_costs(sites)
        cells: dict[tuple[int, str], str] = {}
        vec: dict[int, list[int]] = {}
        n_struct = p_struct = n_sparse = p_sparse = p_vec = 0
        for site, mode, count, cost in zip(sites, modes, counts, costs):
            spent = cost if mode == STRUCTURED else count if mode == SPARSE else 0
            if site.matrix:
                cells[(site.block, site.label)] = (self.kind_label if mode == STRUCTURED
                                                   else f"sparse {count}" if mode == SPARSE else "-")
                if mode == STRUCTURED:
                    n_struct, p_struct = n_struct + 1, p_struct + spent
                elif mode == SPARSE:
                    n_sparse, p_sparse = n_sparse + 1, p_sparse + spent
            else:
                row = vec.setdefault(site.block, [0, 0, 0])
                row[0] += spent
                row[1] += mode == STRUCTURED
                row[2] += mode == SPARSE
                p_vec += spent
        fixed = self.fixed_parameters(backbone)
        total = p_struct + p_sparse + p_vec + fixed
        width = 12
        tau = "n/a (loaded)" if self.tau is None else f"{self.tau:.4g}"
        lines = [f"SPT-{self.kind_label} allocation: budget {self.budget:,}, realised {total:,} "
                 f"({100 * (total - self.budget) / self.budget:+.2f}%); tau = {tau}",
                 f"{'block':>6}" + "".join(f"{r:>{width}}" for r in MATRIX_ROLES)
                 + ("   vectors (params: whole / sparse tensors)" if self.vectors else "")]
        for b in range(backbone.num_blocks):
            row = f"{b:>6}" + "".join(f"{cells.get((b, r), '-'):>{width}}" for r in MATRIX_ROLES)
            if b in vec:
                row += f"   {vec[b][0]:,} ({vec[b][1]} / {vec[b][2]})"
            lines.append(row)
        if -1 in vec:
            lines.append(f"{'norm':>6}" + " " * (width * len(MATRIX_ROLES))
                         + f"   {vec[-1][0]:,} ({vec[-1][1]} / {vec[-1][2]})")
        lines.append(f"totals: {n_struct} {self.kind_label} modules ({p_struct:,} params, r={self.r}), "
                     f"{n_sparse} sparse matrices ({p_sparse:,} entries), vectors {p_vec:,}, "
                     f"cls_token {fixed:,}; total {total:,} trainable backbone parameters (head not counted)")
        return "\n".join(lines)


def _rank_zero() -> bool:
    try:
        from lightning.pytorch.utilities import rank_zero_only

        return getattr(rank_zero_only, "rank", 0) == 0
    except ImportError:  # pragma: no cover
        return True


@register
class SPTLoRA(_SPT):
    """SPT-LoRA (He et al., ICCV 2023): sensitivity-allocated LoRA + sparse deltas, mergeable.

    Structured module ``h = W x + DropPath(B A Dropout(x))`` (no ``alpha / r`` scale),
    ``P_mod = r (d_in + d_out)``: 12,288 on a ViT-B/16 q/k/v/proj, 30,720 on fc1/fc2.
    Merge: ``W' = W + B A + scatter(delta)``, bias / LayerNorm / class-token deltas
    added to their tensors; exact, zero inference overhead.

    Args:
        budget: trainable backbone parameters (class token included, head excluded, as
            the official count ``+768``). The paper sweeps 0.2M-1.0M per task (official
            ``configs/vtab_supervised_spt_lora.sh``: ``param_req_{0.2..1.0}``); 0.4M is
            the middle of that sweep.
        r: rank of the structured modules (official ``low_rank_dim=8``).
        alpha: a matrix with ``>= P_mod / alpha`` selected weights gets a module
            (official ``--alpha 10``; card ``P_mod / 10``).
        beta: a vector with ``>= d / beta`` selected entries is tuned whole (official
            ``--beta 5``).
        vectors: also score and tune biases and LayerNorm affines (official
            ``--structured_vector``, set in every released script); ``False`` scores
            the q k v proj fc1 fc2 weights only.
        dropout: dropout on the module input (official ``structured_drop``, p = 0.1).
        drop_path: per-sample drop of the module output (official ``DropPath(0.1)``).
        n_images: training images scored (official 16 batches x 32).
        batch_size: images per scoring batch; the score sums squared gradients of
            batch-mean losses, so it matters (official 32).
        seed: draws the scored images, seeds dropout during scoring and the module init.
    """

    name = "spt_lora"
    prefix = "spt_lora_"
    mergeable = True
    kind = "lora"
    kind_label = "LoRA"

    def structured_cost(self, d_out: int, d_in: int) -> int:
        return self.r * (d_in + d_out)

    def make_module(self, d_out: int, d_in: int, generator: torch.Generator | None) -> nn.Module:
        return SPTLoRAModule(d_in, d_out, self.r, self.dropout, self.drop_path, generator)

    @torch.no_grad()
    def merge(self, backbone: Backbone) -> None:
        model, prefix = backbone.model, self.prefix
        codes = self.allocation_codes(backbone)
        if codes is None:
            raise AdapterError("SPT-LoRA has nothing to merge: prepare() or load_adapter() first")
        for site, code in zip(score_sites(backbone, self.vectors), codes):
            if code == NONE:
                continue
            host = model.get_submodule(site.module)
            target = getattr(host, site.attr).data[site.start:site.stop]
            if site.matrix and code == STRUCTURED:
                target.add_(host._modules[f"{prefix}module{site.suffix}"].delta_weight().to(target.dtype))
            elif site.matrix:
                idx = host._buffers[site.tensor_name(prefix, "_index")]
                target.add_(dense_delta(host._parameters[site.tensor_name(prefix, "_delta")], idx,
                                        tuple(target.shape)).to(target.dtype))
            else:
                delta = _vector(host._parameters, host._buffers, site.tensor_name(prefix), site.numel)
                target.add_(delta.to(target.dtype))
        cls_host = _cls_host(model)
        if cls_host is not None:
            model.cls_token.data.add_(model.get_submodule(cls_host)._parameters[f"{prefix}cls_token"])
        self.teardown(backbone)
        self.merged = True


@register
class SPTAdapter(_SPT):
    """SPT-Adapter (He et al., ICCV 2023): sensitivity-allocated sequential adapters + sparse deltas.

    Structured module on the matrix output ``h <- h + DropPath(U GELU(D Dropout(h)))``,
    ``P_mod = 2 r d_out + r + d_out``: 13,064 on a ViT-B/16 q/k/v/proj/fc2, 52,232 on
    fc1 (its output is 3072 wide). Not mergeable (GELU); unmerged cost: ``2 r d_out``
    multiply-adds per token and structured matrix, ``k`` per sparse one -- at most
    ~0.5% of ViT-B/16's compute at a 0.4M budget (see the module docstring).

    Args: as :class:`SPTLoRA` (same defaults and sources; ``r`` is the adapter
    bottleneck, official ``low_rank_dim=8``; the budget sweep is
    ``configs/vtab_supervised_spt_adapter.sh``).
    """

    name = "spt_adapter"
    prefix = "spt_adapter_"
    mergeable = False
    kind = "adapter"
    kind_label = "Adapter"

    def structured_cost(self, d_out: int, d_in: int) -> int:
        return 2 * self.r * d_out + self.r + d_out

    def make_module(self, d_out: int, d_in: int, generator: torch.Generator | None) -> nn.Module:
        return SPTAdapterModule(d_out, self.r, self.dropout, self.drop_path, generator)
