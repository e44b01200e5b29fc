"""Object detection with D-FINE / RT-DETR: the library's loss, COCOeval, COCO results and drawn boxes.

What trains is the PEFT method's own tensors plus whatever the ``freeze`` policy leaves trainable
(the table and the default per method: :mod:`vision_ft.tasks.detection_policy`); both are the
run's trainable state (checkpoints, adapter, EMA).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..backbones.dfine import DFineDetector
from ..errors import ConfigError
from ..export import atomic_write_text, update_metrics
from ..methods import Method
from ..metrics.coco_eval import COCOEvaluator, STAT_NAMES, to_coco_results
from .base import BaseTask
from .detection_policy import FREEZE_POLICIES, FreezePolicyMixin, default_freeze

LOSS_FAMILIES = ("vfl", "bbox", "giou", "fgl", "ddf")
LOGGED_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


class DetectionTask(FreezePolicyMixin, BaseTask):
    """D-FINE / RT-DETR detection on COCO-format data.

    Args:
        backbone: a :class:`~vision_ft.backbones.dfine.DFineDetector`.
        method: ``linear`` (no added tensors; the freeze policy decides), ``lora`` (targets
            ``proj fc1 fc2`` of encoder/decoder layers), ``full``, or a ``class_path``.
        num_classes, class_names: linked from the data; the detector's class heads are sized from them.
        category_ids: the annotation file's category id of each class (predictions are written
            with these); taken from the datamodule when unset.
        freeze: see :mod:`vision_ft.tasks.detection_policy`; ``null`` picks from the method's flags
            (:func:`~vision_ft.tasks.detection_policy.default_freeze`).
        loss_layout: ``paper`` (transformers' ``DFineLoss``, outputs paired as in the official
            D-FINE code) or ``library`` (exactly ``model(..., labels=...).loss``); see docs/detection.md.
        max_detections: detections kept per image (COCOeval counts at most 100).
        draw_images: images drawn with their predicted boxes at ``predict`` time.
        draw_threshold: minimum score of a drawn box.
        head_lr: learning rate of the class-dependent heads (default ``lr``).
        (lr, weight_decay, optimizer, warmup, EMA, on_nonfinite: see :class:`BaseTask`;
        D-FINE's recipe is AdamW lr 2.5e-4, weight decay 1.25e-4, EMA 0.9999.)
    """

    def __init__(
        self,
        backbone: DFineDetector,
        method: Method | str = "linear",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        category_ids: list[int] | None = None,
        freeze: Literal["none", "backbone", "backbone_encoder", "all"] | None = None,
        loss_layout: Literal["paper", "library"] = "paper",
        max_detections: int = 100,
        draw_images: int = 4,
        draw_threshold: float = 0.3,
        lr: float = 2.5e-4,
        weight_decay: float = 1.25e-4,
        head_lr: float | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.0,
        ema_decay: float = 0.0,
        on_nonfinite: Literal["stop", "skip"] = "stop",
    ) -> None:
        if not isinstance(backbone, DFineDetector):
            raise ConfigError("model.init_args.backbone must be a vision_ft.backbones.dfine.DFineDetector")
        if class_names is None:
            if num_classes is None and backbone.class_names is None:
                raise ConfigError("DetectionTask needs num_classes/class_names (linked from the data)")
            class_names = backbone.class_names or [f"class_{i}" for i in range(int(num_classes))]
        if num_classes is not None and int(num_classes) != len(class_names):
            raise ConfigError(f"model.init_args.num_classes={num_classes} but {len(class_names)} class_names")
        if category_ids is not None and len(category_ids) != len(class_names):
            raise ConfigError(f"{len(category_ids)} category_ids for {len(class_names)} classes")
        if loss_layout not in ("paper", "library"):
            raise ConfigError(f"model.init_args.loss_layout must be 'paper' or 'library', got {loss_layout!r}")
        backbone.configure_labels(class_names)  # builds the detector with a head of this size
        super().__init__(backbone, method, lr=lr, weight_decay=weight_decay, head_lr=head_lr, optimizer=optimizer,
                         warmup_fraction=warmup_fraction, min_lr_ratio=min_lr_ratio, ema_decay=ema_decay,
                         on_nonfinite=on_nonfinite, class_names=class_names)
        self.class_names, self.num_classes = list(class_names), len(class_names)
        self.category_ids = [int(c) for c in category_ids] if category_ids is not None else None
        self.loss_layout, self.max_detections = loss_layout, int(max_detections)
        self.draw_images, self.draw_threshold = int(draw_images), float(draw_threshold)
        self.freeze = freeze or default_freeze(self.method)
        if self.freeze not in FREEZE_POLICIES:
            raise ConfigError(f"model.init_args.freeze must be one of {sorted(FREEZE_POLICIES)}, got {freeze!r}")
        if self.method.trains_base_weights and self.freeze != "none":
            raise ConfigError(f"method {self.method.name!r} trains every base weight; set model.init_args.freeze=none, "
                              "or use method linear with freeze=backbone / backbone_encoder / all")
        self._apply_freeze_policy()
        self.evaluators = {split: COCOEvaluator() for split in ("val", "test", "predict")}

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups: the class-dependent heads (new for a new label set) get ``head_lr``,
        the rest ``lr``; no weight decay on 1-D tensors and method-exempt ones."""
        buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.backbone.model.named_parameters():
            if p.requires_grad:
                head = self.backbone.part_of(name) == "class_heads" and not self.method.is_trainable(name)
                buckets.setdefault((head, self.no_weight_decay(name, p)), []).append(p)
        return [{"params": params, "weight_decay": 0.0 if no_decay else self.weight_decay,
                 "lr": (self.head_lr or self.lr) if head else self.lr}
                for (head, no_decay), params in sorted(buckets.items())]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        rows = ", ".join(f"{part} {r['trainable']:,}/{r['total']:,}" for part, r in self.trainable_report().items())
        rank_zero_info(f"[vision_ft] freeze={self.freeze}: trainable/total parameters: {rows}")

    def task_metadata(self) -> dict[str, Any]:
        args = {"num_classes": self.num_classes, "class_names": self.class_names, "category_ids": self.category_ids,
                "freeze": self.freeze, "loss_layout": self.loss_layout, "max_detections": self.max_detections}
        return {"num_classes": self.num_classes, "class_names": self.class_names, "category_ids": self.category_ids,
                "freeze": self.freeze, "trainable_report": self.trainable_report(), "task_args": args}

    # --- data link -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "coco"):
            raise ConfigError("DetectionTask needs a COCO datamodule (data.class_path: vision_ft.data.coco."
                              "COCODetectionData or a subclass)")
        if self.category_ids is None:
            self.category_ids = list(dm.category_ids)
        elif list(dm.category_ids) != self.category_ids:
            raise ConfigError(f"the model was built for category ids {self.category_ids} but the data has "
                              f"{list(dm.category_ids)}")

    # --- steps -----------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor):
        """Images in [0, 1] (B,3,H,W) → the detector's raw outputs (logits, pred_boxes...)."""
        return self.backbone(self.backbone.preprocess(images))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        inputs = self.backbone.preprocess(batch["pixel_values"])  # targets are normalised: resizing keeps them
        loss, terms = self.backbone.detection_loss(inputs, batch["labels"], layout=self.loss_layout)
        loss = self.checked_loss(self.add_regularizers(loss, {"inputs": inputs, "loss_terms": terms}, batch))
        if loss is None:
            return None
        n = len(batch["labels"])
        for family in LOSS_FAMILIES:  # each term summed over layers (final, aux, pre, encoder, denoising)
            parts = [v for k, v in terms.items() if k == f"loss_{family}" or k.startswith(f"loss_{family}_")]
            if parts:
                self.log(f"train/loss_{family}", torch.stack(parts).sum().detach(), batch_size=n)
        self.log_train_loss(loss, batch_idx, batch_size=n)
        return loss

    def _detect(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        detections = self.backbone.detect(self.backbone.preprocess(batch["pixel_values"]), batch["orig_sizes"],
                                          max_detections=self.max_detections)
        return to_coco_results(batch["image_ids"].tolist(), detections, self.category_ids)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluators["val"].update(batch["image_ids"].tolist(), self._detect(batch))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluators["test"].update(batch["image_ids"].tolist(), self._detect(batch))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        results = self._detect(batch)
        self.evaluators["predict"].update(batch["image_ids"].tolist(), results)
        return results

    def _score(self, split: str) -> tuple[dict[str, float], dict[str, float], list[dict[str, Any]]]:
        dm = self.trainer.datamodule
        (stats, per_class, printed), results = self.evaluators[split].compute(dm.coco(split), self.class_names)
        self.evaluators[split].reset()
        summary = "\n".join(line for line in printed.splitlines() if line.lstrip().startswith("Average"))
        rank_zero_info(f"[vision_ft] COCOeval ({split}, {len(results)} detections):\n{summary}")
        return stats, per_class, results

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.evaluators["val"].reset()
            return
        stats, _, _ = self._score("val")
        for name in LOGGED_STATS:  # pycocotools' -1 (no ground truth in that area range) is not a score
            if stats[name] >= 0 or name == "AP":
                self.log(f"val/{name}", stats[name], prog_bar=name in ("AP", "AP50"))

    def on_test_epoch_end(self) -> None:
        stats, per_class, results = self._score("test")
        for name in STAT_NAMES:
            if stats[name] >= 0 or name == "AP":
                self.log(f"test/{name}", stats[name])
        for name, value in per_class.items():
            if value >= 0:
                self.log(f"test/AP_{name}", value)
        self._test_results = (results, per_class)

    def on_test_end(self) -> None:
        """Write the test detections (COCO results JSON), the per-class AP plot, and add metrics to adapter.json."""
        if not self.trainer.is_global_zero or not hasattr(self, "_test_results") or self.trainer.fast_dev_run:
            return
        results, per_class = self._test_results
        run_dir = self.run_dir
        atomic_write_text(run_dir / "predictions_test.json", json.dumps(results) + "\n")
        from ..plots import plot_per_label

        plot_per_label([max(v, 0.0) for v in per_class.values()], list(per_class), run_dir / "per_class_ap.png",
                       metric="AP")
        if (run_dir / "adapter.json").is_file():
            update_metrics(run_dir, self.final_metrics("test/"))
            rank_zero_info(f"[vision_ft] test metrics added to {run_dir / 'adapter.json'}")

    def on_predict_epoch_end(self) -> None:
        results, image_ids = self.evaluators["predict"].gathered()
        self.evaluators["predict"].reset()
        if not self.trainer.is_global_zero:
            return
        out = self.run_dir
        atomic_write_text(out / "predictions.json", json.dumps(results) + "\n")
        dm = self.trainer.datamodule
        drawn = [draw_detections(dm.image_path("test", i), [r for r in results if r["image_id"] == i],
                                 self._names_by_id(), out / "predictions" / f"{i}.png", self.draw_threshold)
                 for i in image_ids[: self.draw_images]]
        rank_zero_info(f"[vision_ft] {len(results)} detections on {len(image_ids)} images written to "
                       f"{out / 'predictions.json'} (COCO results format); {len(drawn)} drawn in {out / 'predictions'}")

    def _names_by_id(self) -> dict[int, str]:
        return dict(zip(self.category_ids, self.class_names))

    # --- inference and export ------------------------------------------------------------------
    @torch.no_grad()
    def predict_images(self, images: Sequence[str | Path], threshold: float = 0.3) -> list[list[dict[str, Any]]]:
        """Detections for image files: per image a list of ``{"category_id", "label", "bbox" (COCO xywh
        pixels), "score"}``, best first."""
        from PIL import Image

        from ..data.coco import image_to_tensor

        self.eval()
        names = self._names_by_id()
        out = []
        for path in images:
            with Image.open(path) as im:
                pixels = image_to_tensor(im)
            size = torch.tensor([pixels.shape[-2:]], device=self.device)
            det = self.backbone.detect(self.backbone.preprocess(pixels[None].to(self.device)), size,
                                       max_detections=self.max_detections, threshold=threshold)
            rows = to_coco_results([0], det, self.category_ids or list(range(self.num_classes)))
            out.append([{"category_id": r["category_id"], "label": names.get(r["category_id"], str(r["category_id"])),
                         "bbox": r["bbox"], "score": r["score"]} for r in rows])
        return out

    def export_native(self, out_dir: str | Path) -> Path:
        """The (merged) detector in transformers' format (``save_pretrained``) + its image processor config."""
        from transformers import RTDetrImageProcessor

        out_dir = Path(out_dir)
        leftovers = [k for k in self.backbone.model.state_dict() if self.method.is_own(k)]
        if leftovers:
            raise RuntimeError(f"merge left method tensors behind: {leftovers[:3]}")
        self.backbone.model.save_pretrained(out_dir)
        size = self.backbone.image_size
        RTDetrImageProcessor(size={"height": size, "width": size}, do_normalize=False).save_pretrained(out_dir)
        return out_dir


def draw_detections(image_path: Path, results: list[dict[str, Any]], names: dict[int, str], out_path: Path,
                    threshold: float = 0.3) -> Path:
    """The image with its detections (score >= ``threshold``) drawn as labelled boxes, as PNG."""
    from PIL import Image, ImageDraw

    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
    with Image.open(image_path) as im:
        canvas = im.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    ids = sorted(names)
    for r in sorted(results, key=lambda r: r["score"]):
        if r["score"] < threshold:
            continue
        x, y, w, h = r["bbox"]
        colour = palette[ids.index(r["category_id"]) % len(palette)] if r["category_id"] in names else (255, 255, 255)
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=max(1, round(min(canvas.size) / 160)))
        draw.text((x + 2, y + 1), f"{names.get(r['category_id'], r['category_id'])} {r['score']:.2f}", fill=colour)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path)
    return out_path
