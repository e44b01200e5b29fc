"""``ConversationData``: image and video conversations (LLaVA or messages layout) for vision-language fine-tuning.

Train / validation batches are processor batches with ``labels`` (see :mod:`vision_ft.data.conversations`).
Test and predict batches are lists of :class:`~vision_ft.data.conversations.Conversation`: the task asks the
model the last user turn of each and compares the answer with the last assistant reply. The processor is
the backbone's (taken from the model when the trainer sets the datamodule up), so training, export and
prediction share one chat template.

Samples longer than ``max_length`` tokens (image and video tokens included) are dropped and counted, or an
error (``on_overlength: error``): a sample is never cut, so media features and their tokens always match.
Videos are sampled per ``video_*`` keys (:mod:`vision_ft.data.vl_video`) and decoded when a sample is encoded.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Literal

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DataError
from .base import train_loader
from .conversations import Conversation, collate_vl, encode, read_records
from .vl_video import VideoSampling

log = logging.getLogger("vision_ft")


class _Encoded(Dataset):
    def __init__(self, convs: list[Conversation], processor: Any, train_on: str) -> None:
        self.convs, self.processor, self.train_on = convs, processor, train_on

    def __len__(self) -> int:
        return len(self.convs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return encode(self.processor, self.convs[i], self.train_on)


def _as_list(items: list[Any]) -> list[Any]:
    return items


class ConversationData(L.LightningDataModule):
    """Image conversations for :class:`~vision_ft.tasks.VisionLanguageSFTTask`.

    Args:
        train: training records (``.json`` list or ``.jsonl``).
        val: validation records; ``None`` carves ``val_fraction`` of ``train`` (seeded).
        test: test records (``None``: the validation records).
        image_root: folder image paths are relative to (default: each file's folder).
        max_length: tokens per sample, image tokens included.
        on_overlength: ``drop`` (counted) or ``error``; never cut.
        on_bad: ``error`` (file and line in the message) or ``skip`` and count bad records and missing images.
        train_on: supervise ``all`` assistant turns or only the ``last``.
        batch_size / eval_batch_size: conversations per training step / per generation step.
        video_fps / video_frames: frames per second taken from each video, or an exact count (wins);
            ``video_min_frames`` / ``video_max_frames`` bound it; rounded down to the model's temporal patch.
        video_folder_fps: the frame rate of videos given as folders of frame images.
    """

    def __init__(self, train: str, val: str | None = None, test: str | None = None, image_root: str | None = None,
                 val_fraction: float = 0.1, max_length: int = 2048,
                 on_overlength: Literal["drop", "error"] = "drop", on_bad: Literal["error", "skip"] = "error",
                 train_on: Literal["all", "last"] = "all", batch_size: int = 2, eval_batch_size: int = 4,
                 num_workers: int = 0, seed: int = 0, video_fps: float | None = 2.0, video_frames: int | None = None,
                 video_min_frames: int = 4, video_max_frames: int = 32, video_folder_fps: float = 1.0) -> None:
        super().__init__()
        self.sampling = VideoSampling(video_fps, video_frames, video_min_frames, video_max_frames, video_folder_fps)
        if on_overlength not in ("drop", "error"):
            raise ConfigError(f"data.init_args.on_overlength={on_overlength!r}: drop or error (a conversation with "
                              "images is never cut)")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.init_args.val_fraction={val_fraction}: choose a value in [0, 1)")
        self.train_path, self.val_path, self.test_path, self.image_root = train, val, test, image_root
        self.val_fraction, self.max_length, self.on_overlength, self.on_bad = val_fraction, max_length, on_overlength, on_bad
        self.train_on, self.batch_size, self.eval_batch_size = train_on, batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.processor: Any = None
        self.splits: dict[str, list[Conversation]] = {}
        self.report: dict[str, int] = {}

    def prepare_sample(self) -> None:
        """Packs with an embedded sample write it here, before any path is read."""

    def _processor(self) -> Any:
        if self.processor is None:
            model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            self.processor = getattr(getattr(model, "backbone", None), "processor", None)
        if self.processor is None:
            raise ConfigError("ConversationData needs the model's processor: use it with "
                              "vision_ft.tasks.VisionLanguageSFTTask, or set datamodule.processor")
        return self.processor

    def _read(self, path: str) -> list[Conversation]:
        convs, skipped = read_records(path, self.image_root, self.on_bad)
        self.report[f"skipped:{path}"] = len(skipped)
        for conv in convs:
            conv.sampling = self.sampling
        return convs

    def _fit_length(self, convs: list[Conversation], split: str) -> list[Conversation]:
        keep, dropped = [], []
        for conv in convs:
            try:
                n = len(encode(self._processor(), conv, self.train_on)["input_ids"])
            except DataError:
                if self.on_bad == "error":
                    raise
                dropped.append(conv.source)
                continue
            if n <= self.max_length:
                keep.append(conv)
            elif self.on_overlength == "error":
                raise DataError(f"{conv.source}: {n} tokens (media tokens included) > max_length={self.max_length} "
                                "(data.init_args.max_length; or on_overlength: drop)")
            else:
                dropped.append(conv.source)
        if dropped:
            log.warning("[vision_ft] %s: %d conversation(s) dropped (longer than max_length=%d tokens, or unreadable "
                        "images or videos); first: %s", split, len(dropped), self.max_length, dropped[0])
        self.report[f"{split}_dropped"] = len(dropped)
        return keep

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.prepare_sample()
        train = self._read(self.train_path)
        if self.val_path:
            val = self._read(self.val_path)
        else:
            order = np.random.default_rng(self.seed).permutation(len(train))
            n_val = max(1, int(round(self.val_fraction * len(train)))) if self.val_fraction > 0 and len(train) > 1 else 0
            val = [train[i] for i in sorted(order[:n_val])]
            train = [train[i] for i in sorted(order[n_val:])]
        test = self._read(self.test_path) if self.test_path else list(val)
        self.splits = {"train": self._fit_length(train, "train"), "val": self._fit_length(val, "val"),
                       "test": self._fit_length(test, "test")}
        if not self.splits["train"]:
            raise DataError(f"{self.train_path}: no conversation left to train on")

    def _collate(self) -> Any:
        return partial(collate_vl, pad_id=int(self._processor().tokenizer.pad_token_id))

    def train_dataloader(self) -> DataLoader:
        ds = _Encoded(self.splits["train"], self._processor(), self.train_on)
        return train_loader(ds, self.batch_size, self.seed, self.num_workers, trainer=self.trainer,
                            collate_fn=self._collate())

    def val_dataloader(self) -> DataLoader | list:
        if not self.splits["val"]:
            return []
        return DataLoader(_Encoded(self.splits["val"], self._processor(), self.train_on), batch_size=self.batch_size,
                          shuffle=False, num_workers=self.num_workers, collate_fn=self._collate())

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=self.eval_batch_size, shuffle=False, collate_fn=_as_list)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
