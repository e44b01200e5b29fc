"""DR-Tune: distribution regularisation with semantic calibration (Zhou, Chen & Huang, ICCV 2023).

Full fine-tuning of the encoder ``f_theta`` and the head ``h``, regularised by the
pretrained feature distribution: a frozen copy ``f_0`` of the pretrained encoder
feeds a queue of pretrained features, and the head must also classify those
(after *semantic calibration* moves them onto the downstream feature
distribution). The encoder gets its gradient from the batch term only; the queue
term shapes the head, which keeps the encoder from over-fitting the few
downstream samples. Inference uses ``f_theta`` + ``h`` only.

Per training step (official code ``model.py``: ``forward``, ``semantic_calibration``,
``rot_align``, ``_dequeue_and_enqueue``; method card docs/methods/dr_tune.md):

1. ``z = f_theta(x)`` (with gradient), ``z0 = f_0(x)`` (no gradient, eval mode).
2. Calibrate the queued pretrained features, without gradient, using only the
   filled queue entries ``(P, Z, y_q)`` (pretrained, downstream, labels):

   - L2-normalise: ``p_i = P_i/|P_i|``, ``d_i = Z_i/|Z_i|``.
   - global shape alignment (rotation + translation, Kabsch/orthogonal Procrustes),
     refit every ``rotation_every`` steps: ``H = sum_i (p_i - p_bar)(d_i - d_bar)^T``,
     ``H = U S V^T``, ``R = V diag(1, ..., 1, det(V U^T)) U^T`` (a proper rotation,
     ``det R = +1``), ``t = mean_i(d_i - R p_i)``; ``p_i <- R p_i + t``.
   - class-level translation: for each class ``c`` in the queue,
     ``p_i <- p_i + (mu_c^down - mu_c^pre)`` with ``mu_c^pre`` the mean of the
     class's ``p_i`` and ``mu_c^down = sum_i w_i d_i``,
     ``w = softmax_i(cos(d_i, h.weight[c]))`` over the class members (the
     "confidence-guided" centre; temperature 1, bias not used, as in the code).
   - renormalise and rescale to the batch: ``z~0_i = |z|_mean * p_i / |p_i|``.

3. Loss = cross-entropy over the concatenation ``[h(z); h(z~0)]`` with labels
   ``[y; y_q]`` (mean over all ``B + K`` rows), i.e.
   ``(B * CE_batch + K * CE_queue) / (B + K)``: the queue term keeps its weight
   ``K / (B + K)`` (0.97 at K=2048, B=64), as in the code.
4. Enqueue ``(z.detach(), z0, y)`` after the loss (the queue used at step ``s``
   holds the features of the steps before ``s``).

Before training, :meth:`DRTune.prepare` fills the queue with pretrained features of
training batches (official ``warm_up``: eval mode, ``f_0`` features stored as both
the pretrained and the downstream entry, which is exact since ``f_theta = f_0`` at
that point).

Differences from the official code (each a bug fix or a choice, none changes the
method as described in the paper):

- Queue writes wrap around: the official ``queue[ptr:ptr+B] = ...`` fails when
  ``K % B != 0`` (or on a short last batch); here indices are taken modulo K.
- A class with one queued sample: the official ``nonzero(...).squeeze()`` turns the
  class into a 0-d index, so its "centre" becomes a scalar mean over feature
  dimensions; here class membership is a mask (one-hot matmuls, no Python loop
  over classes), so a single sample is moved exactly onto its downstream feature.
  Classes absent from the queue are skipped (the official computes NaN centres).
- The rotation is *refit* every ``rotation_every`` steps and the last fit is
  *applied* at every step (stored in buffers, so resume is exact). The official
  code fits and applies it only on steps with ``batch_index % 10 == 0`` and uses
  unrotated features on the other nine steps; the card reads "every 10th step fit
  rotation + translation". Until the first fit (empty queue) ``R = I, t = 0``,
  which is exact at the start since ``f_theta = f_0``.
- Translation: the official ``rot_align`` computes ``t`` from centred data, so
  ``t = 0`` and the rotated features stay centred at the origin; here
  ``t = mean(Y - R X)`` on the uncentred data (the card's formula). Both give the
  same calibrated features because the class-level translation re-centres every
  class anyway (any global translation cancels).
- The official warm-up leaves unfilled rows as ``torch.rand`` features labelled 1
  when the training set has fewer than K images (VTAB-1k has 800-1000); here
  ``prepare`` cycles through the training data until K rows are filled, and the
  queue term only ever uses filled rows (also when ``prepare`` did not run: the
  first training steps fill the queue).
- Under DDP the batch is all-gathered before it is enqueued (as MoCo does), so
  every rank holds the same queue of global batches.
- Weight decay follows the kit (none on 1-D tensors and on the position embeddings
  / class tokens the backbone names), the official recipe decays every tensor with 1e-4.
- The batch term is the task's own loss (its head dropout and label smoothing
  included); the queue term applies ``h`` without dropout (the official head has
  none) and the task's loss (label smoothing included). Single-label only.

The full paper text was not reachable from this environment: formulas above are
read from the official code and the card docs/methods/dr_tune.md, not from numbered equations.

Cost: training runs a second (frozen, no-grad) forward per step, keeps a second
copy of the backbone in memory and an SVD of a D x D matrix every
``rotation_every`` steps; inference cost is exactly the plain model's (``merge``
removes the copy and the queues). Until then (``vision_ft.load_adapter`` of a run)
the model holds the copy too. Lightning warns "Found N module(s) in eval mode at the
start of training": those are the frozen copy's modules, on purpose.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError, ConfigError
from .base import Method, run_device
from .registry import register

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import Backbone

#: submodule of ``backbone.model`` holding the frozen pretrained copy f_0
FROZEN = "drtune_frozen"
#: buffers registered on ``backbone.model`` (all saved: exact resume)
QUEUE_PRE = "drtune_queue_pre"        # (K, D) pretrained features f_0(x)
QUEUE_DOWN = "drtune_queue_down"      # (K, D) downstream features f_theta(x)
QUEUE_LABEL = "drtune_queue_label"    # (K,) int64 labels
QUEUE_PTR = "drtune_queue_ptr"        # () int64 next write position
QUEUE_FILLED = "drtune_queue_filled"  # () int64 number of valid rows (rows [0, filled))
STEP = "drtune_step"                  # () int64 training steps seen
ROTATION = "drtune_rotation"          # (D, D) last fitted rotation R
TRANSLATION = "drtune_translation"    # (D,) last fitted translation t
BUFFERS = (QUEUE_PRE, QUEUE_DOWN, QUEUE_LABEL, QUEUE_PTR, QUEUE_FILLED, STEP, ROTATION, TRANSLATION)


class FrozenCopy(nn.Module):
    """The pretrained model f_0: a deep copy without gradients, always in eval mode.

    ``train()`` is overridden so that ``task.train()`` (called by Lightning every
    epoch) cannot switch dropout / drop-path / norm statistics of the copy on.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(model)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        if hasattr(self.encoder, "set_grad_checkpointing"):
            self.encoder.set_grad_checkpointing(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenCopy":
        return super().train(False)


# --- calibration maths (pure functions, tested directly) ----------------------------------
def kabsch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation ``R`` (det +1) and translation ``t`` minimising ``sum_i |R x_i + t - y_i|^2``.

    ``x``, ``y``: (N, D) paired rows. SVD of ``H = X_c^T Y_c`` (D x D, the sum of
    ``x_c y_c^T``), ``R = V diag(1, ..., det(V U^T)) U^T``, ``t = mean(y - R x)``.
    Computed in float32 at least (the official code does the same in float32).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    xc, yc = x - x.mean(0), y - y.mean(0)
    u, _, vh = torch.linalg.svd(xc.T @ yc)
    v = vh.T.clone()
    sign, _ = torch.linalg.slogdet(v @ u.T)
    v[:, -1] *= sign
    rotation = v @ u.T
    translation = (y - x @ rotation.T).mean(0)
    return rotation, translation


def semantic_calibration(pre: torch.Tensor, down: torch.Tensor, labels: torch.Tensor,
                         prototypes: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor,
                         scale: torch.Tensor | float) -> torch.Tensor:
    """Calibrated pretrained features ``z~0`` (N, D) (see the module docstring, step 2).

    Args:
        pre, down: (N, D) L2-normalised pretrained / downstream queue features.
        labels: (N,) int64 class of each row.
        prototypes: (C, D) head weights (class prototypes), any norm.
        rotation, translation: the global alignment ``p -> R p + t``.
        scale: target norm of the output rows (mean feature norm of the batch).
    """
    num_classes = prototypes.shape[0]
    p = pre @ rotation.T + translation
    onehot = F.one_hot(labels, num_classes).to(p.dtype)                  # (N, C)
    count = onehot.sum(0)                                                 # (C,)
    centre_pre = (onehot.T @ p) / count.clamp(min=1).unsqueeze(1)        # (C, D)
    # softmax over the members of each class of cos(d_i, w_c); cosines lie in [-1, 1],
    # so exp() needs no max-subtraction.
    cos = (down * F.normalize(prototypes, dim=1)[labels]).sum(1)          # (N,)
    e = cos.exp()
    weight = e / (onehot.T @ e)[labels]                                   # (N,), sums to 1 per class
    centre_down = onehot.T @ (weight.unsqueeze(1) * down)                 # (C, D)
    p = p + (centre_down - centre_pre)[labels]
    return F.normalize(p, dim=1) * scale


@register
class DRTune(Method):
    """DR-Tune: full fine-tuning + distribution regularisation with semantic calibration.

    Paper: Zhou, Chen & Huang, "DR-Tune: Improving Fine-tuning of Pretrained Visual
    Models by Distribution Regularization with Semantic Calibration", ICCV 2023
    (arXiv 2308.12058); official code weeknan/DR-Tune. The loss, the calibration and
    every deviation from the official code are in the module docstring.

    Every backbone parameter trains (as :class:`~vision_ft.methods.FullFineTuning`);
    the method adds, inside ``backbone.model``, the frozen copy ``drtune_frozen``
    (never trained, never saved: rebuilt from the base weights by :meth:`apply`) and
    the ``drtune_*`` queue / alignment buffers (saved, so resume is exact).

    Recipe (``configs/methods/dr_tune.yaml``; official ``configs/cifar10_k2048_lr001.yaml``
    and docs/methods/dr_tune.md): SGD momentum 0.9 nesterov, lr 0.01 backbone / 0.33 head,
    weight decay 1e-4, cosine schedule without warm-up, 100 epochs, batch 64.

    Args:
        queue_size: K, rows of the feature queue (official config ``K: 2048``; the
            card's default). The queue term weighs ``K / (B + K)`` of the loss.
        rotation_every: refit the global rotation every this many training steps
            (official ``model.py``: ``iter % 10 == 0``, "rotation is time-consuming").
        prefill: fill the queue with pretrained features of training data in
            :meth:`prepare` (official ``warm_up``); if false (or without data) the
            first training steps fill it.
        seed: seed of the pre-fill pass (shuffling order/augmentation of that pass
            only; the training RNG stream is left untouched).
    """

    name = "dr_tune"
    prefix = "drtune_"
    mergeable = True   # merge = drop the frozen copy and the queues: the plain timm model
    zero_init = True   # full fine-tuning starts at the base model
    #: full fine-tuning: the base weights train; the prefixed tensors (frozen copy f_0, queues)
    #: are state and never train
    trains_base_weights = True
    trains_own_tensors = False
    bench_notes = {
        "time": "DR-Tune is full fine-tuning (every weight-gradient product is computed) plus a no-grad forward "
                "of the frozen pretrained copy on every batch and the queue term.",
        "memory": "DR-Tune trains every weight (no frozen base weights, so no saving is possible) and holds a "
                  "frozen copy of the backbone plus the feature queues on top of full fine-tuning's state.",
    }

    def __init__(self, queue_size: int = 2048, rotation_every: int = 10, prefill: bool = True,
                 seed: int = 0) -> None:
        key = "model.init_args.method.init_args"
        if int(queue_size) < 1:
            raise ConfigError(f"{key}.queue_size must be >= 1, got {queue_size}")
        if int(rotation_every) < 1:
            raise ConfigError(f"{key}.rotation_every must be >= 1, got {rotation_every}")
        self.queue_size = int(queue_size)
        self.rotation_every = int(rotation_every)
        self.prefill = bool(prefill)
        self.seed = int(seed)

    @property
    def needs_image_classification_task(self) -> bool:
        """The queue term reads ``batch["label"]``, pooled ``features``, one normalised image per row
        in ``inputs`` and the task's linear ``head``; :meth:`prepare` reads image batches."""
        return True

    # --- what is saved (trainability: the base rule with the two flags above) -------------
    def is_saved(self, name: str) -> bool:
        """The whole fine-tuned backbone plus the queues, not the frozen copy."""
        return not (name == FROZEN or name.startswith(FROZEN + "."))

    # --- life cycle -----------------------------------------------------------------------
    def apply(self, backbone: Backbone) -> None:
        model = backbone.model
        if hasattr(model, FROZEN):
            raise AdapterError("dr_tune is already applied to this backbone")
        frozen = FrozenCopy(model)  # copied before the buffers exist: f_0 is the plain model
        ref = next(model.parameters())
        k, d = self.queue_size, backbone.embed_dim
        model.add_module(FROZEN, frozen)
        as_long = dict(dtype=torch.int64, device=ref.device)
        model.register_buffer(QUEUE_PRE, torch.zeros(k, d, device=ref.device))
        model.register_buffer(QUEUE_DOWN, torch.zeros(k, d, device=ref.device))
        model.register_buffer(QUEUE_LABEL, torch.zeros(k, **as_long))
        model.register_buffer(QUEUE_PTR, torch.zeros((), **as_long))
        model.register_buffer(QUEUE_FILLED, torch.zeros((), **as_long))
        model.register_buffer(STEP, torch.zeros((), **as_long))
        model.register_buffer(ROTATION, torch.eye(d, device=ref.device))
        model.register_buffer(TRANSLATION, torch.zeros(d, device=ref.device))
        self.freeze_and_mark(backbone)
        self.applied = True

    def merge(self, backbone: Backbone) -> None:
        """Inference needs f_theta + h only: drop the frozen copy and every queue buffer."""
        model = backbone.model
        if FROZEN in model._modules:
            del model._modules[FROZEN]
        for name in BUFFERS:
            model._buffers.pop(name, None)
        self.merged = True

    @torch.no_grad()
    def prepare(self, task: Any, datamodule: Any) -> None:
        """Fill the queue with pretrained features of training batches (deterministic, seeded)."""
        self._check(task)
        self.prepared = True
        loader_fn = getattr(datamodule, "train_dataloader", None)
        if not self.prefill or loader_fn is None:
            return
        backbone = task.backbone
        model = backbone.model
        frozen = model.get_submodule(FROZEN)
        home = next(frozen.parameters()).device
        device = run_device(task, home)
        self.reset_queue(backbone)
        forked = [device.index or 0] if device.type == "cuda" else []
        frozen.to(device)
        try:
            with torch.random.fork_rng(devices=forked):
                torch.manual_seed(self.seed)
                loader = loader_fn()
                while int(model.get_buffer(QUEUE_FILLED)) < self.queue_size:
                    seen = 0
                    for batch in loader:
                        missing = self.queue_size - int(model.get_buffer(QUEUE_FILLED))
                        images, labels = batch["image"][:missing], batch["label"][:missing]
                        feats = self.pretrained_features(backbone, backbone.preprocess(images.to(device)))
                        self._write(model, feats, feats, labels)
                        seen += len(labels)
                        if int(model.get_buffer(QUEUE_FILLED)) >= self.queue_size:
                            break
                    if seen == 0:  # empty training set: the first steps will fill the queue
                        break
        finally:
            frozen.to(home)

    # --- the loss ------------------------------------------------------------------------
    def adjust_loss(self, loss: torch.Tensor, outputs: dict[str, Any], batch: Any) -> torch.Tensor:
        """``CE([h(z); h(z~0)], [y; y_q])`` = ``(B * loss + K * CE_queue) / (B + K)``; then enqueue."""
        task = outputs["task"]
        self._check(task)
        backbone, model = task.backbone, task.backbone.model
        z, labels = outputs["features"], batch["label"]
        with torch.no_grad():
            z0 = self.pretrained_features(backbone, outputs["inputs"])
            queued = self.calibrated_queue(backbone, task.head.weight, z.detach())
        if queued is not None:
            z_cal, y_queue = queued
            queue_loss = task.loss(task.head(z_cal.to(task.head.weight.dtype)), y_queue)
            b, k = z.shape[0], y_queue.numel()
            loss = (b * loss + k * queue_loss) / (b + k)
            if getattr(task, "_trainer", None) is not None:
                task.log("train/drtune_queue_ce", queue_loss.detach())
        down, pre, labels = z.detach(), z0, labels
        if _world_size(task) > 1:  # equal per-rank batches (Lightning's DistributedSampler pads)
            down, pre, labels = (task.all_gather(t).flatten(0, 1) for t in (down, pre, labels))
        self._write(model, down, pre, labels)
        return loss

    @torch.no_grad()
    def pretrained_features(self, backbone: Backbone, inputs: torch.Tensor) -> torch.Tensor:
        """Pooled features of the frozen copy: ``backbone.features`` computed with f_0.

        A shallow view of the backbone wrapper whose ``model`` is the frozen copy, so the
        family's own pooling (token / avg / fc_norm) is used and timm's forward of the
        trained model never sees the copy.
        """
        view = copy.copy(backbone)
        view.__dict__["_modules"] = {**backbone._modules, "model": backbone.model.get_submodule(FROZEN).encoder}
        return view.features(inputs)[0]

    @torch.no_grad()
    def calibrated_queue(self, backbone: Backbone, prototypes: torch.Tensor,
                         z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One step of semantic calibration on the filled queue rows; ``None`` if the queue is empty.

        Advances the step counter and refits the rotation every ``rotation_every`` steps.
        """
        model = backbone.model
        step = int(model.get_buffer(STEP))
        model.get_buffer(STEP).add_(1)
        n = int(model.get_buffer(QUEUE_FILLED))
        if n == 0:
            return None
        with torch.autocast(device_type=z.device.type, enabled=False):
            pre = F.normalize(model.get_buffer(QUEUE_PRE)[:n].float(), dim=1)
            down = F.normalize(model.get_buffer(QUEUE_DOWN)[:n].float(), dim=1)
            labels = model.get_buffer(QUEUE_LABEL)[:n].clone()  # the loss keeps it; the queue moves on
            if n >= 2 and step % self.rotation_every == 0:
                rotation, translation = kabsch(pre, down)
                model.get_buffer(ROTATION).copy_(rotation)
                model.get_buffer(TRANSLATION).copy_(translation)
            scale = z.float().norm(dim=1).mean()
            out = semantic_calibration(pre, down, labels, prototypes.detach().float(),
                                       model.get_buffer(ROTATION).float(),
                                       model.get_buffer(TRANSLATION).float(), scale)
        return out, labels

    # --- the queue ------------------------------------------------------------------------
    def reset_queue(self, backbone: Backbone) -> None:
        model = backbone.model
        for name in (QUEUE_PTR, QUEUE_FILLED):
            model.get_buffer(name).zero_()

    @torch.no_grad()
    def enqueue(self, backbone: Backbone, down: torch.Tensor, pre: torch.Tensor, labels: torch.Tensor) -> None:
        """Write rows at the pointer, wrapping modulo K (only the last K rows if more)."""
        self._write(backbone.model, down, pre, labels)

    def _write(self, model: nn.Module, down: torch.Tensor, pre: torch.Tensor, labels: torch.Tensor) -> None:
        k = self.queue_size
        q_down, q_pre, q_label = (model.get_buffer(n) for n in (QUEUE_DOWN, QUEUE_PRE, QUEUE_LABEL))
        ptr_t, filled_t = model.get_buffer(QUEUE_PTR), model.get_buffer(QUEUE_FILLED)
        down, pre, labels = down[-k:], pre[-k:], labels[-k:].long()
        n = labels.numel()
        if n == 0:
            return
        ptr = int(ptr_t)
        idx = (ptr + torch.arange(n, device=q_label.device)) % k
        with torch.no_grad():
            q_down[idx] = down.detach().to(q_down)
            q_pre[idx] = pre.detach().to(q_pre)
            q_label[idx] = labels.to(q_label.device)
            ptr_t.fill_((ptr + n) % k)
            filled_t.fill_(min(k, int(filled_t) + n))

    # --- checks ---------------------------------------------------------------------------
    def _check(self, task: Any) -> None:
        if self.merged or not self.applied:
            raise AdapterError("dr_tune training needs an applied, unmerged method (merge() is for inference)")
        if getattr(task, "multilabel", False):
            raise ConfigError("dr_tune needs single-label classification (model.init_args.multilabel=false): "
                              "its queue term is a cross-entropy over class labels")
        if not isinstance(getattr(task, "head", None), nn.Linear):
            raise ConfigError("dr_tune needs a task with a linear classification head (task.head)")


def _world_size(task: Any) -> int:
    trainer = getattr(task, "_trainer", None)
    return int(trainer.world_size) if trainer is not None else 1


