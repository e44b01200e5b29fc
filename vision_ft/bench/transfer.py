"""``bench transfer``: does each method learn what it should when it transfers?

1. Pre-train a small ViT from random init on the generated source task
   (:mod:`vision_ft.bench.shapes`, fixed seeds) with full fine-tuning; the backbone
   (timm state dict) and the source head are cached as safetensors in the run
   directory, keyed by every setting they depend on.
2. Adapt it to the related target task with every method: the backbone loaded
   through ``TimmViT(checkpoint=...)``, the method applied and prepared, a new
   linear head, the same optimiser and schedule for all, for each seed.
3. Report target accuracy, trainable parameters and source retention: the source
   test accuracy of the adapted backbone (method active, after its end-of-training
   step) with the source head. Linear probe and full fine-tuning are the reference
   rows; the linear probe's retention equals the source accuracy by construction.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..backbones import TimmViT
from ..errors import ConfigError, VisionFTError
from .common import MethodSpec, optimizer_for, quiet_logging, record_skip, train_step
from .shapes import GENERATOR_VERSION, SOURCE_CLASSES, TARGET_CLASSES, render

ARCH = "vit_tiny_patch16_224"  # timm's ViT, resized by model_args


@dataclass
class TransferConfig:
    """Sizes and recipe of the testbed (defaults: a few minutes on 2 CPU cores)."""

    image_size: int = 32
    patch_size: int = 8
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 2
    source_train: int = 6000
    source_test: int = 500
    target_train: int = 400
    target_test: int = 500
    pretrain_epochs: int = 10
    pretrain_lr: float = 1e-3
    epochs: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 32
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])

    @classmethod
    def quick(cls) -> "TransferConfig":
        return cls(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, source_train=192,
                   source_test=64, target_train=48, target_test=64, pretrain_epochs=2, epochs=1, batch_size=16)

    @classmethod
    def from_args(cls, a: Any) -> "TransferConfig":
        config = cls.quick() if a.quick else cls()
        for key in ("epochs", "pretrain_epochs", "lr", "seeds"):
            value = getattr(a, key, None)
            if value is not None:
                setattr(config, key, list(value) if key == "seeds" else value)
        if config.epochs < 1 or config.pretrain_epochs < 1 or not config.seeds:
            raise ConfigError("bench transfer: --epochs and --pretrain-epochs must be >= 1 and --seeds non-empty")
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_args(self) -> dict[str, Any]:
        return dict(patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
                    num_heads=self.num_heads, mlp_ratio=4.0, global_pool="avg")

    def source_key(self) -> str:
        keys = ("image_size", "patch_size", "embed_dim", "depth", "num_heads", "source_train", "pretrain_epochs",
                "pretrain_lr", "weight_decay", "batch_size")
        blob = json.dumps({"generator": GENERATOR_VERSION, "arch": ARCH, **{k: getattr(self, k) for k in keys}},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class TensorData:
    """A datamodule stand-in over in-memory tensors (what ``method.prepare`` reads)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> None:
        self.items = [{"image": x, "label": y} for x, y in zip(images, labels)]
        self.batch_size = batch_size
        self.num_classes = int(labels.max()) + 1

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.items, batch_size=self.batch_size, shuffle=False)


