"""The protocol every PEFT method implements, and the prefix rule.

A method is configuration plus logic; the parameters it adds live inside the
backbone's own modules, each named with the method's unique ``prefix`` (``ssf_``,
``lora_``...). "What is trainable" and "what is saved" are therefore one string
filter over ``backbone.model.named_parameters()``.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import AdapterError

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import Backbone


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


class Method:
    """Base class of all PEFT methods.

    Subclasses set the class attributes and implement :meth:`apply`; typed
    ``__init__`` arguments are the method's config (LightningCLI builds them from
    YAML). Defaults cite the paper table they come from.
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

    applied: bool = False
    merged: bool = False
    #: set once :meth:`prepare` ran or its result was restored by :meth:`load_adapter`
    prepared: bool = False

    # --- life cycle -----------------------------------------------------------------
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
        """Replace the task loss where the method changes it (default: unchanged)."""
        return loss

    def regularizer(self, outputs: dict[str, Any], batch: Any) -> dict[str, torch.Tensor]:
        """Named extra losses, added to the task loss and logged as ``train/<name>``.

        ``outputs`` holds ``logits``, ``features`` (pooled), ``inputs`` (the
        normalised images) and ``task`` (the LightningModule, for methods that need
        a second forward or the head). Name losses with the method's prefix
        (``pego_orth``). Default: none.
        """
        return {}

    def on_train_end(self, task: Any) -> None:
        """End of training, before the adapter is written (e.g. MoSA folds its experts)."""

    def nominal_trainable_parameters(self, backbone: Backbone) -> int | None:
        """For ``requires_data`` methods: the count planned before seeing data (the budget)."""
        return None

    def merge(self, backbone: Backbone) -> None:
        """Fold the method into the base weights so the model is the plain library model."""
        raise AdapterError(
            f"method {self.name!r} cannot be merged into the base weights; export the "
            "adapter as is (its unmerged inference cost is documented in the method's docstring)"
        )

    # --- parameters -----------------------------------------------------------------
    def is_trainable(self, name: str) -> bool:
        """Whether the backbone parameter ``name`` (relative to ``backbone.model``) trains."""
        return bool(self.prefix) and has_prefix(name, self.prefix)

    def is_saved(self, name: str) -> bool:
        """Whether the tensor ``name`` belongs to the adapter (parameters and buffers)."""
        return self.is_trainable(name)

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """Parameters exempt from weight decay (default: 1-D tensors)."""
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
