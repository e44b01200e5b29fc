"""Causal-LM supervised fine-tuning, with multiple-choice evaluation (TeleQnA style) as the test.

Training: next-token cross-entropy on the assistant replies only (label masks built by
:mod:`vision_ft.data.chat`, shifted once here). Validation: ``val/loss`` and ``val/token_acc``.
Test (and ``predict``) on multiple-choice questions: ``loglik`` (each option's reply scored by the model)
or ``generate`` (greedy answer, then parsed), giving ``test/mcq_acc``, ``test/mcq_unparsed`` and
``test/mcq_acc_<category>``, and ``mcq_predictions.jsonl`` in the run directory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from ..backbones import Backbone
from ..data.chat import IGNORE, render, shifted_loss
from ..data.mcq import MCQItem, answer_text, mcq_prompt
from ..errors import ConfigError
from ..export import update_metrics
from ..io import atomic_write_text
from ..methods import Method
from ..metrics.mcq import choose, extract_choice, option_logliks, summarise
from .base import BaseTask

DEFAULT_INSTRUCTION = "Answer with the number and the text of the correct option."


class CausalLMSFTTask(BaseTask):
    """A causal LM + PEFT method trained on chat / instruction data; tested on multiple-choice questions.

    Args:
        mcq_mode: ``loglik`` (score every option's reply; default) or ``generate`` (greedy, then parse).
        mcq_normalise: ``sum`` of the reply's token log-probabilities or their ``mean`` (loglik mode).
        answer_format: how a reply names option ``k``: ``{k}`` (1-based) and ``{text}``; the replies the
            loglik mode scores, and the format training answers should use.
        mcq_instruction: the line after the options in the question turn.
        system_prompt: a system turn before each question (``None``: none).
        max_new_tokens: generation length (generate mode, ``predict``).
        (see :class:`BaseTask` for backbone, method and optimiser arguments)
    """

    task_name = "causal_lm_sft"

    def __init__(
        self,
        backbone: Backbone,
        method: Method | str = "lora",
        mcq_mode: Literal["loglik", "generate"] = "loglik",
        mcq_normalise: Literal["sum", "mean"] = "sum",
        answer_format: str = "option {k}: {text}",
        mcq_instruction: str = DEFAULT_INSTRUCTION,
        system_prompt: str | None = None,
        max_new_tokens: int = 32,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        head_lr: float | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        warmup_fraction: float = 0.03,
        min_lr_ratio: float = 0.0,
        ema_decay: float = 0.0,
        on_nonfinite: Literal["stop", "skip"] = "stop",
    ) -> None:
        if getattr(backbone, "tokenizer", None) is None:
            raise ConfigError(f"{type(self).__name__} needs a language model with a tokenizer "
                              "(model.init_args.backbone: vision_ft.backbones.CausalLM)")
        if mcq_mode not in ("loglik", "generate") or mcq_normalise not in ("sum", "mean"):
            raise ConfigError("model.init_args.mcq_mode: loglik | generate; mcq_normalise: sum | mean")
        if "{k}" not in answer_format:
            raise ConfigError(f"model.init_args.answer_format={answer_format!r} must contain {{k}}")
        super().__init__(backbone, method, lr=lr, weight_decay=weight_decay, head_lr=head_lr, optimizer=optimizer,
                         warmup_fraction=warmup_fraction, min_lr_ratio=min_lr_ratio, ema_decay=ema_decay,
                         on_nonfinite=on_nonfinite)
        self.mcq_mode, self.mcq_normalise, self.answer_format = mcq_mode, mcq_normalise, answer_format
        self.mcq_instruction, self.system_prompt, self.max_new_tokens = mcq_instruction, system_prompt, max_new_tokens
        self._records: list[dict[str, Any]] = []

    @property
    def tokenizer(self) -> Any:
        return self.backbone.tokenizer

    def task_metadata(self) -> dict[str, Any]:
        args = dict(mcq_mode=self.mcq_mode, mcq_normalise=self.mcq_normalise, answer_format=self.answer_format,
                    mcq_instruction=self.mcq_instruction, system_prompt=self.system_prompt,
                    max_new_tokens=self.max_new_tokens)
        return {"chat_template": self.tokenizer.chat_template, "task_args": args}

    @classmethod
    def merge_overrides(cls, meta: dict[str, Any]) -> dict[str, Any]:
        """Backbone overrides for ``export --merge``: a QLoRA run merges into the full-precision base weights
        (the ones it quantised on load), so the export loads with transformers alone."""
        if meta["backbone"]["init_args"].get("quantization", "none") != "none":
            return {"quantization": "none"}
        return {}

    # --- training -------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss, n = shifted_loss(logits, batch["labels"])
        self.log("train/tokens", n.float(), reduce_fx="sum", on_step=False, on_epoch=True)
        loss = self.checked_loss(self.add_regularizers(loss, {"logits": logits}, batch))
        if loss is None:
            return None
        self.log_train_loss(loss, batch_idx, batch_size=batch["input_ids"].shape[0])
        return loss

    def _eval_lm(self, batch: dict[str, torch.Tensor], prefix: str) -> None:
        logits = self(batch)
        loss, n = shifted_loss(logits, batch["labels"])
        target = batch["labels"][:, 1:]
        hit = ((logits[:, :-1].argmax(-1) == target) & (target != IGNORE)).sum()
        self.log(f"{prefix}loss", loss, prog_bar=prefix == "val/", batch_size=int(n), sync_dist=True)
        self.log(f"{prefix}token_acc", hit.float() / n.clamp(min=1), batch_size=int(n), sync_dist=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_lm(batch, "val/")

    # --- multiple choice ---------------------------------------------------------------------------
    def question_ids(self, item: MCQItem) -> list[int]:
        """Token ids of the question turn, ending with the assistant's generation prompt."""
        messages = [{"role": "user", "content": mcq_prompt(item, self.mcq_instruction)}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = render(self.tokenizer, messages, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def option_scores(self, items: Sequence[MCQItem]) -> list[list[tuple[float, int]]]:
        """``(log-likelihood, tokens)`` of every option's reply for every item."""
        prompts = [self.question_ids(it) for it in items]
        conts = [[self.tokenizer(answer_text(it, k, self.answer_format), add_special_tokens=False)["input_ids"]
                  for k in range(len(it.options))] for it in items]
        return option_logliks(lambda ids, mask: self.backbone(ids, mask), prompts, conts,
                              int(self.tokenizer.pad_token_id), device=self.device)

    @torch.no_grad()
    def generate_answers(self, items: Sequence[MCQItem]) -> list[str]:
        """Greedy replies (left-padded batch), decoded without special tokens."""
        prompts = [self.question_ids(it) for it in items]
        width = max(len(p) for p in prompts)
        pad = int(self.tokenizer.pad_token_id)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = self.backbone.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                           max_new_tokens=self.max_new_tokens, do_sample=False, use_cache=True,
                                           pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id)
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]

    def answer(self, items: Sequence[MCQItem]) -> list[dict[str, Any]]:
        """One record per item: prediction (0-based or ``None``), gold answer, category and the evidence."""
        records = []
        if self.mcq_mode == "loglik":
            for it, scores in zip(items, self.option_scores(items)):
                records.append({"id": it.id, "category": it.category, "answer": it.answer,
                                "pred": choose(scores, self.mcq_normalise),
                                "logliks": [round(s, 4) for s, _ in scores]})
        else:
            for it, text in zip(items, self.generate_answers(items)):
                records.append({"id": it.id, "category": it.category, "answer": it.answer,
                                "pred": extract_choice(text, it.options), "generated": text})
        return records

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, list) and batch and isinstance(batch[0], MCQItem):
            return batch  # questions are text; they are tokenised on the model's device when scored
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, dict):
            self._eval_lm(batch, "test/")
            return
        self._records.extend(self.answer(batch))

    def on_test_epoch_start(self) -> None:
        self._records = []

    def on_test_epoch_end(self) -> None:
        records = self._gather(self._records)
        if not records:
            return
        for key, value in summarise(records).items():
            self.log(key, value, rank_zero_only=True)
        self._mcq_done = records

    def _gather(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from .gather import gather_records

        return gather_records(self.trainer.world_size, records, "id")

    def on_test_end(self) -> None:
        records = getattr(self, "_mcq_done", None)
        if not records or not self.trainer.is_global_zero or self.trainer.fast_dev_run:
            return
        run_dir = self.run_dir
        self._write_jsonl(run_dir / "mcq_predictions.jsonl", records)
        if (run_dir / "adapter.json").is_file():
            update_metrics(run_dir, {k: round(v, 6) for k, v in summarise(records).items()})
            rank_zero_info(f"[vision_ft] test metrics added to {run_dir / 'adapter.json'}")

    @staticmethod
    def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
        shown = [{**r, "answer": r["answer"] + 1, "pred": None if r["pred"] is None else r["pred"] + 1}
                 for r in records]  # option numbers as the file writes them (1-based)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in shown))

    # --- predict ---------------------------------------------------------------------------------
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        mode = self.mcq_mode
        self.mcq_mode = "generate"
        try:
            return self.answer(batch)
        finally:
            self.mcq_mode = mode

    def on_predict_epoch_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        outputs = self.trainer.predict_loop.predictions
        records = [r for batch in outputs for r in batch] if outputs else []
        if records:
            path = self.run_dir / "predictions.jsonl"
            self._write_jsonl(path, records)
            rank_zero_info(f"[vision_ft] {len(records)} answers written to {path}")

    # --- export ------------------------------------------------------------------------------------
    def export_peft(self, out_dir: str | Path) -> Path:
        """peft's adapter files plus the tokenizer with the training chat template."""
        out = Path(self.method.save_peft(self.backbone, out_dir))
        self.tokenizer.save_pretrained(out)
        return out

    def export_native(self, out_dir: str | Path) -> Path:
        """The (merged) model and its tokenizer with the chat template used in training: ``save_pretrained``."""
        return self.backbone.save_native(out_dir)
