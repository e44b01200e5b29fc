"""The protocol every PEFT method implements: life cycle, trainability and the hooks tasks call.

A method is configuration plus logic; the tensors it adds live inside the backbone's own
modules, each named with the method's unique ``prefix`` (``ssf_``, ``lora_``...).
Trainability is one predicate, :meth:`Method.is_trainable`, owned by the method: by default
the method's own tensors train and the base weights do not; a method that trains base
weights (full fine-tuning, DR-Tune) says so with :attr:`Method.trains_base_weights`. Tasks add
their heads on top. Every optional hook and flag a task reads is declared on :class:`Method`
with its default, so tasks call only declared hooks.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from ..errors import AdapterError

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import Backbone
    from .frame_plan import FramePlan


def run_device(task: Any, default: torch.device) -> torch.device:
    """The device training will run on; in ``setup`` (where ``prepare`` runs) the model is still on the CPU."""
    trainer = getattr(task, "_trainer", None)
    if trainer is None:
        return default
    try:
        return torch.device(trainer.strategy.root_device)
    except Exception:  # strategy not set up (e.g. called outside fit)
        return default


def has_prefix(name: str, prefix: str) -> bool:
    """True when one component of the dotted ``name`` starts with ``prefix``."""
    return any(part.startswith(prefix) for part in name.split("."))


class TextHeadTask(Protocol):
    """What the CLIP tasks (:class:`~vision_ft.tasks.clip_classification.CLIPClassificationTask` and the
    OOD task) offer to :meth:`Method.training_loss`, :meth:`Method.ood_scores` and :meth:`Method.id_logits`.

    Images passed to those hooks are the batch's images in [0, 1] (B, 3, H, W), not normalised;
    ``task.backbone.preprocess(images)`` gives the model input.
    """

    backbone: Backbone
    #: every class name in label order
    class_names: list[str]
    #: indices of the classes trained and scored (all of them unless some are held out)
    seen: list[int]
    #: prompt templates with one ``{}``
    templates: list[str]
    num_classes: int

    def zero_shot_features(self, indices: list[int]) -> torch.Tensor:
        """Normalised template-ensemble text features (len(indices), D)."""

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings (B, D) of images in [0, 1]."""

    def text_head(self, indices: list[int]) -> torch.Tensor:
        """Normalised class text features (len(indices), D) of the task's head (cached when frozen)."""


