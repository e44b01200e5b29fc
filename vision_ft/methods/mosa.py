"""MoSA: Mixture of Sparse Adapters for visual efficient tuning (Zhang et al., 2023).

An AdaptFormer-style parallel adapter per block whose up-projection is split into
``N`` sparse experts that are trained stochastically and averaged for inference:

    x <- x + MLP(LN2 x) + s * Up_k(Dropout(GELU(Down(LN_a x))))     (training, k drawn)
    x <- x + MLP(LN2 x) + s * Up_bar(Dropout(GELU(Down(LN_a x))))   (eval, Up_bar = (1/N) sum_i Up_i)

with ``s = 0.1`` and a trainable ``LN_a``. Down is shared and dense (the released
"hierarchical" setting, ``MODEL.ADAPTER.SHARE "down"`` in every script of
Theia-4869/MoSA). The ``N = 4`` expert copies of Up are identical at init (Down
Kaiming-uniform, Up and biases 0). A random score per Up weight entry splits the
entries into ``N`` disjoint bins of equal size (``src/utils/pruner.py``
``Rand.score`` + ``Pruner.divide`` mode ``"all"``): the masks ``M_i`` partition
the matrix. Expert ``i`` only ever receives gradient inside ``M_i``, so its entries
outside ``M_i`` stay exactly 0 and the merged Up assembles the experts' disjoint
supports (scaled by 1/N). Biases are not split (``MODEL.ADAPTER.BIAS True``: each
expert has its own dense bias, averaged like the weights).

Training (official ``src/engine/trainer.py``, ``vit_mosa.py`` ``MoSABlock``): each
forward, each block draws one expert (here from the torch RNG, so activation
checkpointing replays the same draw); its gradient is masked by its mask. The
optional consistency loss (``MODEL.ADAPTER.ADDITIONAL``, ``REG_WEIGHT 1.0``) runs
a second stochastic forward and adds the symmetric KL between the two
predictions, ``0.5 [KL(sg(q) || p) + KL(sg(p) || q)]``, batch mean
(``src/solver/losses.py symmetric_KL_loss``): about 2x training compute. It is off
by default here (method card docs/methods/mosa.md), although the released scripts turn it on.

Eval forwards use the merged adapter ``Up_bar`` (the official code merges before
every validation); :meth:`MoSA.on_train_end` folds the experts into one ordinary
adapter, after which the saved adapter is a plain AdaptFormer-shaped adapter
(``norm``, ``down``, ``up`` under ``mosa_adapter``). The adapter itself stays: MoSA
cannot be merged into the base weights, and its inference cost is that of
AdaptFormer with a LayerNorm (``2 d b`` multiply-adds per token and block, +1.3% of
ViT-B/16's compute at b = 64, +0.33% at b = 16).

Parameter counts on ViT-B/16 (head excluded): after folding, ``12 * (2*768 + 768*64
+ 64 + 64*768 + 768) = 1,208,064`` at b = 64 and 322,752 at b = 16 (the card's
1.208M / 0.323M), the same as :class:`~vision_ft.methods.adapters.AdaptFormer`
with ``layernorm=True``. While training the tensors hold ``N`` Up copies:
3,005,184 (b = 64) / 792,768 (b = 16), of which 1,235,712 / 350,400 entries are free
(each Up entry belongs to one expert; the others are fixed at 0).

Choices where the code leaves room, and differences from it:

- Experts are separate parameters (as the official per-expert ``nn.Linear``), so an
  expert not drawn in a step has no gradient and the optimiser skips it (no
  momentum step, no weight decay), exactly as in the official code. Under DDP
  this needs ``trainer.strategy=ddp_find_unused_parameters_true`` (checked in
  :meth:`MoSA.prepare`).
- The official draws with Python's ``random`` and masks gradients after backward;
  here the draw uses the torch RNG and the mask is applied in the forward
  (``where(M_k, U_k, sg(U_k))``): same values, same gradients.
- Masks are drawn from a generator seeded with ``seed`` (the official uses the
  global RNG after ``SEED``), so they do not depend on what ran before; they are
  saved as buffers, so resuming restores them exactly. The Down init uses the
  same generator.
- Bins: a random permutation ranks the entries and bin ``i`` takes ranks
  ``[i n/N, (i+1) n/N)`` (the official ``kthvalue`` thresholds on uniform scores
  give the same split up to ties); sizes differ by at most one when ``N`` does
  not divide ``d b``.
- The adapter output is added outside the MLP's drop-path (as in MoSABlock).

Recipe (docs/methods/mosa.md, official scripts): AdamW, weight decay 0.01, batch 128,
100 epochs with 10 warm-up; FGVC bottleneck 64, lr 1e-3; VTAB bottleneck 16, lr
5e-3. Anchor: FGVC 89.9, VTAB group mean 71.4.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .adapters import _KEY, AdaptFormer, Bottleneck, _check_positive
from .registry import register

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import Backbone


def partition_masks(shape: tuple[int, int], n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` boolean masks of ``shape`` that partition it into random bins of equal size.

    A random permutation ranks the entries (a random score per entry); bin ``i``
    holds the ranks ``[i * numel / n, (i + 1) * numel / n)``. Returns ``(n, *shape)``.
    """
    numel = shape[0] * shape[1]
    rank = torch.empty(numel, dtype=torch.long)
    rank[torch.randperm(numel, generator=generator)] = torch.arange(numel)
    bins = (rank * n) // numel
    return (bins.view(1, *shape) == torch.arange(n).view(n, 1, 1))


