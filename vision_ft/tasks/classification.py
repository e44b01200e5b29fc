"""Image classification: single-label (cross-entropy) and multi-label (BCE, per-label AUROC)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy, MulticlassAUROC, MulticlassConfusionMatrix, MulticlassF1Score,
    MultilabelAccuracy, MultilabelF1Score,
)

from ..backbones import Backbone
from ..export import update_metrics
from ..methods import Method
from ..metrics.multilabel import IGNORE, DefinedAUROC, LabelThresholds, masked_bce_with_logits, metric_targets
from ..plots import plot_confusion_matrix, plot_per_label
from .base import BaseTask, refuse_without_native_classifier


class ImageClassificationTask(BaseTask):
    """A backbone + PEFT method + linear head on pooled features.

    Args:
        num_classes: number of classes (labels, when multi-label); linked from the data.
        class_names: names in label order; linked from the data.
        multilabel: independent sigmoid per label with BCE (MedMNIST-Chest style). NaN labels
            (unknown, e.g. uncertain findings under the ``ignore`` policy) are left out of the
            loss and the metrics; predictions use per-label thresholds chosen on validation.
        label_smoothing: cross-entropy label smoothing (single-label only).
        head_dropout: dropout before the head.
        (see :class:`BaseTask` for backbone, method and optimiser arguments)
    """

    is_image_classification = True

    def __init__(
        self,
        backbone: Backbone,
        method: Method | str = "ssf",
        num_classes: int = 2,
        class_names: list[str] | None = None,
        multilabel: bool = False,
        label_smoothing: float = 0.0,
        head_dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        head_lr: float | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.0,
        ema_decay: float = 0.0,
        on_nonfinite: Literal["stop", "skip"] = "stop",
    ) -> None:
        names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(names) != int(num_classes):
            raise ValueError(f"{len(names)} class names for {num_classes} classes")
        refuse_without_native_classifier(backbone, type(self).__name__)
        super().__init__(backbone, method, lr=lr, weight_decay=weight_decay, head_lr=head_lr,
                         optimizer=optimizer, warmup_fraction=warmup_fraction, min_lr_ratio=min_lr_ratio,
                         ema_decay=ema_decay, on_nonfinite=on_nonfinite, class_names=names)
        self.num_classes, self.class_names = int(num_classes), names
        self.multilabel = multilabel
        self.label_smoothing = label_smoothing
        self.head_dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(backbone.embed_dim, self.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.val_metrics = self._metrics("val/")
        self.test_metrics = self._metrics("test/")
        if multilabel:  # labels may hold NaN = unknown (e.g. an uncertain finding under the ignore policy)
            self.test_auroc_per_label = DefinedAUROC(num_labels=self.num_classes, average=None)
            self.thresholds = LabelThresholds(self.num_classes)  # per label, chosen on validation (Youden's J)
            self.test_f1_at_thresholds = MultilabelF1Score(num_labels=self.num_classes, average="macro",
                                                           ignore_index=IGNORE)
        else:
            self.test_confusion = MulticlassConfusionMatrix(num_classes=self.num_classes)

    def _metrics(self, prefix: str) -> MetricCollection:
        k = self.num_classes
        if self.multilabel:
            m = {"acc": MultilabelAccuracy(num_labels=k, ignore_index=IGNORE),
                 "f1": MultilabelF1Score(num_labels=k, average="macro", ignore_index=IGNORE),
                 "auroc": DefinedAUROC(num_labels=k, average="macro")}
        else:
            m = {"acc": MulticlassAccuracy(num_classes=k, average="micro"),
                 "f1": MulticlassF1Score(num_classes=k, average="macro"),
                 "auroc": MulticlassAUROC(num_classes=k, average="macro")}
        return MetricCollection(m, prefix=prefix)

    # --- model -------------------------------------------------------------------------
    def head_modules(self) -> dict[str, nn.Module]:
        return {"head": self.head, "thresholds": self.thresholds} if self.multilabel else {"head": self.head}

    #: the data's raw-image transform (``ClassificationData.input_transform``), recorded with the run
    input_transform_spec: dict[str, Any] | None = None

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], backbone_overrides: dict[str, Any] | None = None) -> Any:
        task = super().from_metadata(meta, backbone_overrides)
        task.input_transform_spec = meta.get("input_transform")
        return task

    def task_metadata(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "class_names": self.class_names,
                "multilabel": self.multilabel, "input_transform": self.input_transform_spec,
                "task_args": {"num_classes": self.num_classes, "class_names": self.class_names,
                              "multilabel": self.multilabel}}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B,3,H,W) -> logits (B, num_classes)."""
        return self.forward_outputs(images)["logits"]

    def forward_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits plus what methods' regularisers may need: pooled features and model inputs."""
        inputs = self.backbone.preprocess(images)
        pooled, _ = self.backbone.features(inputs)
        return {"logits": self.head(self.head_dropout(pooled)), "features": pooled, "inputs": inputs}

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.multilabel:  # NaN labels are left out of the mean
            return masked_bce_with_logits(logits, labels)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid() if self.multilabel else logits.softmax(-1)

    # --- steps -------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        outputs = self.forward_outputs(batch["image"])
        logits = outputs["logits"]
        loss = self.checked_loss(self.add_regularizers(self.loss(logits, batch["label"]), outputs, batch))
        if loss is None:
            return None
        self.log_train_loss(loss, batch_idx)
        return loss

    def setup(self, stage: str) -> None:
        """Per-domain accuracy when the data has domains (leave-one-domain-out evaluation)."""
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        record = getattr(datamodule, "input_transform", None)
        if stage == "fit" and callable(record):
            self.input_transform_spec = record()
        names = getattr(datamodule, "domain_names", None)
        if names and not self.multilabel and not hasattr(self, "domain_acc"):
            from ..metrics import PerDomainAccuracy

            self.domain_names = list(names)
            self.domain_acc = nn.ModuleDict({s: PerDomainAccuracy(num_domains=len(names)) for s in ("val", "test")})

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: MetricCollection, stage: str):
        logits = self(batch["image"])
        labels = batch["label"]
        self.log(f"{stage}/loss", self.loss(logits, labels), sync_dist=True)
        probs = self.probabilities(logits)
        metrics.update(probs, metric_targets(labels) if self.multilabel else labels)
        self.log_dict(metrics, prog_bar=stage == "val")
        if "domain" in batch and hasattr(self, "domain_acc"):
            self.domain_acc[stage].update(probs.argmax(-1), labels, batch["domain"])
        return probs, labels

    def _log_domain_accuracy(self, stage: str) -> None:
        if not hasattr(self, "domain_acc"):
            return
        metric = self.domain_acc[stage]
        if metric.update_called:
            per_domain = metric.compute()
            for name, value in zip(self.domain_names, per_domain):
                if not torch.isnan(value):
                    self.log(f"{stage}/acc_{name}", value)
            # DomainBed "training-domain validation": unweighted mean over the domains present
            self.log(f"{stage}/acc_domain_mean", torch.nanmean(per_domain))
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_domain_accuracy("val")
        if self.multilabel and not self.trainer.sanity_checking:
            chosen = self.thresholds.choose()
            if chosen is not None:
                self.log("val/threshold_mean", chosen.mean())
        elif self.multilabel:
            self.thresholds.collector.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        probs, labels = self._eval_step(batch, self.val_metrics, "val")
        if self.multilabel:
            self.thresholds.update(probs, labels)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        probs, labels = self._eval_step(batch, self.test_metrics, "test")
        if self.multilabel:
            targets = metric_targets(labels)
            self.test_auroc_per_label.update(probs, targets)
            self.test_f1_at_thresholds.update(self.thresholds.predict(probs), targets)
        else:
            self.test_confusion.update(probs.argmax(-1), labels)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self.probabilities(self(batch["image"]))
        return {"probs": probs, "pred": self.thresholds.predict(probs) if self.multilabel else probs.argmax(-1)}

    def on_test_epoch_end(self) -> None:
        self._log_domain_accuracy("test")
        if self.multilabel:
            per_label = self.test_auroc_per_label.compute().cpu().numpy()
            self.test_auroc_per_label.reset()
            self.log("test/f1_at_val_thresholds", self.test_f1_at_thresholds.compute())
            self.test_f1_at_thresholds.reset()
            self._test_extra = ("auroc", per_label)
        else:
            matrix = self.test_confusion.compute().cpu().numpy()
            self.test_confusion.reset()
            support = matrix.sum(1)
            for name, hit, n in zip(self.class_names, matrix.diagonal(), support):
                if n > 0:  # per-class recall (sensitivity); undefined for a class absent from the test set
                    self.log(f"test/recall_{_key(name)}", float(hit / n))
            self._test_extra = ("confusion", matrix)

    def on_test_end(self) -> None:
        """After testing a trained run: add test metrics to adapter.json, plot the test results."""
        if not self.trainer.is_global_zero or not hasattr(self, "_test_extra") or self.trainer.fast_dev_run:
            return
        run_dir = self.run_dir
        kind, value = self._test_extra
        if kind == "confusion":
            plot_confusion_matrix(value, self.class_names, run_dir / "confusion_matrix.png",
                                  title="confusion matrix (test)")
        else:
            plot_per_label(value, self.class_names, run_dir / "per_label_auroc.png")
        if (run_dir / "adapter.json").is_file():
            metrics = self.final_metrics("test/")
            if kind == "auroc":
                metrics.update({f"test/auroc_{n}": round(float(v), 6) for n, v in zip(self.class_names, value)
                                if np.isfinite(v)})  # NaN: the test split lacks positives or negatives
                metrics.update({f"val/threshold_{n}": round(float(t), 6)
                                for n, t in zip(self.class_names, self.thresholds.values)})
            update_metrics(run_dir, metrics)
            rank_zero_info(f"[vision_ft] test metrics added to {run_dir / 'adapter.json'}")

    # --- inference ---------------------------------------------------------------------
    @torch.no_grad()
    def predict_images(self, images: Sequence[str | Path | Image.Image | np.ndarray] | torch.Tensor,
                       batch_size: int = 32) -> list[dict[str, Any]]:
        """Class probabilities for image files, PIL images, raw arrays or a (B,3,H,W) tensor in [0, 1].

        Files, PIL images and arrays pass through the run's recorded ``input_transform`` (the data's
        own preprocessing, e.g. the radio pack's sigma clip and stretch) as in training; a tensor is
        taken as already preprocessed. Returns one dict per image: ``label`` (top class or the
        positive labels) and ``probs`` (name -> probability).
        """
        self.eval()
        if isinstance(images, torch.Tensor):
            batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        else:
            size, transform, readers = self.backbone.input_size, self.input_transform(), self.input_readers()
            tensors = [_image_tensor(im, size, transform, readers) for im in images]
            batches = [torch.stack(tensors[i:i + batch_size]) for i in range(0, len(tensors), batch_size)]
        out = []
        for b in batches:
            probs = self.probabilities(self(b.to(self.device).float())).cpu()
            for row in probs:
                named = {n: float(p) for n, p in zip(self.class_names, row)}
                label = ([n for n, hit in zip(self.class_names, self.thresholds.predict(row)) if hit]
                         if self.multilabel else self.class_names[int(row.argmax())])
                out.append({"label": label, "probs": named})
        return out

    def input_transform(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """The recorded raw-image transform, built from its spec (``None`` when the run has none)."""
        spec = self.input_transform_spec
        if not spec or "class_path" not in spec:  # nothing, or file readers only
            return None
        from ..export import import_class

        return import_class(spec["class_path"])(**spec.get("init_args", {}))

    def input_readers(self) -> dict[str, Callable[[Path], np.ndarray]]:
        """Decoders by file suffix the run's data recorded (FITS for the radio pack: a function; DICOM: a
        configured reader ``{class_path, init_args}`` with the run's window); PIL reads the rest."""
        from ..export import import_class

        def build(reader: str | dict[str, Any]) -> Callable[[Path], np.ndarray]:
            if isinstance(reader, str):
                return import_class(reader)
            return import_class(reader["class_path"])(**reader.get("init_args", {}))

        spec = self.input_transform_spec or {}
        return {suffix.lower(): build(reader) for suffix, reader in (spec.get("readers") or {}).items()}

    # --- artifacts -----------------------------------------------------------------------
    def export_native(self, out_dir: str | Path) -> Path:
        """The (merged) backbone + head in the backbone library's native format
        (:meth:`~vision_ft.backbones.Backbone.save_classifier`: a timm model folder, open_clip's
        local-dir layout or a transformers folder, the last two with ``classifier_head.safetensors``)."""
        leftovers = [k for k in self.backbone.model.state_dict() if self.method.is_own(k)]
        if leftovers:
            raise RuntimeError(f"merge left method tensors behind: {leftovers[:3]}")
        return Path(self.backbone.save_classifier(out_dir, self.head, self.class_names))


def _key(name: str) -> str:
    """A class name as a metric-key component (spaces and slashes would split CSV/TensorBoard keys)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def _image_tensor(image: str | Path | Image.Image | np.ndarray, size: tuple[int, int],
                  transform: Callable[[np.ndarray], np.ndarray] | None = None,
                  readers: dict[str, Callable[[Path], np.ndarray]] | None = None) -> torch.Tensor:
    """A file path, PIL image (any mode: gray, RGBA, 16-bit) or decoded array -> (3,H,W) float in
    [0, 1], through ``transform`` (the run's recorded preprocessing) first when given; files whose
    suffix is in ``readers`` are decoded by that reader instead of PIL."""
    from ..data.labelled_images import pil_to_array, to_tensor

    if isinstance(image, np.ndarray):
        array = image
    elif not isinstance(image, Image.Image) and Path(image).suffix.lower() in (readers or {}):
        array = readers[Path(image).suffix.lower()](Path(image))
    else:
        if not isinstance(image, Image.Image):
            with Image.open(image) as im:
                image = im.copy()
        array = pil_to_array(image)
    return to_tensor(transform(array) if transform is not None else array, size[0])
