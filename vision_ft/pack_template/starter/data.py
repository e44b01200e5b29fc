"""The pack's datamodule: class folders of images, or the embedded synthetic sample.

With ``root`` unset the pack runs offline on a SYNTHETIC sample generated on first use (see
``sample.py``), and says so in the log. A given ``root`` must exist: nothing is generated at a
user path.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vision_ft.data import ImageFolderData

from .sample import is_complete, write_sample

log = logging.getLogger("vision_ft")


class StarterData(ImageFolderData):
    """:class:`~vision_ft.data.ImageFolderData` with an offline default.

    Args:
        root: ``root/train/<class>/<image>`` (``val/`` and ``test/`` optional); ``None`` uses the
            embedded synthetic sample.
        sample_dir: where the synthetic sample is generated (once; reused if present).
        **kwargs: :class:`~vision_ft.data.ImageFolderData` / ``ClassificationData`` options.
    """

    def __init__(self, root: str | None = None, sample_dir: str = "data/starter_sample", **kwargs):
        self.synthetic = root is None
        if root is None:
            if not is_complete(Path(sample_dir)):
                write_sample(sample_dir)
            log.warning("data: using the embedded SYNTHETIC sample %s (generated shapes); set data.init_args.root "
                        "to your dataset (see datasets_cards/starter.md)", sample_dir)
            root = sample_dir
        super().__init__(root=root, **kwargs)
