"""SPT-LoRA and SPT-Adapter: the methods (see the package docstring for the equations and choices)."""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ...errors import AdapterError, ConfigError
from .. import sites as S
from ..base import Method
from ..registry import register
from . import scoring
from .allocation import allocate
from . import layers as L
from .layers import SPTAdapterModule, SPTLoRAModule
from .scoring import MATRIX_ROLES, NONE, SPARSE, STRUCTURED, ScoredTensor, score_sites

if TYPE_CHECKING:  # pragma: no cover
    from ...backbones import Backbone

log = logging.getLogger("vision_ft")

_KEY = "model.init_args.method.init_args"


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

    def site_costs(self, sites: list[ScoredTensor]) -> tuple[list[int], list[float]]:
        costs = [self.structured_cost(*s.shape) if s.matrix else s.numel for s in sites]
        ratios = [self.alpha if s.matrix else self.beta for s in sites]
        return costs, ratios

    @staticmethod
    def fixed_parameters(backbone: Backbone) -> int:
        """Always trained whatever the scores: the class token (its delta)."""
        token = backbone.class_token()
        return 0 if token is None else backbone.model.get_parameter(token[0]).numel()

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
        scores = scoring.sensitivity(task, datamodule, sites, self.n_images, self.batch_size, self.seed)
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

    bench_notes = {
        "time": "SPT's sparse deltas gather the selected input columns for every token (a tokens x k gather and "
                "an index_add into a tokens x d_out buffer, in forward and again in backward) and keep each such "
                "layer's input for their gradient, which a frozen linear alone would not (see the activations "
                "column); its structured modules add dropout and DropPath, and it trains bias and LayerNorm "
                "vectors.",
    }

    def paper_parameters(self) -> dict[str, Any]:
        return {"value": self.budget, "precision": int(0.02 * self.budget) * 2,
                "text": f"= budget {self.budget:,} (paper sweeps 0.2M-1.0M per task)", "compare": "trainable",
                "source": "SPT (He et al., ICCV 2023): the budget is a per-task hyper-parameter"}

    def nominal_trainable_parameters(self, backbone: Backbone) -> int | None:
        """The budget before :meth:`prepare`; the realised count after."""
        return self.trainable_parameters(backbone) if self.prepared else self.budget

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        return param.ndim <= 1 or name.endswith(f"{self.prefix}cls_token")

    # --- building and removing ----------------------------------------------------------------------
    def build(self, backbone: Backbone, tensors: list[ScoredTensor], modes: list[int],
              indices: list[torch.Tensor | None]) -> None:
        """Register the modules / deltas / buffers of an allocation and their site updates.

        Per weight site the updates run in the order: vector deltas, sparse delta, structured module
        (an adapter reads the matrix output with the bias and sparse deltas applied)."""
        model, prefix = backbone.model, self.prefix
        generator = torch.Generator().manual_seed(self.seed)
        pending: list[tuple[int, int, Any]] = []
        position: dict[Any, int] = {}
        for t, mode, idx in zip(tensors, modes, indices):
            if mode == NONE:
                continue
            site = t.site(model)
            pos = position.setdefault(t.ref, len(position))
            base = getattr(site.host, t.attr)
            like = dict(device=base.device, dtype=base.dtype)
            name = t.tensor_name(prefix)
            if t.matrix and mode == STRUCTURED:
                with torch.random.fork_rng(devices=[]):  # nn.Linear's own init must not move the global RNG
                    module = self.make_module(t.shape[0], t.shape[1], generator)
                mname = site.add_module(prefix, "", module.to(**like).train(site.host.training),
                                        name=f"{prefix}module{t.suffix}")
                if self.kind == "lora":
                    add = partial(site.add_lowrank, prefix, partial(L.lora_down, mname), partial(L.lora_up, mname),
                                  pre=partial(L.lora_input, mname), delta=partial(L.module_delta, mname),
                                  exact=partial(L.module_exact, mname))
                else:
                    add = partial(site.add_output_map, prefix, partial(L.module_map, mname))
                pending.append((pos, 2, add))
                continue
            if mode == STRUCTURED:  # a whole vector
                site.add_tensor(prefix, "", nn.Parameter(torch.zeros(t.numel, **like)), name=name)
            else:
                site.add_tensor(prefix, "", nn.Parameter(torch.zeros(idx.shape[-1], **like)), name=f"{name}_delta")
                site.add_tensor(prefix, "", idx.to(base.device), name=f"{name}_index")
            if t.matrix:
                pending.append((pos, 1, partial(site.add_branch, prefix, partial(L.sparse_branch, name, t.shape[0]),
                                                delta=partial(L.sparse_dense, name, t.shape))))
            elif t.is_bias:
                pending.append((pos, 0, partial(site.add_branch, prefix, partial(L.vector_branch, name, t.numel),
                                                bias_delta=partial(L.vector_delta, name, t.numel))))
            else:  # a norm's weight
                pending.append((pos, 0, partial(site.add_branch, prefix, partial(L.norm_weight_branch, name, t.numel),
                                                delta=partial(L.vector_delta, name, t.numel))))
        for _, _, add in sorted(pending, key=lambda e: e[:2]):
            add()
        token = backbone.class_token()
        if token is not None:
            host = model.get_submodule(token[1])
            host.register_parameter(f"{prefix}cls_token", nn.Parameter(torch.zeros_like(model.get_parameter(token[0]))))
            host.register_forward_pre_hook(partial(L.cls_hook, prefix))
        ref = next(model.parameters())
        model.register_buffer(f"{prefix}allocation", torch.tensor(modes, dtype=torch.long, device=ref.device))

    def teardown(self, backbone: Backbone) -> None:
        """Remove every update, hook, tensor and module this method added (the base weights untouched)."""
        prefix = self.prefix
        S.remove_all(backbone.model, prefix)
        for module in list(backbone.model.modules()):
            hooks = module._forward_pre_hooks
            for key in [k for k, fn in hooks.items()
                        if isinstance(fn, partial) and fn.func is L.cls_hook and fn.args[:1] == (prefix,)]:
                del hooks[key]
            for store in (module._parameters, module._buffers, module._modules):
                for name in [n for n in store if n.startswith(prefix)]:
                    del store[name]

    def allocation_codes(self, backbone: Backbone) -> list[int] | None:
        buf = backbone.model._buffers.get(f"{self.prefix}allocation")
        return None if buf is None else [int(c) for c in buf.tolist()]

    # --- reporting ------------------------------------------------------------------------------------
    def summarise(self, backbone: Backbone, sites: list[ScoredTensor], modes: list[int], counts: list[int]) -> str:
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

    lora_family = True
    bench_notes = {**_SPT.bench_notes,
                   "peft": "the peft twin has SPT's LoRA modules only (same input dropout, without DropPath); SPT's "
                           "sparse deltas and trained vectors add their own gather / index_add work and saved "
                           "inputs."}

    def peft_twin(self, backbone: Backbone) -> dict[str, Any] | None:
        codes = self.allocation_codes(backbone)
        if codes is None:
            return None
        names: list[str] = []
        for t, code in zip(score_sites(backbone, self.vectors), codes):
            if code == STRUCTURED and t.matrix and t.module not in names:
                names.append(t.module)
        if not names:
            return None
        return {"r": self.r, "alpha": float(self.r), "dropout": self.dropout, "modules": names,
                "note": f"rank {self.r} on the {len(names)} modules SPT gave a LoRA (sparse deltas not in the twin)"}

    def make_module(self, d_out: int, d_in: int, generator: torch.Generator | None) -> nn.Module:
        return SPTLoRAModule(d_in, d_out, self.r, self.dropout, self.drop_path, generator)

    @torch.no_grad()
    def merge(self, backbone: Backbone) -> None:
        model, prefix = backbone.model, self.prefix
        if self.allocation_codes(backbone) is None:
            raise AdapterError("SPT-LoRA has nothing to merge: prepare() or load_adapter() first")
        S.merge_all(model, prefix)  # W + B A + scatter(delta), bias and norm deltas
        token = backbone.class_token()
        if token is not None:
            model.get_parameter(token[0]).data.add_(model.get_submodule(token[1])._parameters[f"{prefix}cls_token"])
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