class Method:
    """Base class of all PEFT methods.

    Subclasses set the class attributes and implement :meth:`apply`; typed
    ``__init__`` arguments are the method's config (LightningCLI builds them from
    YAML). Defaults cite the paper table they come from.

    Everything a task may read or call is declared here with its default: the flags below,
    :meth:`set_class_names` (context passed before :meth:`apply`), :meth:`adjust_loss` and
    :meth:`regularizer` (every task), :meth:`in_context_plan` (video diffusion), :meth:`class_text_features`, :meth:`training_loss`,
    :meth:`ood_scores` and :meth:`id_logits` (the CLIP tasks).
    """

    #: short name used on the command line (``--model.init_args.method=ssf``)
    name: ClassVar[str] = ""
    #: unique prefix of every parameter/buffer the method adds
    prefix: ClassVar[str] = ""
    #: whether :meth:`merge` folds the method into the base weights exactly
    mergeable: ClassVar[bool] = False
    #: whether the added update is zero at init (output unchanged before training)
    zero_init: ClassVar[bool] = False
    #: version of the adapter layout; bump when saved tensors change meaning
    version: ClassVar[int] = 1
    #: whether :meth:`prepare` needs training data to decide what to add (e.g. SPT)
    requires_data: ClassVar[bool] = False
    #: needs a CLIP backbone with a text tower and a task with a text head (the CLIP tasks: CoOp,
    #: Local-Prompt); other tasks refuse the method by this flag
    requires_text_tower: ClassVar[bool] = False
    #: needs a task that places condition / buffer / target frames by :meth:`in_context_plan` (the video
    #: diffusion task: TIC-FT); other tasks refuse the method by this flag instead of running its adapter alone
    needs_in_context_task: ClassVar[bool] = False
    #: whether the backbone's own weights train (full fine-tuning, DR-Tune): read by
    #: :meth:`is_trainable`, and by tasks with their own freeze policy (detection: ``freeze: none``)
    trains_base_weights: ClassVar[bool] = False
    #: whether the tensors the method adds (its prefix) train; false where they are frozen state
    #: (DR-Tune's pretrained copy and feature queues). Read by :meth:`is_trainable`.
    trains_own_tensors: ClassVar[bool] = True
    #: whether :meth:`class_text_features` supplies the CLIP class features (CoOp): the CLIP task's
    #: head then changes during training and is recomputed at every step
    provides_text_features: ClassVar[bool] = False

    applied: bool = False
    merged: bool = False
    #: set once :meth:`prepare` ran or its result was restored by :meth:`load_adapter`
    prepared: bool = False
    #: the task's class names in label order, set by :meth:`set_class_names` (``None``: not given)
    class_names: list[str] | None = None
    #: base-weight names (inside ``backbone.model``) that stay frozen although
    #: ``trains_base_weights`` (full fine-tuning without the stem); filled by :meth:`apply`
    frozen_base_weights: frozenset[str] = frozenset()

    @property
    def adds_tensors(self) -> bool:
        """Whether :meth:`apply` adds tensors to the backbone (every method with a ``prefix``). False for
        the baselines, which only choose which base weights train: a task with its own policy for the
        base model (detection's ``freeze``) then decides alone."""
        return bool(self.prefix)

    @property
    def needs_image_classification_task(self) -> bool:
        """Whether the method works only inside an image classification task: its :meth:`prepare`, loss
        or regularizer reads image batches (``batch["image"]``, ``batch["label"]``), one normalised
        image per logits row in ``outputs["inputs"]`` and the task's linear ``head`` on pooled
        features (DR-Tune's queue, MoSA's consistency forward). Default: :attr:`requires_data` (a
        data-dependent :meth:`prepare` scores training image batches through the task, as SPT does).
        Tasks without that layout (video, detection, CLIP) refuse the method by this flag."""
        return self.requires_data

    # --- life cycle -----------------------------------------------------------------
    def set_class_names(self, class_names: Sequence[str]) -> None:
        """The task's class names in label order, given by the task before :meth:`apply` (methods with
        per-class tensors, e.g. CoOp's class-specific contexts, size them from here). Default: kept
        in :attr:`class_names`; a method applied without a task (parameter counts) sees ``None``."""
        self.class_names = [str(n) for n in class_names]

    def apply(self, backbone: Backbone) -> None:
        """Freeze the backbone and inject the method's modules in place."""
        raise NotImplementedError

    def prepare(self, task: Any, datamodule: Any) -> None:
        """Data-dependent set-up before training (default: nothing).

        Called by the task in ``setup("fit")``: after the datamodule is set up and
        before the optimiser is built, so parameters created here are trained. Not
        called when resuming from a checkpoint (the result is restored by
        :meth:`load_adapter` instead). Must be deterministic given the seed.
        """
        self.prepared = True

    def adjust_loss(self, loss: torch.Tensor, outputs: dict[str, Any], batch: Any) -> torch.Tensor:
        """Replace the task loss where the method changes it (default: unchanged). ``outputs`` and
        ``batch`` as in :meth:`regularizer`."""
        return loss

    def regularizer(self, outputs: dict[str, Any], batch: Any) -> dict[str, torch.Tensor]:
        """Named extra losses, added to the task loss and logged as ``train/<name>``.

        Name losses with the method's prefix (``pego_orth``). Default: none. ``outputs`` always
        holds ``task`` (the LightningModule, for a second forward or the head) and ``inputs``: the
        normalised model input (``backbone.preprocess`` of the batch's [0, 1] images), or ``None``
        where :meth:`training_loss` replaced the task's forward. Per task:

        - image classification: ``logits`` (B, K), ``features`` (B, D) pooled backbone features,
          ``inputs`` (B, 3, H, W), one per logits row; ``batch`` has ``image``, ``label``.
        - CLIP classification / OOD: ``logits`` (B', K') over the trained classes, ``features`` the
          L2-normalised image embeddings (B', D), ``inputs`` (B', 3, H, W), where B' keeps the samples
          of trained classes; all three ``None`` when :meth:`training_loss` gave the loss.
        - video: ``logits`` (B, K) of each clip's last frame, ``features`` (B, D) pooled clip
          features, ``inputs`` (B*T, 3, H, W) every frame, ``frame_features`` (B, T, D).
        - detection: ``inputs`` (B, 3, H, W) and ``loss_terms`` (the detector's named losses); no
          logits or features.
        """
        return {}

    # --- hooks of the CLIP tasks (defaults: the task's own behaviour) --------------------
    def class_text_features(self, backbone: Backbone, class_names: list[str]) -> torch.Tensor | None:
        """Class text features (len(class_names), D), not necessarily normalised, that replace the CLIP
        task's template head (CoOp's learned prompts); ``class_names`` are the task's raw names (per-class
        contexts are looked up by name). Set :attr:`provides_text_features` with it. Default ``None``:
        the task's own template head."""
        return None

    def training_loss(self, task: TextHeadTask, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """The whole training loss of a CLIP task's batch, replacing its cross-entropy (Local-Prompt).

        ``images`` (B, 3, H, W) in [0, 1], ``labels`` (B,) as positions in ``task.seen`` (samples of
        held-out classes already dropped). The task then adds :meth:`regularizer` terms, checks
        finiteness and logs ``train/loss``. Default ``None``: the task's cross-entropy on its head.
        """
        return None

    def ood_scores(self, task: TextHeadTask, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra OOD scores of the CLIP OOD task, ``{name: (B,) tensor}``, higher = more in-distribution.

        Called on every test / predict batch (eval mode, no grad), ID and OOD alike; ``images`` in
        [0, 1]. Names: letters, digits and ``_ . + -`` (they become metric keys); a returned ``mcm``
        replaces the task's. Default ``{}``: the task's MCM score only.
        """
        return {}

    def id_logits(self, task: TextHeadTask, images: torch.Tensor) -> torch.Tensor | None:
        """The method's own ID classifier in the CLIP OOD task: (B, len(task.seen)) class scores whose
        argmax is the prediction (Local-Prompt's global x regional classifier). Default ``None``: the
        task's text-head logits."""
        return None

    def on_train_batch_start(self, task: Any) -> None:
        """Before each training batch's forward, with ``task.global_step`` the number of optimiser steps
        taken (SaRA re-masks at its step here). Default: nothing."""

    def on_train_end(self, task: Any) -> None:
        """End of training, before the adapter is written (e.g. MoSA folds its experts)."""

    def lora_layers(self, backbone: Backbone) -> dict[str, torch.Tensor] | None:
        """The update as plain LoRA factors for tools that load LoRA files (diffusers' ``load_lora_weights``):
        ``{"<module>.lora_A.weight": (r, in), "<module>.lora_B.weight": (out, r)}`` keyed by module names
        inside ``backbone.model``, the ``alpha / r`` scaling folded into ``lora_B``. ``None`` (default):
        the method is not a LoRA of whole modules."""
        return None

    def in_context_plan(self, context_latents: int, total_latents: int) -> FramePlan | None:
        """How a video diffusion task lays a clip out on the latent time axis: of ``total_latents`` latent
        frames, the first ``context_latents`` come from the condition clip. A
        :class:`~vision_ft.methods.frame_plan.FramePlan` says which stay clean, which are buffers at bounded
        noise levels and which are targets (the only frames in the loss and the output); the task noises,
        masks the loss and samples by it (TIC-FT). Default ``None``: every latent frame is a target (plain
        text-to-video on the whole clip)."""
        return None

    def nominal_trainable_parameters(self, backbone: Backbone) -> int | None:
        """For ``requires_data`` methods: the count planned before seeing data (the budget)."""
        return None

    def merge(self, backbone: Backbone) -> None:
        """Fold the method into the base weights so the model is the plain library model."""
        raise AdapterError(
            f"method {self.name!r} cannot be merged into the base weights; export the "
            "adapter as is (its unmerged inference cost is documented in the method's docstring)"
        )

    def save_peft(self, backbone: Backbone, out_dir: str | Path) -> Path:
        """Write the adapter in HF peft's on-disk format (``adapter_config.json`` +
        ``adapter_model.safetensors``), loadable by ``peft.PeftModel.from_pretrained(base, out_dir)``.
        Default: refused, for methods that are not peft tuners."""
        raise AdapterError(f"method {self.name!r} has no peft on-disk format; use `export --merge` (if it merges) "
                           "or the kit's adapter (vision_ft.load_adapter)")

    # --- parameters -----------------------------------------------------------------
    def is_own(self, name: str) -> bool:
        """Whether ``name`` (inside ``backbone.model``) is a tensor the method added: it carries the prefix."""
        return bool(self.prefix) and has_prefix(name, self.prefix)

    def is_trainable(self, name: str) -> bool:
        """Whether the backbone parameter ``name`` (relative to ``backbone.model``) trains: the one
        trainability predicate (tasks add their heads). The method's own tensors train when
        :attr:`trains_own_tensors`; base weights when :attr:`trains_base_weights`, except
        :attr:`frozen_base_weights`."""
        if self.is_own(name):
            return self.trains_own_tensors
        return self.trains_base_weights and name not in self.frozen_base_weights

    def is_saved(self, name: str) -> bool:
        """Whether the tensor ``name`` belongs to the adapter (parameters and buffers): by default the
        method's own tensors and every trainable one."""
        return self.is_own(name) or self.is_trainable(name)

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """Parameters exempt from weight decay (default: 1-D tensors). Tasks also exempt the
        backbone's ``no_decay_parameter_names()`` (position embeddings, class tokens)."""
        return param.ndim <= 1

    def freeze_and_mark(self, backbone: Backbone) -> None:
        """Set ``requires_grad`` from :meth:`is_trainable` on every backbone parameter."""
        for name, p in backbone.model.named_parameters():
            p.requires_grad_(self.is_trainable(name))

    def trainable_parameters(self, backbone: Backbone) -> int:
        return sum(p.numel() for n, p in backbone.model.named_parameters() if p.requires_grad)

    def adapter_state_dict(self, backbone: Backbone) -> dict[str, torch.Tensor]:
        """What the method adds or changes, keyed by name inside ``backbone.model``."""
        state = backbone.model.state_dict(keep_vars=False)
        return {k: v.detach().clone().contiguous() for k, v in state.items() if self.is_saved(k)}

    def load_adapter(self, backbone: Backbone, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`adapter_state_dict` output; refuses missing, extra or misshapen tensors."""
        own = {k: v for k, v in backbone.model.state_dict().items() if self.is_saved(k)}
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        bad = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
        if missing or extra or bad:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
            if extra:
                parts.append(f"unexpected {len(extra)} (e.g. {extra[0]})")
            if bad:
                k = sorted(bad)[0]
                parts.append(f"shape mismatch at {k}: adapter {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
            raise AdapterError(
                f"adapter does not fit method {self.name!r} on this backbone: " + "; ".join(parts)
                + ". Was it trained with another backbone or method config?"
            )
        with torch.no_grad():
            full = backbone.model.state_dict(keep_vars=True)
            for k, v in state.items():
                full[k].copy_(v)

    # --- config ---------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The ``__init__`` arguments of this instance (written to adapter.json)."""
        sig = inspect.signature(type(self).__init__)
        out = {}
        for pname in list(sig.parameters)[1:]:
            value = getattr(self, pname)
            out[pname] = list(value) if isinstance(value, tuple) else value
        return out

    def spec(self) -> dict[str, Any]:
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "init_args": self.config()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # --- what the benchmark knows (read by ``python -m vision_ft bench``) ------------------------
    #: in the LoRA family: a low-rank update of frozen linears, timed against :meth:`peft_twin`
    lora_family: ClassVar[bool] = False
    #: why a measured bench goal is missed, by goal (``time``: step vs full fine-tuning, ``memory``,
    #: ``peft``: step vs the peft twin): what the method's step does that costs it. Shown on the
    #: benchmark page under a missed goal; a miss without a note is flagged there as not analysed. A note
    #: cites numbers only as ``{measured:<row label>:<key>}`` (e.g. ``{measured:lora:ratio_vs_peft}``),
    #: filled from the run the page shows; a number typed into a note would describe another run.
    bench_notes: ClassVar[dict[str, str]] = {}

    def paper_parameters(self) -> dict[str, Any] | None:
        """The paper's trainable-parameter count for this config on ViT-B/16 (``bench params``):
        ``{"value", "precision" (the printed rounding), "text", "compare": "trainable" | "deployed",
        "source"}``; ``None`` where the paper tabulates no such config (default)."""
        return None

    def peft_twin(self, backbone: Backbone) -> dict[str, Any] | None:
        """The HF peft LoRA this method's step is timed against (``bench train``), for the LoRA family:
        ``{"r", "alpha", "dropout", "modules" (names inside ``backbone.model``), "note"}``; ``None``
        outside the family (default) or where no twin fits the config."""
        return None
