"""Medical synthesis pack: text-to-image data whose captions come from a labelled medical dataset.

The captioned-folder layout (:class:`~vision_ft.data.captioned.CaptionedImageData`: images + ``metadata.jsonl``)
is written once from a MedMNIST-style ``.npz`` (``path``: e.g. ``pathmnist.npz``) or, with ``path`` unset, from
the pack's SYNTHETIC sample (:mod:`domains.medical.sample`, generated shapes, not medical data), each image
captioned by ``template.format(class name)``: "a histology patch showing fibrosis". A real captioned dataset
(``metadata.jsonl`` or ``.txt`` captions) is used as is with ``root``. Nothing is ever written inside a
user's data folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from vision_ft.data.captioned import METADATA, CaptionedImageData
from vision_ft.errors import ConfigError, DataError
from vision_ft.io import atomic_save_png, atomic_write_text

from .sample import CLASS_NAMES, make_split

log = logging.getLogger("vision_ft")

TEMPLATE = "a histology patch showing {}"


def write_captioned(folder: str | Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                    class_names: list[str], template: str = TEMPLATE) -> Path:
    """``folder/<split>/<i>.png`` + ``metadata.jsonl`` (``file_name``, ``text``) for each split."""
    folder = Path(folder)
    for split, imgs in images.items():
        lines = []
        for i, (img, y) in enumerate(zip(imgs, labels[split].reshape(len(imgs), -1)[:, 0])):
            name = f"{i:05d}.png"
            atomic_save_png(img if img.ndim == 3 else img[..., None].repeat(3, -1), folder / split / name)
            lines.append(json.dumps({"file_name": name, "text": template.format(class_names[int(y)])}))
        atomic_write_text(folder / split / METADATA, "\n".join(lines) + "\n")
    return folder


def write_synthetic(folder: str | Path, n_train: int = 64, n_val: int = 8, size: int = 32, seed: int = 0,
                    template: str = TEMPLATE) -> Path:
    images, labels = {}, {}
    for i, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        images[split], labels[split] = make_split(n, size, np.random.default_rng([seed, 10 + i]))
    return write_captioned(folder, images, labels, list(CLASS_NAMES), template)


def npz_to_captioned(npz: str | Path, folder: str | Path, class_names: list[str], template: str = TEMPLATE,
                     limit: int | None = None) -> Path:
    """A MedMNIST ``.npz`` (``train_images``/``train_labels``...) as a captioned folder."""
    with np.load(npz, allow_pickle=False) as data:
        splits = [s for s in ("train", "val", "test") if f"{s}_images" in data]
        if "train" not in splits:
            raise DataError(f"{npz} has no train_images / train_labels (MedMNIST layout)")
        images = {s: data[f"{s}_images"][:limit] for s in splits}
        labels = {s: data[f"{s}_labels"][:limit] for s in splits}
    top = max(int(v.max()) for v in labels.values()) + 1
    if len(class_names) < top:
        raise ConfigError(f"data.init_args.class_names has {len(class_names)} names but {npz} has labels up to {top - 1}")
    return write_captioned(folder, images, labels, class_names, template)


class MedicalSynthesisData(CaptionedImageData):
    """Captioned medical images for text-to-image fine-tuning (see the module doc).

    Args:
        root: a captioned image folder (``metadata.jsonl`` or ``.txt`` captions); takes precedence.
        path: a MedMNIST ``.npz`` whose labels become captions (written once to ``sample_dir``).
        class_names: names of the ``.npz`` labels (default: the synthetic sample's).
        template: caption template with one ``{}`` for the class name.
        sample_dir: where the captioned folder of ``path`` or of the synthetic sample is written.
        limit: at most this many images per split from ``path``.
        **kwargs: :class:`~vision_ft.data.captioned.CaptionedImageData` options.
    """

    def __init__(self, root: str | None = None, path: str | None = None, class_names: list[str] | None = None,
                 template: str = TEMPLATE, sample_dir: str = "data/medical_synthesis_sample",
                 limit: int | None = None, **kwargs) -> None:
        if "{}" not in template:
            raise ConfigError(f"data.init_args.template={template!r} needs one '{{}}' for the class name")
        if root is None:
            names = list(class_names or CLASS_NAMES)
            tag = "synthetic" if path is None else Path(path).stem
            folder = Path(sample_dir) / f"{tag}_v1"
            if not (folder / "train" / METADATA).is_file():
                if path is None:
                    write_synthetic(folder, size=int(kwargs.get("image_size", 32)), template=template)
                else:
                    if not Path(path).is_file():
                        raise DataError(f"data.init_args.path={path!r}: no such file")
                    npz_to_captioned(path, folder, names, template, limit)
            if path is None:
                log.warning("data: using the embedded SYNTHETIC captioned sample %s (generated shapes, not medical "
                            "data); set data.init_args.root to a captioned folder or data.init_args.path to a MedMNIST "
                            ".npz (see datasets_cards/medical_synthesis.md)", folder)
            root = str(folder)
        super().__init__(root=root, **kwargs)