class SparseExpertBottleneck(Bottleneck):
    """A :class:`Bottleneck` with LayerNorm whose Up is ``N`` masked experts.

    ``up_weights[i]`` (``d x b``) trains only inside ``masks[i]``; ``up_biases[i]``
    is dense. Training forwards draw one expert (or use :attr:`expert` when set);
    eval forwards use the mean of the experts. :meth:`fold` replaces the experts
    by one ordinary ``up`` Linear holding that mean.
    """

    def __init__(self, dim: int, bottleneck: int, masks: torch.Tensor, scale: float = 0.1,
                 dropout: float = 0.1, activation: str = "gelu",
                 generator: torch.Generator | None = None) -> None:
        super().__init__(dim, bottleneck, scale=scale, dropout=dropout, activation=activation,
                         norm=True, generator=generator)
        n = masks.shape[0]
        if tuple(masks.shape[1:]) != (dim, bottleneck):
            raise ValueError(f"masks of shape {tuple(masks.shape)} for an Up of {(dim, bottleneck)}")
        up = self.up
        del self.up
        # identical experts at init: copies of the zero-initialised Up
        self.up_weights = nn.ParameterList([nn.Parameter(up.weight.detach().clone()) for _ in range(n)])
        self.up_biases = nn.ParameterList([nn.Parameter(up.bias.detach().clone()) for _ in range(n)])
        self.register_buffer("masks", masks.to(torch.bool))
        #: force this expert in training forwards (tests, analysis); None draws one per forward
        self.expert: int | None = None
        #: the expert used by the last training forward
        self.last_expert: int | None = None

    @property
    def folded(self) -> bool:
        return "up" in self._modules

    @property
    def num_experts(self) -> int:
        return len(self.up_weights)

    def merged_up(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1/N) sum_i U_i`` and the mean bias: the adapter used for evaluation."""
        return torch.stack(list(self.up_weights)).mean(0), torch.stack(list(self.up_biases)).mean(0)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        if self.folded:
            return self.up(h)
        if not self.training:
            weight, bias = self.merged_up()
            return F.linear(h, weight, bias)
        k = self.expert
        if k is None:
            k = int(torch.randint(self.num_experts, (1,)).item()) if self.num_experts > 1 else 0
        self.last_expert = k
        w = self.up_weights[k]
        # gradient only inside the expert's mask; values unchanged
        return F.linear(h, torch.where(self.masks[k], w, w.detach()), self.up_biases[k])

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the experts by one ``up`` Linear holding their mean (in place)."""
        if self.folded:
            return
        weight, bias = self.merged_up()
        up = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
        up.weight.copy_(weight)
        up.bias.copy_(bias)
        del self.up_weights, self.up_biases, self.masks
        self.up = up

    def extra_repr(self) -> str:
        experts = "folded" if self.folded else f"experts={self.num_experts}"
        return f"scale={self.scale}, {experts}"


