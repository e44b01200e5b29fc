"""Per-frame recognition in videos (surgical phases, steps, actions) from clips.

A clip ``(B, T, 3, H, W)`` goes through the frame encoder — the task's backbone with the
PEFT method applied, exactly as for images — frame by frame; the ``T`` frame features are
pooled over time and a linear head gives the logits of the clip's last frame (see
:mod:`vision_ft.data.video` for why the last frame). Temporal pooling:

- ``mean``: the average of the frame features, as ViFi-CLIP (Rasheed et al., CVPR 2023) pools
  CLIP frame embeddings; no parameters, order-blind.
- ``gru``: a one-layer GRU over the frame features, its last hidden state (the CNN-LSTM family
  of online phase recognisers, e.g. SV-RCNet); a head module saved with the adapter.

Evaluation gathers one prediction per frame and computes the field's sequence metrics per
video, then averages over videos (:mod:`vision_ft.metrics.temporal`, pitfalls documented there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..backbones import Backbone
from ..data.video import clip_indices
from ..errors import AdapterError, ConfigError
from ..export import update_metrics
from ..methods import Method
from ..metrics.temporal import PerFramePredictions, aggregate, sequence_metrics
from .base import BaseTask, refuse_without_native_classifier
from .video_outputs import safe_name, write_test_files


class VideoPhaseTask(BaseTask):
    """Frame encoder (backbone + method) + temporal pooling + linear head, one label per frame.

    Args:
        num_classes, class_names, multilabel: linked from the data (``multilabel`` must be false).
        temporal: ``mean`` or ``gru`` pooling over the clip's frames.
        head_dropout: dropout before the head.
        label_smoothing: cross-entropy label smoothing.
        relaxed_boundary_s: relaxed-boundary tolerance in seconds for the ``*_relaxed`` test
            metrics (10 s in the M2CAI16 / Cholec80 evaluation); 0 disables them.
        relaxed_rule: ``general`` or ``cholec80`` (the 7-phase Cholec80 extras).
        ribbon_videos: how many test videos get a ribbon plot.
        clip: how clips are built (``num_frames``, ``frame_stride``, ``fps``); taken from the
            datamodule when not given, saved in adapter.json for :meth:`predict_frames`.
        (see :class:`BaseTask` for backbone, method and optimiser arguments)
    """

    def __init__(
        self,
        backbone: Backbone,
        method: Method | str = "ssf",
        num_classes: int = 7,
        class_names: list[str] | None = None,
        multilabel: bool = False,
        temporal: Literal["mean", "gru"] = "mean",
        head_dropout: float = 0.0,
        label_smoothing: float = 0.0,
        relaxed_boundary_s: float = 10.0,
        relaxed_rule: Literal["general", "cholec80"] = "general",
        ribbon_videos: int = 4,
        clip: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        head_lr: float | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.0,
        ema_decay: float = 0.0,
        on_nonfinite: Literal["stop", "skip"] = "stop",
    ) -> None:
        names = list(class_names) if class_names else [str(i) for i in range(int(num_classes))]
        if len(names) != int(num_classes):
            raise ConfigError(f"{len(names)} class names for {num_classes} classes")
        # methods that need image batches and an image head (SPT, DR-Tune, MoSA's consistency) are
        # refused by the base task (Method.needs_image_classification_task)
        refuse_without_native_classifier(backbone, type(self).__name__)
        super().__init__(backbone, method, lr=lr, weight_decay=weight_decay, head_lr=head_lr,
                         optimizer=optimizer, warmup_fraction=warmup_fraction, min_lr_ratio=min_lr_ratio,
                         ema_decay=ema_decay, on_nonfinite=on_nonfinite, class_names=names)
        if multilabel:
            raise ConfigError("VideoPhaseTask predicts one class per frame; the data says multilabel=true")
        if temporal not in ("mean", "gru"):
            raise ConfigError(f"model.init_args.temporal must be 'mean' or 'gru', got {temporal!r}")
        self.num_classes, self.class_names = int(num_classes), names
        if relaxed_rule == "cholec80" and relaxed_boundary_s > 0 and self.num_classes != 7:
            raise ConfigError(f"model.init_args.relaxed_rule=cholec80 is defined for the 7 Cholec80 phases, the data "
                              f"has {self.num_classes} classes; set model.init_args.relaxed_rule=general")
        self.multilabel = False
        self.temporal_kind, self.label_smoothing = temporal, float(label_smoothing)
        self.relaxed_boundary_s, self.relaxed_rule = float(relaxed_boundary_s), relaxed_rule
        self.ribbon_videos, self.clip = int(ribbon_videos), dict(clip) if clip else None
        dim = backbone.embed_dim
        self.temporal = nn.GRU(dim, dim, batch_first=True) if temporal == "gru" else None
        self.head_dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(dim, self.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.val_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro", ignore_index=-1)
        self.val_frames, self.test_frames = PerFramePredictions(), PerFramePredictions()
        self._test_results: dict[str, Any] | None = None

    # --- model -------------------------------------------------------------------------
    def head_modules(self) -> dict[str, nn.Module]:
        heads: dict[str, nn.Module] = {"head": self.head}
        if self.temporal is not None:
            heads["temporal"] = self.temporal
        return heads

    def task_metadata(self) -> dict[str, Any]:
        args = {"num_classes": self.num_classes, "class_names": self.class_names, "temporal": self.temporal_kind,
                "relaxed_boundary_s": self.relaxed_boundary_s, "relaxed_rule": self.relaxed_rule,
                "clip": self.clip}
        return {"num_classes": self.num_classes, "class_names": self.class_names, "multilabel": False,
                "temporal": self.temporal_kind, "clip": self.clip, "task_args": args}

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Clips in [0, 1] ``(B,T,3,H,W)`` → logits of each clip's last frame ``(B, num_classes)``."""
        return self.forward_outputs(video)["logits"]

    def forward_outputs(self, video: torch.Tensor, frame_keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Logits plus pooled clip features, per-frame features and the encoder inputs.

        ``frame_keys`` ``(B,T)`` (in eval mode only) identifies frames shared by overlapping
        clips (sliding-window evaluation): each distinct frame is encoded once. Identical keys
        must hold identical frames, which holds without augmentation.
        """
        if video.ndim != 5:
            raise ValueError(f"expected clips (B,T,3,H,W), got shape {tuple(video.shape)}")
        b, t = video.shape[:2]
        flat = video.flatten(0, 1)
        inverse = None
        if frame_keys is not None and not self.training:
            keys = frame_keys.reshape(-1)
            unique, inverse = torch.unique(keys, return_inverse=True)
            positions = torch.arange(keys.numel(), device=keys.device)
            first = torch.full((unique.numel(),), keys.numel(), device=keys.device, dtype=positions.dtype)
            first = first.scatter_reduce(0, inverse, positions, reduce="amin")
            flat = flat[first]
        inputs = self.backbone.preprocess(flat)
        frames, _ = self.backbone.features(inputs)
        if inverse is not None:
            frames = frames[inverse]
        frames = frames.reshape(b, t, -1)
        if self.temporal is None:
            pooled = frames.mean(1)
        else:
            pooled = self.temporal(frames)[0][:, -1]
        return {"logits": self.head(self.head_dropout(pooled)), "features": pooled, "inputs": inputs,
                "frame_features": frames}

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, ignore_index=-1, label_smoothing=self.label_smoothing)

    # --- set-up ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.clip is None and hasattr(datamodule, "clip_spec"):
            self.clip = datamodule.clip_spec()

    @property
    def fps(self) -> float:
        return float((self.clip or {}).get("fps", 1.0))

    # --- steps -------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        outputs = self.forward_outputs(batch["video"])
        loss = self.checked_loss(self.add_regularizers(self.loss(outputs["logits"], batch["label"]), outputs, batch))
        if loss is None:  # non-finite, skipped (on_nonfinite=skip)
            return None
        self.log_train_loss(loss, batch_idx, batch_size=len(batch["label"]))
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        keys = None
        if "frame_indices" in batch:  # overlapping sliding windows: encode each frame once
            keys = batch["video_index"].long()[:, None] * (1 << 32) + batch["frame_indices"].long()
        logits = self.forward_outputs(batch["video"], keys)["logits"]
        labels = batch["label"]
        labelled = labels >= 0
        if labelled.any():
            self.log(f"{stage}/loss", self.loss(logits[labelled], labels[labelled]), sync_dist=True,
                     batch_size=int(labelled.sum()))
        preds = logits.argmax(-1)
        frames = self.val_frames if stage == "val" else self.test_frames
        frames.update(batch["video_index"], batch["frame_index"], preds, labels)
        if stage == "val":
            self.val_acc.update(preds, labels)
            self.log("val/acc", self.val_acc, prog_bar=True, batch_size=int(labelled.sum()))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self(batch["video"]).softmax(-1)
        return {"probs": probs, "pred": probs.argmax(-1), "video_index": batch["video_index"],
                "frame_index": batch["frame_index"]}

    # --- sequence metrics ----------------------------------------------------------------
    def _sequence_results(self, collector: PerFramePredictions) -> dict[str, Any] | None:
        videos = collector.compute()  # collective under DDP: every rank calls it
        collector.reset()
        if not videos:
            return None
        tolerance = int(round(self.relaxed_boundary_s * self.fps))
        per_video = {v: sequence_metrics(target, pred, self.num_classes) for v, (_, pred, target) in videos.items()}
        results = {"videos": videos, "per_video": per_video, "strict": aggregate(list(per_video.values()))}
        if tolerance > 0:
            relaxed = {v: sequence_metrics(target, pred, self.num_classes, tolerance, self.relaxed_rule)
                       for v, (_, pred, target) in videos.items()}
            results["per_video_relaxed"] = relaxed
            results["relaxed"] = aggregate(list(relaxed.values()))
        return results

    def _log_sequence(self, stage: str, results: dict[str, Any], per_phase: bool) -> None:
        values: dict[str, float] = {}
        strict = results["strict"]
        for key in ("video_acc", "video_acc_std", "frame_acc", "precision", "recall", "jaccard", "f1"):
            values[f"{stage}/{key}"] = strict[key]
        if per_phase:
            for metric in ("precision", "recall", "jaccard", "f1"):
                for name, value in zip(self.class_names, strict[f"{metric}_per_class"]):
                    values[f"{stage}/phase_{metric}_{safe_name(name)}"] = value
        if "relaxed" in results:
            for key in ("video_acc", "precision", "recall", "jaccard", "f1"):
                values[f"{stage}/{key}_relaxed"] = results["relaxed"][key]
        for key, value in values.items():
            if not np.isnan(value):
                self.log(key, float(value), prog_bar=key == f"{stage}/video_acc")

    def on_validation_epoch_end(self) -> None:
        results = self._sequence_results(self.val_frames)
        if results is not None:
            self._log_sequence("val", results, per_phase=False)

    def on_test_epoch_end(self) -> None:
        self._test_results = self._sequence_results(self.test_frames)
        if self._test_results is not None:
            self._log_sequence("test", self._test_results, per_phase=True)

    def on_test_end(self) -> None:
        """Ribbon plots, per-video table and per-frame predictions; test metrics into adapter.json."""
        results = self._test_results
        if results is None or not self.trainer.is_global_zero or self.trainer.fast_dev_run:
            return
        run_dir = self.run_dir
        names = list(getattr(self.trainer.datamodule, "video_ids", []) or [])
        video_name = {v: names[v] if v < len(names) else f"video{v}" for v in results["videos"]}
        write_test_files(run_dir, results, video_name, self.class_names, fps=self.fps,
                         ribbon_videos=self.ribbon_videos)
        if (run_dir / "adapter.json").is_file():
            update_metrics(run_dir, self.final_metrics("test/"))
            rank_zero_info(f"[vision_ft] test metrics added to {run_dir / 'adapter.json'}")

    # --- inference ---------------------------------------------------------------------
    @torch.no_grad()
    def predict_frames(self, frames: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Per-frame class indices for one video's frames ``(N,3,H,W)`` in [0, 1], sampled at the
        training ``fps``: each frame is classified from the causal clip ending at it."""
        self.eval()
        clip = self.clip or {}
        t, stride = int(clip.get("num_frames", 1)), int(clip.get("frame_stride", 1))
        out = []
        for start in range(0, len(frames), batch_size):
            ends = range(start, min(start + batch_size, len(frames)))
            batch = torch.stack([frames[clip_indices(e, t, stride)] for e in ends]).to(self.device).float()
            out.append(self(batch).argmax(-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    # --- artifacts -----------------------------------------------------------------------
    def export_native(self, out_dir: str | Path) -> Path:
        """With ``temporal: mean``, the (merged) frame encoder + head as the backbone library's image
        classifier (:meth:`~vision_ft.backbones.Backbone.save_classifier`): the head is linear, so a
        clip's logits are the mean over its frames of the exported model's per-frame logits. A GRU
        has no counterpart in the image libraries: such runs are used through ``load_adapter``."""
        if self.temporal is not None:
            raise AdapterError("a VideoPhaseTask run with temporal=gru has no native export (the GRU belongs to no "
                               "image library); use vision_ft.load_adapter(RUN).predict_frames, or train with "
                               "model.init_args.temporal=mean")
        leftovers = [k for k in self.backbone.model.state_dict() if self.method.is_own(k)]
        if leftovers:
            raise RuntimeError(f"merge left method tensors behind: {leftovers[:3]}")
        return Path(self.backbone.save_classifier(out_dir, self.head, self.class_names))