def _schedule(opt: torch.optim.Optimizer, total: int, warmup_fraction: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine to 0, per step (the kit's default schedule)."""
    warmup = int(warmup_fraction * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit(task: Any, images: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int, seed: int) -> float:
    """Train with the task's own step (loss + method regularisers) and AdamW; returns the last loss."""
    opt = optimizer_for(task)
    n = len(labels)
    steps_per_epoch = math.ceil(n / batch_size)
    sched = _schedule(opt, epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    task.train()
    loss = torch.tensor(float("nan"))
    with quiet_logging():
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            for s in range(0, n, batch_size):
                idx = order[s:s + batch_size]
                loss = train_step(task, {"image": images[idx], "label": labels[idx]}, opt)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss while training {task.method.name}")
                sched.step()
    return float(loss)


@torch.no_grad()
def accuracy(backbone: Any, head: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    from torchmetrics.classification import MulticlassAccuracy

    metric = MulticlassAccuracy(num_classes=head.out_features, average="micro")
    was = backbone.training
    backbone.eval()
    for s in range(0, len(labels), batch_size):
        x = images[s:s + batch_size]
        metric.update(head(backbone(backbone.preprocess(x))), labels[s:s + batch_size])
    backbone.train(was)
    return float(metric.compute())


def _backbone(config: TransferConfig, checkpoint: Path | None) -> TimmViT:
    import logging

    timm_log = logging.getLogger("timm")
    level = timm_log.level
    timm_log.setLevel(logging.WARNING)  # one "loading pretrained weights" line per run is noise here
    try:
        return _build_backbone(config, checkpoint)
    finally:
        timm_log.setLevel(level)


def _build_backbone(config: TransferConfig, checkpoint: Path | None) -> TimmViT:
    return TimmViT(ARCH, pretrained=False, checkpoint=str(checkpoint) if checkpoint else None,
                   img_size=config.image_size, model_args=config.model_args(), init_seed=0)


def pretrain(config: TransferConfig, directory: Path, data: dict[str, tuple[torch.Tensor, torch.Tensor]],
             log: Callable[[str], None]) -> tuple[Path, Path, bool]:
    """The source model, trained once and cached: (backbone file, head file, reused)."""
    from ..export import atomic_save_safetensors, atomic_write_text
    from ..tasks import ImageClassificationTask

    key = config.source_key()
    model_path, head_path = directory / f"source_{key}.safetensors", directory / f"source_{key}_head.safetensors"
    if model_path.is_file() and head_path.is_file():
        return model_path, head_path, True
    log(f"  pre-training the source model ({config.pretrain_epochs} epochs, {config.source_train} images) ...")
    torch.manual_seed(0)
    task = ImageClassificationTask(_backbone(config, None), method="full", num_classes=len(SOURCE_CLASSES),
                                   lr=config.pretrain_lr, weight_decay=config.weight_decay)
    started = time.time()
    loss = fit(task, *data["source_train"], epochs=config.pretrain_epochs, batch_size=config.batch_size, seed=0)
    atomic_save_safetensors(task.backbone.model.state_dict(), model_path, metadata={"format": "pt"})
    atomic_save_safetensors(task.head.state_dict(), head_path)
    atomic_write_text(directory / f"source_{key}.json", json.dumps(
        {"config": config.to_dict(), "generator_version": GENERATOR_VERSION, "final_loss": loss,
         "seconds": time.time() - started}, indent=1) + "\n")
    return model_path, head_path, False


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_transfer(specs: list[MethodSpec], config: TransferConfig, directory: Path,
                 method_args: dict[str, dict[str, Any]] | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    from safetensors.torch import load_file

    from ..tasks import ImageClassificationTask

    directory.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data = {
        "source_train": render(SOURCE_CLASSES, config.source_train, config.image_size, seed=1),
        "source_test": render(SOURCE_CLASSES, config.source_test, config.image_size, seed=2),
        "target_train": render(TARGET_CLASSES, config.target_train, config.image_size, seed=3),
        "target_test": render(TARGET_CLASSES, config.target_test, config.image_size, seed=4),
    }
    model_path, head_path, reused = pretrain(config, directory, data, log)
    source_head = nn.Linear(config.embed_dim, len(SOURCE_CLASSES))
    source_head.load_state_dict(load_file(head_path))
    source_acc = accuracy(_backbone(config, model_path), source_head, *data["source_test"])
    log(f"  source model: source test accuracy {source_acc:.3f}")

    # budgets made for ViT-B exceed a small ViT: give SPT the count of the default LoRA here
    from ..methods import build_method

    probe = _backbone(config, model_path)
    lora = build_method("lora")
    lora.apply(probe)
    defaults = {"spt_lora": {"budget": lora.trainable_parameters(probe)},
                "spt_adapter": {"budget": lora.trainable_parameters(probe)}}
    overrides = {name: args for name, args in defaults.items() if any(s.name == name for s in specs)}
    del probe, lora

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for spec in specs:
        runs = []
        for seed in config.seeds:
            t0 = time.time()
            torch.manual_seed(seed)
            method = spec.build(defaults)
            try:
                task = ImageClassificationTask(_backbone(config, model_path), method=method,
                                               num_classes=len(TARGET_CLASSES), lr=config.lr,
                                               weight_decay=config.weight_decay)
            except VisionFTError as e:  # e.g. a method that needs a CLIP text tower
                record_skip(spec, e, skipped, log)
                break
            method.prepare(task, TensorData(*data["target_train"], batch_size=config.batch_size))
            fit(task, *data["target_train"], epochs=config.epochs, batch_size=config.batch_size, seed=seed)
            trained = method.trainable_parameters(task.backbone)  # before MoSA folds its experts
            method.on_train_end(task)
            target = accuracy(task.backbone, task.head, *data["target_test"])
            retention = accuracy(task.backbone, source_head, *data["source_test"])
            runs.append({"seed": seed, "target_acc": target, "retention": retention,
                         "trainable_params": trained,
                         "head_params": sum(p.numel() for p in task.head.parameters()),
                         "seconds": time.time() - t0})
            log(f"  transfer {spec.label} seed {seed}: target {target:.3f}, retention {retention:.3f} "
                f"({runs[-1]['seconds']:.1f} s)")
            del task
        if not runs:
            continue
        row: dict[str, Any] = {"method": spec.label, "name": spec.name, "runs": runs,
                               "trainable_params": runs[0]["trainable_params"],
                               "trainable_with_head": runs[0]["trainable_params"] + runs[0]["head_params"]}
        for key in ("target_acc", "retention", "seconds"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r[key] for r in runs])
        row["retention_drop_mean"], row["retention_drop_std"] = _mean_std([source_acc - r["retention"] for r in runs])
        rows.append(row)
    return {"config": config.to_dict(), "generator_version": GENERATOR_VERSION,
            "source_classes": list(SOURCE_CLASSES), "target_classes": list(TARGET_CLASSES),
            "source_acc": source_acc, "checkpoint": str(model_path), "checkpoint_reused": reused,
            "seeds": list(config.seeds), "method_args": {**overrides, **(method_args or {})},
            "std": "sample standard deviation over seeds", "rows": rows, "skipped": skipped,
            "seconds": time.time() - started}
