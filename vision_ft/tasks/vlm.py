"""Vision-language supervised fine-tuning (LLaVA, Qwen-VL): loss on assistant replies, generation at test time.

What trains: the method's tensors (``lora`` on the language model by default; the kit's site-based methods
on either tower with ``towers``) plus the parts listed in ``train_full`` (``vision_tower``, ``projector``,
``language_model``), each part with its own learning rate (``part_lr``). Parts trained in full are saved with
the adapter and checkpoints and written by the merged export, never dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..backbones import Backbone
from ..data.chat import IGNORE, render, shifted_loss
from ..data.conversations import Conversation, load_images, load_videos, process
from ..errors import AdapterError, ConfigError
from ..export import update_metrics
from ..io import atomic_write_text
from ..methods import Method
from .base import BaseTask
from .trained_parts import TrainedPartsMixin

PARTS = ("vision_tower", "projector", "language_model")


def normalise_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, spaces collapsed (the VQA answer normalisation)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


class VisionLanguageSFTTask(TrainedPartsMixin, BaseTask):
    """A vision-language model + PEFT method trained on image conversations.

    Args:
        train_full: parts trained in full besides the method (``vision_tower``, ``projector``,
            ``language_model``); the rest stays frozen.
        part_lr: learning rate per part (default ``lr``); the method's tensors take the rate of the part
            they sit in.
        max_new_tokens: generation length at test / predict time (greedy).
        point_radius: a predicted point within this many original-image pixels of a true object's centre is a hit.
        draw_limit: grounding answers drawn as PNG (true boxes green, answers red) in ``<run>/grounding/``.
        caption_metrics: the caption metrics of records with ``references`` (``bleu4``, ``meteor``, ``rouge_l``,
            ``cider``); METEOR starts a Java program (several seconds) on every test.
        (see :class:`BaseTask` for backbone, method and optimiser arguments)
    """

    task_name = "vision_language_sft"

    def __init__(
        self,
        backbone: Backbone,
        method: Method | str = "lora",
        train_full: list[str] | None = None,
        part_lr: dict[str, float] | None = None,
        max_new_tokens: int = 64,
        point_radius: float = 10.0,
        draw_limit: int = 8,
        caption_metrics: list[str] | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        head_lr: float | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        warmup_fraction: float = 0.03,
        min_lr_ratio: float = 0.0,
        ema_decay: float = 0.0,
        on_nonfinite: Literal["stop", "skip"] = "stop",
    ) -> None:
        if not hasattr(backbone, "processor") or not hasattr(backbone, "part_of"):
            raise ConfigError(f"{type(self).__name__} needs a vision-language model "
                              "(model.init_args.backbone: vision_ft.backbones.VisionLanguageModel)")
        train_full, part_lr = list(train_full or []), dict(part_lr or {})
        bad = sorted(set(train_full) - set(PARTS)) + sorted(set(part_lr) - set(PARTS))
        if bad:
            raise ConfigError(f"unknown part(s) {bad} (model.init_args.train_full / part_lr); parts: {list(PARTS)}")
        super().__init__(backbone, method, lr=lr, weight_decay=weight_decay, head_lr=head_lr, optimizer=optimizer,
                         warmup_fraction=warmup_fraction, min_lr_ratio=min_lr_ratio, ema_decay=ema_decay,
                         on_nonfinite=on_nonfinite)
        self.train_full, self.part_lr, self.max_new_tokens = train_full, part_lr, max_new_tokens
        for name, p in backbone.model.named_parameters():
            if backbone.part_of(name) in train_full and p.is_floating_point():
                p.requires_grad_(True)
        self._collect_trained_keys()
        self.point_radius, self.draw_limit = point_radius, draw_limit
        from ..metrics.captioning import METRICS

        self.caption_metrics_names = list(caption_metrics or METRICS)
        unknown = sorted(set(self.caption_metrics_names) - set(METRICS))
        if unknown:
            raise ConfigError(f"model.init_args.caption_metrics: unknown {unknown}; choose from {list(METRICS)}")
        self._records: list[dict[str, Any]] = []
        self._image_of: dict[str, Path] = {}

    def policy_description(self) -> str:
        return f"this model (parts trained in full: {self.train_full or 'none'})"

    @property
    def processor(self) -> Any:
        return self.backbone.processor

    def task_metadata(self) -> dict[str, Any]:
        args = dict(train_full=self.train_full, part_lr=self.part_lr, max_new_tokens=self.max_new_tokens,
                    point_radius=self.point_radius, draw_limit=self.draw_limit,
                    caption_metrics=self.caption_metrics_names)
        return {"chat_template": self.backbone.tokenizer.chat_template, "trainable_report": self.trainable_report(),
                "task_args": args}

    @classmethod
    def merge_overrides(cls, meta: dict[str, Any]) -> dict[str, Any]:
        """A QLoRA run merges into the full-precision base weights, so the export needs no bitsandbytes."""
        if meta["backbone"]["init_args"].get("quantization", "none") != "none":
            return {"quantization": "none"}
        return {}

    # --- optimisation ----------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """One group per (part, decay/no-decay), each part at its own learning rate."""
        buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, p in self.backbone.model.named_parameters():
            if p.requires_grad:
                buckets.setdefault((self.backbone.part_of(name), self.no_weight_decay(name, p)), []).append(p)
        return [{"params": ps, "weight_decay": 0.0 if no_decay else self.weight_decay,
                 "lr": self.part_lr.get(part, self.lr), "name": f"{part}{'/no_decay' if no_decay else ''}"}
                for (part, no_decay), ps in sorted(buckets.items())]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        rows = ", ".join(f"{part} {r['trainable']:,}/{r['total']:,}" for part, r in self.trainable_report().items())
        rank_zero_info(f"[vision_ft] trainable/total parameters: {rows}")

    # --- training ---------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.backbone(**{k: v for k, v in batch.items() if k != "labels"})

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The loss a training step back-propagates (``None``: a non-finite batch to skip); no logging."""
        logits = self(batch)
        loss, _ = shifted_loss(logits, batch["labels"])
        if "pixel_values" not in batch:
            loss = loss + (0.0 * self.backbone.vision_pass() if self._shards_parameters() else self._vision_side_zero())
        return self.checked_loss(self.add_regularizers(loss, {"logits": logits}, batch))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        loss = self.training_loss(batch)
        if loss is None:
            return None
        self.log_train_loss(loss, batch_idx, batch_size=batch["input_ids"].shape[0])
        return loss

    def _shards_parameters(self) -> bool:
        """FSDP or DeepSpeed ZeRO-3: a module's weights are gathered from every rank when it runs."""
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        name = type(strategy).__name__
        if name == "FSDPStrategy":
            return True
        if name == "DeepSpeedStrategy":
            return int((getattr(strategy, "config", None) or {}).get("zero_optimization", {}).get("stage", 0)) == 3
        return False

    def _vision_side_zero(self) -> torch.Tensor:
        """0 x the trainable vision-side tensors: a text-only batch then still gives every trainable tensor a
        (zero) gradient, so DDP ranks that drew text-only and image batches reduce the same tensors (no hang,
        no unused-parameter error) and the update is unchanged."""
        if not hasattr(self, "_vision_trainable"):
            self._vision_trainable = [p for n, p in self.backbone.model.named_parameters()
                                      if p.requires_grad and self.backbone.part_of(n) != "language_model"]
        zero = torch.zeros((), device=self.device)
        for p in self._vision_trainable:
            zero = zero + 0.0 * p.sum()
        return zero

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "pixel_values" not in batch and self._shards_parameters():
            with torch.no_grad():
                self.backbone.vision_pass()  # every rank gathers the vision side's weights, as in training
        logits = self(batch)
        loss, n = shifted_loss(logits, batch["labels"])
        target = batch["labels"][:, 1:]
        hit = ((logits[:, :-1].argmax(-1) == target) & (target != IGNORE)).sum()
        self.log("val/loss", loss, prog_bar=True, batch_size=int(n), sync_dist=True)
        self.log("val/token_acc", hit.float() / n.clamp(min=1), batch_size=int(n), sync_dist=True)

    # --- generation -------------------------------------------------------------------------------
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, list) and batch and isinstance(batch[0], Conversation):
            return batch  # encoded on the model's device when answered
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def prompt_inputs(self, conv: Conversation) -> tuple[dict[str, torch.Tensor], str]:
        """Processor inputs for the conversation up to its last assistant turn (with the images and videos
        that come before it), and that turn's text."""
        last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
        prefix = conv.messages[:last]
        reference = "".join(p.get("text", "") for p in conv.messages[last]["content"])
        count = {kind: sum(p["type"] == kind for m in prefix for p in m["content"]) for kind in ("image", "video")}
        images = load_images(conv)[:count["image"]]
        videos = load_videos(Conversation(conv.messages, source=conv.source, videos=conv.videos[:count["video"]],
                                          sampling=conv.sampling), self.processor)
        text = render(self.backbone.tokenizer, prefix, add_generation_prompt=True)
        enc = process(self.processor, text, images, videos)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in enc.items()}, reference

    @torch.no_grad()
    def answers(self, convs: Sequence[Conversation]) -> list[str]:
        """Greedy answers to several conversations in one ``generate`` call: each prompt is processed alone
        (the same tokens as one at a time), then left-padded so all of them end where the answers start."""
        from ..data.conversations import collate_vl

        tok = self.backbone.tokenizer
        encoded = []
        for conv in convs:
            enc, _ = self.prompt_inputs(conv)
            encoded.append({k: v[0] if k in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
                            else v for k, v in enc.items()})
        inputs = collate_vl(encoded, tok.pad_token_id, side="left")
        out = self.backbone.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                           use_cache=True, pad_token_id=tok.pad_token_id)
        width = inputs["input_ids"].shape[1]
        return [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]

    def answer(self, conv: Conversation) -> str:
        return self.answers([conv])[0]

    def _answer_all(self, batch: Sequence[Conversation]) -> list[dict[str, Any]]:
        records = []
        for conv, answer in zip(batch, self.answers(batch)):
            last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
            reference = "".join(p.get("text", "") for p in conv.messages[last]["content"])
            record = {"source": conv.source, "prompt": " | ".join(
                "".join(p.get("text", f"<{p['type']}>") for p in m["content"]) for m in conv.messages
                if m["role"] == "user"), "reference": reference, "answer": answer,
                "exact": normalise_answer(answer) == normalise_answer(reference)}
            if conv.grounding is not None and conv.images:
                record["grounding"] = {**conv.grounding, "parsed": self.in_original_pixels(answer, conv)}
            if conv.references is not None:
                record["references"] = list(conv.references)
            records.append(record)
        return records

    def in_original_pixels(self, answer: str, conv: Conversation) -> list[dict[str, Any]] | None:
        """The answer's objects with coordinates rescaled from the model's frame to the first image's pixels
        (``None``: unreadable)."""
        from PIL import Image

        from ..metrics.grounding import parse_answer, to_original

        objects = parse_answer(answer)
        if objects is None:
            return None
        with Image.open(conv.images[0]) as im:
            image = im.convert("RGB")
        frame, size = self.backbone.coordinate_frame, image.size
        resized = self.backbone.resized_size(image) if frame == "resized-pixels" else None
        out = []
        for o in objects:
            o = dict(o)
            for key in ("bbox_2d", "point_2d"):
                if key in o:
                    o[key] = to_original([float(v) for v in o[key]], frame, size, resized)
            out.append(o)
        return out

    def test_step(self, batch: Sequence[Conversation], batch_idx: int) -> None:
        self._image_of.update({c.source: c.images[0] for c in batch if c.images})
        self._records.extend(self._answer_all(batch))

    def _check_generation_strategy(self) -> None:
        if self._shards_parameters() and self.trainer.world_size > 1:
            raise ConfigError(f"generation across {self.trainer.world_size} ranks under "
                              f"{type(self.trainer.strategy).__name__}: prompts of different lengths and image "
                              "counts would run different collectives on each rank. Train with the sharded "
                              "fragment and --test_after_fit=false, then test or predict the run (or its merged "
                              "export) on one device or with configs/trainer/ddp.yaml")

    def on_test_epoch_start(self) -> None:
        self._check_generation_strategy()
        self._records = []

    def on_predict_epoch_start(self) -> None:
        self._check_generation_strategy()

    def on_test_epoch_end(self) -> None:
        from .gather import gather_records

        # every rank's answers, each conversation once: captioning's CIDEr and box mAP are corpus-level
        self._records = gather_records(self.trainer.world_size, self._records, "source")
        if self.trainer.world_size > 1:
            paths = gather_records(self.trainer.world_size, [{"source": s, "image": str(p)}
                                                             for s, p in self._image_of.items()], "source")
            self._image_of = {r["source"]: Path(r["image"]) for r in paths}
        if self._records:
            n = len(self._records)
            self.log("test/exact_match", sum(r["exact"] for r in self._records) / n, rank_zero_only=True)
            self.log("test/count", float(n), rank_zero_only=True)
            for key, value in self.grounding_metrics(self._records).items():
                self.log(f"test/{key}", value, rank_zero_only=True)
            for key, value in self.caption_metrics(self._records).items():
                self.log(f"test/{key}", value, rank_zero_only=True)

    def caption_metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """BLEU-4, METEOR, ROUGE-L and CIDEr of the answers of records with ``references`` (captioning), each
        answer against all its references (:func:`vision_ft.metrics.captioning.caption_scores`)."""
        from ..metrics.captioning import caption_scores

        captioned = [r for r in records if r.get("references")]
        if not captioned:
            return {}
        result = caption_scores({i: r["answer"] for i, r in enumerate(captioned)},
                                {i: r["references"] for i, r in enumerate(captioned)},
                                metrics=self.caption_metrics_names)
        if result["skipped"]:
            rank_zero_info(f"[vision_ft] caption metrics skipped: {result['skipped']}")
        return {k: float(v) for k, v in result.items() if k in ("bleu4", "meteor", "rouge_l", "cider")}

    def grounding_metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """count MAE, point accuracy, box mAP, mean best IoU and unparsed answers of the grounding records."""
        from ..metrics.grounding import GroundingScores

        grounded = [r["grounding"] for r in records if "grounding" in r]
        if not grounded:
            return {}
        labels = sorted({o["label"] for g in grounded for o in g["objects"]})
        scores = GroundingScores(labels, radius=self.point_radius)
        for g in grounded:
            scores.add(g["task"], g["parsed"], g["objects"])
        return scores.compute()

    def on_test_end(self) -> None:
        if not self._records or not self.trainer.is_global_zero or self.trainer.fast_dev_run:
            return
        self._write(self.run_dir / "predictions.jsonl", self._records)
        self._draw(self._records)
        if (self.run_dir / "adapter.json").is_file():
            update_metrics(self.run_dir, self.final_metrics("test/"))

    def predict_step(self, batch: Sequence[Conversation], batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        return self._answer_all(batch)

    def on_predict_epoch_end(self) -> None:
        outputs = self.trainer.predict_loop.predictions
        if self.trainer.is_global_zero and outputs:
            path = self.run_dir / "predictions.jsonl"
            self._write(path, [r for b in outputs for r in b])
            rank_zero_info(f"[vision_ft] answers written to {path}")

    def _draw(self, records: list[dict[str, Any]]) -> None:
        """The first ``draw_limit`` grounding answers drawn on their images (true boxes green, answers red)."""
        from PIL import Image

        from ..metrics.grounding import draw

        drawn = 0
        for r in records:
            if "grounding" not in r or drawn >= self.draw_limit:
                continue
            image_path = self._image_of.get(r["source"])
            if image_path is None:
                continue
            with Image.open(image_path) as im:
                name = f"{drawn:03d}_{r['grounding']['task']}.png"
                draw(im, r["grounding"]["parsed"], r["grounding"]["objects"], self.run_dir / "grounding" / name)
            drawn += 1

    @staticmethod
    def _write(path: Path, records: list[dict[str, Any]]) -> None:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))

    # --- export ------------------------------------------------------------------------------------
    def export_native(self, out_dir: str | Path) -> Path:
        """``save_pretrained`` of the merged model (parts trained in full included) and the processor."""
        return self.backbone.save_native(out_dir)

    def export_peft(self, out_dir: str | Path) -> Path:
        if self.train_full:
            raise AdapterError(f"parts trained in full ({', '.join(self.train_full)}) are not part of a peft adapter; "
                               "use `export --merge`, which writes them")
        out = Path(self.method.save_peft(self.backbone, out_dir))
        self.processor.save_pretrained(out)
        return out