@register
class MoSA(AdaptFormer):
    """MoSA: AdaptFormer-style adapters with ``N`` sparse Up experts, averaged for inference.

    Args:
        bottleneck: adapter width (64: FGVC recipe; 16: VTAB recipe).
        experts: ``N``, the number of Up experts / mask bins (4, official scripts).
        scale: ``s`` on the adapter output (0.1, ``MODEL.ADAPTER.SCALAR``).
        dropout: dropout on the bottleneck activations (0.1, ``MODEL.ADAPTER.DROPOUT``).
        activation: ``gelu`` (official MoSABlock, AdaptFormer style), ``relu`` or ``silu``.
        consistency: add the symmetric-KL consistency loss between two stochastic
            forwards (official ``ADDITIONAL``; off by default, ~2x training compute).
        consistency_weight: its weight (1.0, ``MODEL.ADAPTER.REG_WEIGHT``).
        seed: seed of the mask partition and of the Down init.
    """

    name = "mosa"
    prefix = "mosa_"
    mergeable = False
    zero_init = True

    def __init__(
        self,
        bottleneck: int = 64,
        experts: int = 4,
        scale: float = 0.1,
        dropout: float = 0.1,
        activation: str = "gelu",
        consistency: bool = False,
        consistency_weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(bottleneck=bottleneck, scale=scale, dropout=dropout, layernorm=True,
                         activation=activation)
        _check_positive(experts, "experts")
        if consistency_weight < 0:
            raise ConfigError(f"{_KEY}.consistency_weight must be >= 0, got {consistency_weight!r}")
        self.experts, self.seed = experts, seed
        self.consistency, self.consistency_weight = consistency, consistency_weight
        self._generator: torch.Generator | None = None

    bench_notes = {
        "time": "MoSA keeps N=4 Up experts per block and masks the drawn expert's gradient (torch.where over a "
                "d x b matrix per block); with consistency=true it runs a second stochastic forward and backward.",
    }

    def paper_parameters(self) -> dict[str, Any] | None:
        values = {64: (1_208_064, 1_000, "1.208M"), 16: (322_752, 1_000, "0.323M")}
        if self.bottleneck not in values:
            return None
        v, prec, text = values[self.bottleneck]
        return {"value": v, "precision": prec, "text": f"{text} after folding (b={self.bottleneck})",
                "compare": "deployed",
                "source": "MoSA (Theia-4869/MoSA): the folded adapter equals AdaptFormer with its LN"}

    @property
    def needs_image_classification_task(self) -> bool:
        """With the consistency loss: its second forward reads one normalised image per logits row in
        ``outputs["inputs"]`` and the task's linear ``head``."""
        return bool(self.consistency) and self.consistency_weight > 0

    # --- structure -------------------------------------------------------------------
    def make_adapter(self, dim: int, block_index: int) -> SparseExpertBottleneck:
        assert self._generator is not None
        masks = partition_masks((dim, self.bottleneck), self.experts, self._generator)
        return SparseExpertBottleneck(dim, self.bottleneck, masks, scale=self.scale, dropout=self.dropout,
                                      activation=self.activation, generator=self._generator)

    def apply(self, backbone: Backbone) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)
        try:
            super().apply(backbone)
        finally:
            self._generator = None

    def is_folded(self, backbone: Backbone) -> bool:
        return all(a.folded for a in self.adapters(backbone))

    def fold(self, backbone: Backbone) -> None:
        """Fold every block's experts into one ordinary adapter, ``Up = (1/N) sum_i U_i``."""
        for adapter in self.adapters(backbone):
            adapter.fold()
        self.freeze_and_mark(backbone)

    # --- life cycle --------------------------------------------------------------------
    def prepare(self, task: Any, datamodule: Any) -> None:
        strategy = getattr(getattr(task, "_trainer", None), "strategy", None)
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
        if ddp_kwargs is not None and not ddp_kwargs.get("find_unused_parameters", False) \
                and self.experts > 1 and getattr(strategy, "world_size", 1) > 1:
            raise ConfigError(
                "mosa trains one expert per block and step, so the others get no gradient: under DDP "
                "set trainer.strategy=ddp_find_unused_parameters_true"
            )
        super().prepare(task, datamodule)

    def on_train_end(self, task: Any) -> None:
        self.fold(task.backbone)

    def load_adapter(self, backbone: Backbone, state: dict[str, torch.Tensor]) -> None:
        """Loads the expert layout (checkpoints) and the folded one (``adapter.safetensors``)."""
        folded_state = any(k.endswith(f"{self.adapter_name}.up.weight") for k in state)
        if folded_state and not self.is_folded(backbone):
            self.fold(backbone)
        super().load_adapter(backbone, state)

    # --- consistency -------------------------------------------------------------------
    def regularizer(self, outputs: dict[str, Any], batch: Any) -> dict[str, torch.Tensor]:
        if not self.consistency or self.consistency_weight == 0:
            return {}
        task = outputs["task"]
        if not task.training or self.is_folded(task.backbone):
            return {}
        pooled, _ = task.backbone.features(outputs["inputs"])  # inputs are already normalised
        head_dropout = getattr(task, "head_dropout", None)
        other = task.head(head_dropout(pooled) if head_dropout is not None else pooled)
        multilabel = bool(getattr(task, "multilabel", False))
        loss = symmetric_kl(outputs["logits"], other, multilabel)
        return {"mosa_consistency": self.consistency_weight * loss}


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """``0.5 [KL(sg(q) || p) + KL(sg(p) || q)]``, mean over the batch (fp32).

    Each direction sends gradient to its second argument only, as the official
    ``symmetric_KL_loss``. Softmax distributions; with ``multilabel`` one Bernoulli
    per label, summed over labels.
    """
    p_logits, q_logits = p_logits.float(), q_logits.float()

    def kl(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:  # KL(target || logits)
        if multilabel:
            t = torch.sigmoid(target)
            per = t * (F.logsigmoid(target) - F.logsigmoid(logits)) \
                + (1 - t) * (F.logsigmoid(-target) - F.logsigmoid(-logits))
            return per.sum(-1).mean()
        return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), reduction="batchmean",
                        log_target=True)

    return 0.5 * (kl(q_logits.detach(), p_logits) + kl(p_logits.detach(), q_logits))
