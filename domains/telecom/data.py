"""Telecom pack datamodule: instruction records + TeleQnA-style questions, or the embedded synthetic sample.

With ``train`` unset the pack runs offline on a SYNTHETIC sample generated on first use (see
:mod:`domains.telecom.sample`) and says so in the log. Given paths must exist: nothing is generated at a
user path.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vision_ft.data import InstructionData

from .sample import SAMPLE_FILES, write_sample

log = logging.getLogger("vision_ft")


class TelecomData(InstructionData):
    """:class:`~vision_ft.data.InstructionData` with an offline default.

    Args:
        train: instruction / chat records (``.jsonl``); ``None`` uses the embedded synthetic sample (and, when
            ``test_mcq`` is also ``None``, its TeleQnA-layout questions as the test).
        sample_dir: where the synthetic sample is written (once; reused if present).
        **kwargs: :class:`~vision_ft.data.InstructionData` options (``test_mcq``, ``mcq_password``, ...).
    """

    def __init__(self, train: str | None = None, sample_dir: str = "data/telecom_sample", **kwargs: Any) -> None:
        self.synthetic = train is None
        self.sample_dir = Path(sample_dir)
        if train is None:
            train = str(self.sample_dir / SAMPLE_FILES[0])
            if kwargs.get("test_mcq") is None:
                kwargs["test_mcq"] = str(self.sample_dir / SAMPLE_FILES[1])
        super().__init__(train=train, **kwargs)

    def prepare_sample(self) -> None:
        if not self.synthetic:
            return
        if not all((self.sample_dir / f).is_file() for f in SAMPLE_FILES):
            write_sample(self.sample_dir)
        log.warning("data: using the embedded SYNTHETIC telecom sample in %s (templated statements, not TeleQnA); "
                    "set data.init_args.train and data.init_args.test_mcq (see datasets_cards/teleqna.md)",
                    self.sample_dir)
