"""CLIP classification: a text-derived head from class names x prompt templates.

``logits = exp(t) * cos(f_image, f_text(class))`` (Radford et al., "Learning Transferable Visual
Models From Natural Language Supervision", ICML 2021, Fig. 1 / Sec. 3.1.4): each class's text
feature is the mean of its L2-normalised template embeddings, renormalised (the paper's prompt
ensembling, Sec. 3.1.4). Without training (``validate``, or ``method: linear``) this is the
zero-shot baseline. A method with ``provides_text_features`` (CoOp) supplies the class features
through ``class_text_features(backbone, class_names)`` instead, and a method whose
``training_loss(task, images, labels)`` returns a loss (Local-Prompt) replaces the cross-entropy
(hooks declared on :class:`~vision_ft.methods.Method`). The head is recomputed from the text tower
at every training step when the text side trains (CLIP-LoRA on the text encoder, CoOp), once per
evaluation epoch then, and cached for good when it is frozen.

Held-out classes (CoOp / CoCoOp base-to-novel protocol, Zhou et al., CVPR 2022 Sec. 5.1): with
``base_to_novel`` the first ``ceil(K / 2)`` classes are *base*, the others *novel*; with
``held_out_classes`` the named ones are held out. Training and validation use base samples only,
scored among base classes (samples of held-out classes in a batch are ignored by the loss). The
test reports ``test/acc_base`` (base samples among base classes), ``test/acc_novel`` (novel samples
among novel classes) and their harmonic mean ``test/hm``, plus the retention of zero-shot ability:
``test/retention_before`` is the accuracy on the held-out classes of the zero-shot model
(templates, the method's trainable tensors reset to their values at ``apply``: exact for
zero-initialised methods and CoOp), ``test/retention_after`` the same for the tuned model (equal
to ``test/acc_novel`` by definition).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.classification import MulticlassAccuracy

from ..backbones import Backbone
from ..errors import ConfigError
from ..export import atomic_save_safetensors, update_metrics
from ..methods import Method
from .base import BaseTask


class CLIPClassificationTask(BaseTask):
    """Image classification with a CLIP text head (zero-shot, few-shot, base-to-novel).

    Args:
        num_classes: number of classes; linked from the data.
        class_names: class names in label order (they become the prompts); linked from the data.
        multilabel: linked from the data; must be false.
        templates: prompt templates with one ``{}`` for the class name (underscores in names
            become spaces). One template, ``a photo of a {}.``, is what CoOp's and CLIP-LoRA's
            few-shot runs use on ImageNet; several are ensembled.
        base_to_novel: hold out the second half of the classes (CoCoOp protocol).
        held_out_classes: hold out these classes by name instead.
        (see :class:`BaseTask` for backbone, method and optimiser arguments; the defaults here
        are CLIP-LoRA's: AdamW, lr 2e-4, weight decay 1e-2, cosine without warm-up)
    """

    #: the untrained model is a classifier (zero-shot): WiSE-FT (``export --interpolate``) applies
    has_zero_shot_model = True
    has_text_head = True

    def __init__(
        self,
        backbone: Backbone,
        method: Method | str = "clip_lora",
        num_classes: int = 2,
        class_names: list[str] | None = None,
        multilabel: bool = False,
        templates: list[str] = ["a photo of a {}."],  # noqa: B006 - jsonargparse needs a plain list default
        base_to_novel: bool = False,
        held_out_classes: list[str] | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.01,
        head_lr: float | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        warmup_fraction: float = 0.0,
        min_lr_ratio: float = 0.0,
        ema_decay: float = 0.0,
        on_nonfinite: Literal["stop", "skip"] = "stop",
    ) -> None:
        for attr in ("encode_text", "tokenize", "encode_image", "logit_scale"):
            if not hasattr(backbone, attr):
                raise ConfigError(f"model.init_args.backbone must be a CLIP backbone (OpenCLIP, HFCLIP); "
                                  f"{type(backbone).__name__} has no {attr}()")
        if multilabel:
            raise ConfigError("CLIPClassificationTask is single-label; the data is multi-label (data.init_args)")
        names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(names) != int(num_classes):
            raise ConfigError(f"{len(names)} class names for {num_classes} classes (model.init_args.class_names)")
        if not templates or any(t.count("{}") != 1 for t in templates):
            raise ConfigError(f"model.init_args.templates={templates!r}: each template needs exactly one '{{}}'")
        super().__init__(backbone, method, lr=lr, weight_decay=weight_decay, head_lr=head_lr, optimizer=optimizer,
                         warmup_fraction=warmup_fraction, min_lr_ratio=min_lr_ratio, ema_decay=ema_decay,
                         on_nonfinite=on_nonfinite, class_names=names)  # per-class prompts are sized from them
        self.num_classes, self.class_names, self.multilabel = int(num_classes), names, False
        self.templates, self.base_to_novel = list(templates), bool(base_to_novel)
        self.held_out_classes = None if held_out_classes is None else list(held_out_classes)
        held = self._held_out_indices()
        self.seen = [i for i in range(self.num_classes) if i not in held]
        self.held = held
        if not self.seen:
            raise ConfigError("every class is held out (model.init_args.held_out_classes); keep some to train on")
        remap = torch.full((self.num_classes,), -1, dtype=torch.long)
        remap[self.seen] = torch.arange(len(self.seen))
        self.register_buffer("_seen_of", remap, persistent=False)
        k = len(self.seen)
        self.val_acc = MulticlassAccuracy(num_classes=k, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=k, average="micro")
        if held:
            self.test_novel = MulticlassAccuracy(num_classes=len(held), average="micro")
            self.test_before = MulticlassAccuracy(num_classes=len(held), average="micro")
            novel = torch.full((self.num_classes,), -1, dtype=torch.long)
            novel[held] = torch.arange(len(held))
            self.register_buffer("_held_of", novel, persistent=False)
        self._init_state = {n: p.detach().clone() for n, p in backbone.model.named_parameters() if p.requires_grad}
        # the text head changes during training when the method supplies it or trains text-tower weights
        # (tensors a method hangs on the root model, e.g. Local-Prompt's prompts, are not the text tower's)
        self._text_trains = self.method.provides_text_features or any(
            p.requires_grad for n, p in backbone.tower_parameters("text")
            if not (self.method.prefix and n.startswith(self.method.prefix)))
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def _held_out_indices(self) -> list[int]:
        if self.base_to_novel and self.held_out_classes:
            raise ConfigError("set model.init_args.base_to_novel or held_out_classes, not both")
        if self.base_to_novel:
            if self.num_classes < 2:
                raise ConfigError("base_to_novel needs at least 2 classes")
            return list(range(math.ceil(self.num_classes / 2), self.num_classes))
        if self.held_out_classes:
            unknown = [c for c in self.held_out_classes if c not in self.class_names]
            if unknown:
                raise ConfigError(f"model.init_args.held_out_classes {unknown} are not class names of the data "
                                  f"({self.class_names})")
            return sorted(self.class_names.index(c) for c in self.held_out_classes)
        return []

    # --- head --------------------------------------------------------------------------
    def zero_shot_features(self, indices: list[int]) -> torch.Tensor:
        """Normalised template-ensemble text features (len(indices), D) from the current text tower."""
        names = [self.class_names[i].replace("_", " ") for i in indices]
        prompts = [t.format(n) for n in names for t in self.templates]
        feats = F.normalize(self.backbone.encode_text(self.backbone.tokenize(prompts)).float(), dim=-1)
        return F.normalize(feats.view(len(names), len(self.templates), -1).mean(1), dim=-1)

    def text_head(self, indices: list[int]) -> torch.Tensor:
        key = tuple(indices)
        if self.training and self._text_trains:
            return self._class_features(indices)
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = self._class_features(indices)
        return self._cache[key]

    def _class_features(self, indices: list[int]) -> torch.Tensor:
        # raw names: per-class contexts are looked up by name
        feats = self.method.class_text_features(self.backbone, [self.class_names[i] for i in indices])
        if feats is None:
            return self.zero_shot_features(indices)
        return F.normalize(feats.float(), dim=-1)

    def _drop_cache(self) -> None:
        if self._text_trains:
            self._cache.clear()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings (B, D) of images in [0, 1]."""
        return self._embed(self.backbone.preprocess(images))

    def _embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone.encode_image(inputs).float(), dim=-1)

    def forward(self, images: torch.Tensor, indices: list[int] | None = None) -> torch.Tensor:
        """Images in [0, 1] (B,3,H,W) -> logits over ``indices`` (default: all classes)."""
        indices = list(range(self.num_classes)) if indices is None else indices
        return self.backbone.logit_scale().float() * self.image_features(images) @ self.text_head(indices).T

    # --- steps -------------------------------------------------------------------------
    def _seen_batch(self, batch: dict[str, torch.Tensor]):
        labels = self._seen_of[batch["label"]]
        keep = labels >= 0
        return batch["image"][keep], labels[keep]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        images, labels = self._seen_batch(batch)
        if len(labels) == 0:  # only held-out classes in this batch
            return None
        loss = self.method.training_loss(self, images, labels)  # the method's own loss (Local-Prompt), or None
        if loss is None:
            inputs = self.backbone.preprocess(images)
            features = self._embed(inputs)
            logits = self.backbone.logit_scale().float() * features @ self.text_head(self.seen).T
            outputs = {"logits": logits, "features": features, "inputs": inputs}
            loss = F.cross_entropy(logits, labels)
        else:
            outputs = {"logits": None, "features": None, "inputs": None}
        loss = self.checked_loss(self.add_regularizers(loss, outputs, batch))
        if loss is None:
            return None
        self.log_train_loss(loss, batch_idx)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._drop_cache()

    def on_test_epoch_start(self) -> None:
        self._drop_cache()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        images, labels = self._seen_batch(batch)
        if len(labels):
            logits = self(images, self.seen)
            self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True)
            self.val_acc.update(logits, labels)
            self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        images, labels = self._seen_batch(batch)
        if len(labels):
            self.test_acc.update(self(images, self.seen), labels)
            self.log("test/acc_base" if self.held else "test/acc", self.test_acc)
        if not self.held:
            return
        held = self._held_of[batch["label"]]
        keep = held >= 0
        if keep.any():
            self.test_novel.update(self(batch["image"][keep], self.held), held[keep])
            with self.zero_shot_model():
                feats = self.image_features(batch["image"][keep])
                head = self.zero_shot_features(self.held)
            self.test_before.update(self.backbone.logit_scale().float() * feats @ head.T, held[keep])

    def on_test_epoch_end(self) -> None:
        if not self.held:
            return
        base = self.test_acc.compute() if self.test_acc.update_called else torch.tensor(float("nan"))
        novel = self.test_novel.compute() if self.test_novel.update_called else torch.tensor(float("nan"))
        before = self.test_before.compute() if self.test_before.update_called else torch.tensor(float("nan"))
        hm = 2 * base * novel / (base + novel) if float(base + novel) > 0 else torch.tensor(0.0)
        self.log_dict({"test/acc_novel": novel, "test/hm": hm, "test/retention_after": novel,
                       "test/retention_before": before})
        for metric in (self.test_novel, self.test_before):
            metric.reset()

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self(batch["image"]).softmax(-1)
        return {"probs": probs, "pred": probs.argmax(-1)}

    @contextlib.contextmanager
    def zero_shot_model(self):
        """Inside: the method's trainable backbone tensors hold their values at ``apply`` (the
        zero-shot model for zero-initialised methods); restored on exit."""
        params = dict(self.backbone.model.named_parameters())
        live = {n: params[n].data for n in self._init_state if n in params}
        try:
            for n in live:
                params[n].data = self._init_state[n].to(params[n].device)
            yield
        finally:
            for n, data in live.items():
                params[n].data = data

    # --- artifacts -----------------------------------------------------------------------
    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_adapter_tensors(tensors)
        self._cache.clear()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._cache.clear()

    def task_metadata(self) -> dict[str, Any]:
        args = {"num_classes": self.num_classes, "class_names": self.class_names, "templates": self.templates,
                "base_to_novel": self.base_to_novel, "held_out_classes": self.held_out_classes}
        return {"num_classes": self.num_classes, "class_names": self.class_names,
                "held_out": [self.class_names[i] for i in self.held], "task_args": args}

    def on_test_end(self) -> None:
        if not self.trainer.is_global_zero or self.trainer.fast_dev_run:
            return
        if (self.run_dir / "adapter.json").is_file():
            update_metrics(self.run_dir, self.final_metrics("test/"))
            rank_zero_info(f"[vision_ft] test metrics added to {self.run_dir / 'adapter.json'}")

    @torch.no_grad()
    def export_native(self, out_dir: str | Path) -> Path:
        """The (merged) CLIP in its library's native layout + ``class_text_features.safetensors``
        (normalised class features (K, D) and ``logit_scale``): ``logits = logit_scale *
        normalize(encode_image(x)) @ text_features.T`` reproduces this task's logits."""
        if not hasattr(self.backbone, "save_native"):
            raise NotImplementedError(f"{type(self.backbone).__name__} has no native export")
        leftovers = [n for n, _ in self.backbone.model.named_parameters() if self.method.is_own(n)]
        if leftovers:
            raise RuntimeError(f"merge left method tensors behind: {leftovers[:3]}")
        out = Path(self.backbone.save_native(out_dir, extra={"class_names": self.class_names,
                                                             "templates": self.templates}))
        was_training = self.training
        self.eval()
        head = self._class_features(list(range(self.num_classes)))
        self.train(was_training)
        atomic_save_safetensors({"text_features": head, "logit_scale": self.backbone.logit_scale().reshape(1)},
                                out / "class_text_features.safetensors", metadata={"format": "pt"})
        return out
