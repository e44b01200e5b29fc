"""Medical pack datamodule: a real MedMNIST ``.npz``, or the embedded synthetic sample.

With ``path`` unset the pack runs offline on a SYNTHETIC sample generated on first
use (see :mod:`domains.medical.sample`), and says so in the log. A given ``path``
must exist: nothing is ever generated at a user path.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vision_ft.data import MedMNISTData

from .sample import CLASS_NAMES, write_sample

log = logging.getLogger("vision_ft")

SAMPLE_FILE = "synthetic_medmnist_v1.npz"


class MedicalSampleData(MedMNISTData):
    """:class:`~vision_ft.data.MedMNISTData` with an offline default.

    Args:
        path: a MedMNIST ``.npz`` (e.g. ``pathmnist.npz``); ``None`` uses the embedded
            synthetic sample.
        sample_dir: where the synthetic sample is generated (once; reused if present).
        **kwargs: :class:`~vision_ft.data.ClassificationData` options. With the sample,
            ``class_names`` defaults to :data:`~domains.medical.sample.CLASS_NAMES`.
    """

    def __init__(self, path: str | None = None, sample_dir: str = "data/medical_sample", **kwargs):
        self.synthetic = path is None
        if path is None:
            target = Path(sample_dir) / SAMPLE_FILE
            if not target.is_file():
                write_sample(target)
            log.warning("data: using the embedded SYNTHETIC sample %s (generated shapes, not medical data); set "
                        "data.init_args.path to a real MedMNIST .npz (see datasets_cards/medmnist.md)", target)
            if kwargs.get("class_names") is None:
                kwargs["class_names"] = list(CLASS_NAMES)
            path = str(target)
        super().__init__(path=path, **kwargs)
