"""``InstructionData``: instruction / chat files for causal-LM fine-tuning, plus a multiple-choice test set.

Train batches are ``{"input_ids", "labels", "attention_mask"}`` (or ``position_ids`` instead of the mask
when ``packing`` puts several samples in one row without attention between them). Test batches are lists
of :class:`~vision_ft.data.mcq.MCQItem` when ``test_mcq`` is set (scored by the task), otherwise SFT
batches of the validation split. The tokenizer is the backbone's (taken from the model when the trainer
sets the datamodule up), so the chat template is the one export and prediction use.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from ..errors import ConfigError, DataError
from .base import train_loader
from .chat import Tokenized, collate, pack, tokenize_all
from .instructions import read_conversations
from .mcq import MCQItem, read_mcq

log = logging.getLogger("vision_ft")


def _list(items: list[Any]) -> list[Any]:
    return items


class InstructionData(L.LightningDataModule):
    """Instruction-tuning data (``.jsonl``/``.json``, instruction or chat layout) and an optional MCQ test file.

    Args:
        train: training records (see :mod:`vision_ft.data.instructions` for the layouts).
        val: validation records; ``None`` carves ``val_fraction`` of ``train`` (seeded).
        val_fraction: share of ``train`` held out when ``val`` is not given.
        test_mcq: TeleQnA-style questions (``.json``/``.txt``, ``.jsonl`` or the ``.zip``) for the test.
        mcq_password: password of an encrypted ``test_mcq`` zip.
        mcq_limit: score only the first N questions (``None``: all).
        system_prompt: a system turn put before every conversation that has none.
        max_length: tokens per sample (and per packed row).
        on_overlength: ``drop`` (counted), ``truncate`` or ``error`` for longer samples.
        on_bad: ``error`` on a bad record (file and line in the message) or ``skip`` and count it.
        train_on: supervise ``all`` assistant turns or only the ``last``.
        packing: several samples per row (no attention across them).
        batch_size: rows per training step; ``mcq_batch_size`` questions per test step.
        seed: split and shuffle seed.
    """

    def __init__(
        self,
        train: str,
        val: str | None = None,
        val_fraction: float = 0.1,
        test_mcq: str | None = None,
        mcq_password: str | None = None,
        mcq_limit: int | None = None,
        system_prompt: str | None = None,
        max_length: int = 512,
        on_overlength: Literal["drop", "truncate", "error"] = "drop",
        on_bad: Literal["error", "skip"] = "error",
        train_on: Literal["all", "last"] = "all",
        packing: bool = False,
        batch_size: int = 8,
        mcq_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.init_args.val_fraction={val_fraction}: choose a value in [0, 1)")
        if max_length < 8:
            raise ConfigError(f"data.init_args.max_length={max_length} is too small")
        self.train_path, self.val_path, self.val_fraction = train, val, val_fraction
        self.test_mcq, self.mcq_password, self.mcq_limit = test_mcq, mcq_password, mcq_limit
        self.system_prompt, self.max_length = system_prompt, max_length
        self.on_overlength, self.on_bad, self.train_on, self.packing = on_overlength, on_bad, train_on, packing
        self.batch_size, self.mcq_batch_size, self.num_workers, self.seed = batch_size, mcq_batch_size, num_workers, seed
        self.tokenizer: Any = None
        self.splits: dict[str, Tokenized] = {}
        self.mcq: list[MCQItem] = []
        self.report: dict[str, Any] = {}

    # --- set-up ---------------------------------------------------------------------------------
    def prepare_sample(self) -> None:
        """Packs with an embedded sample write it here (before any path is read)."""

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            self.tokenizer = getattr(getattr(model, "backbone", None), "tokenizer", None)
        if self.tokenizer is None:
            raise ConfigError("InstructionData needs the model's tokenizer: use it with a causal-LM task "
                              "(vision_ft.tasks.CausalLMSFTTask), or set datamodule.tokenizer")
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.prepare_sample()
        tok = self._tokenizer()
        train, skipped = read_conversations(self.train_path, self.system_prompt, self.on_bad)
        self.report["train_skipped"] = len(skipped)
        if self.val_path:
            val, vskipped = read_conversations(self.val_path, self.system_prompt, self.on_bad)
            self.report["val_skipped"] = len(vskipped)
        else:
            order = np.random.default_rng(self.seed).permutation(len(train))
            n_val = int(round(self.val_fraction * len(train)))
            if self.val_fraction > 0 and n_val == 0 and len(train) > 1:
                n_val = 1
            val = [train[i] for i in sorted(order[:n_val])]
            train = [train[i] for i in sorted(order[n_val:])]
        if not train:
            raise DataError(f"{self.train_path}: nothing left to train on after the validation split")
        for name, convs in (("train", train), ("val", val)):
            out = tokenize_all(tok, convs, self.max_length, self.on_overlength, self.train_on)
            if out.dropped:
                log.warning("[vision_ft] %s: %d sample(s) longer than max_length=%d or without a supervised "
                            "token dropped (first: %s)", name, len(out.dropped), self.max_length, out.dropped[0])
            self.report[f"{name}_dropped"], self.report[f"{name}_truncated"] = len(out.dropped), out.truncated
            self.splits[name] = out
        if not len(self.splits["train"]):
            raise DataError(f"{self.train_path}: every sample was dropped (max_length={self.max_length})")
        if self.test_mcq:
            items, mskipped = read_mcq(self.test_mcq, self.mcq_password, self.on_bad)
            self.mcq = items[: self.mcq_limit] if self.mcq_limit else items
            self.report["mcq_skipped"] = len(mskipped)

    def _rows(self, split: str, packed: bool) -> list[list[tuple[list[int], list[int]]]]:
        data = self.splits[split]
        pairs = list(zip(data.input_ids, data.labels))
        if not packed:
            return [[p] for p in pairs]
        return [[pairs[i] for i in row] for row in pack(data, self.max_length)]

    def _collate(self) -> Any:
        return partial(collate, pad_id=int(self._tokenizer().pad_token_id))

    # --- loaders --------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return train_loader(self._rows("train", self.packing), self.batch_size, self.seed, self.num_workers,
                            trainer=self.trainer, collate_fn=self._collate())

    def val_dataloader(self) -> DataLoader | list:
        rows = self._rows("val", False)
        if not rows:
            return []
        return DataLoader(rows, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=self._collate())

    def test_dataloader(self) -> DataLoader | list:
        if self.mcq:
            return DataLoader(self.mcq, batch_size=self.mcq_batch_size, shuffle=False, collate_fn=_list)
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader | list:
        if not self.mcq:
            raise ConfigError("predict answers the questions of data.init_args.test_mcq; set it")
        return DataLoader(self.mcq, batch_size=self.mcq_batch_size, shuffle=False, collate_fn=_list)

    @property
    def paths(self) -> dict[str, str | None]:
        return {"train": str(Path(self.train_path)), "val": self.val_path, "test_mcq": self.test_mcq}
