"""The Lightning datamodule: paths and splits of COCO-format detection data, held-out validation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
from pycocotools.coco import COCO

from ...errors import ConfigError, DataError
from ..base import SplitLoaders
from .annotations import AnnotationReport, build_coco, load_coco_json, subset_dataset, validate_coco
from .categories import CategoryMap
from .dataset import CocoDetectionDataset, build_transforms, detection_collate

log = logging.getLogger("vision_ft")

DETECTION_SPLITS = ("train", "val", "test")


class COCODetectionData(SplitLoaders, L.LightningDataModule):
    """COCO-format detection data for any ``instances_*.json`` + image folder.

    Paths are relative to ``root`` unless absolute; the defaults match a layout
    ``root/annotations/instances_{train,val}.json`` + ``root/images/{train,val}/``. For COCO 2017
    set ``train_ann=annotations/instances_train2017.json``, ``train_images=train2017`` (and
    the same for val).

    Args:
        root: base folder of the paths below.
        train_ann, train_images: training annotation file and image folder.
        val_ann, val_images: validation split; ``val_ann: null`` holds out ``val_fraction``
            of the training images (seeded) instead.
        test_ann, test_images: test split; ``null`` tests (and predicts) on the validation split.
        image_size: images are resized to ``image_size × image_size`` (D-FINE: 640).
        batch_size, num_workers: loader settings (per device).
        augment: training augmentation on/off (flip and the optional ops below).
        hflip_prob: horizontal flip probability when ``augment``.
        zoom_out, iou_crop, photometric: D-FINE's RandomZoomOut / RandomIoUCrop /
            RandomPhotometricDistort (off by default: they need longer schedules).
        on_bad_annotation: ``skip`` (count, log, keep going) or ``error`` (stop at the first
            bad annotation or missing image file, naming it).
        clip_tolerance: boxes overshooting the image by at most this many pixels are clipped;
            beyond it they count as out-of-image.
        min_box_size: boxes narrower or shorter than this (pixels, after clipping) are bad.
        class_names: display names (default: the categories' names, in sorted-id order).
        val_fraction: share of training images held out when there is no ``val_ann``.
        seed: seed of the held-out draw and of the training order.
    """

    collate_fn = staticmethod(detection_collate)

    def __init__(
        self,
        root: str = ".",
        train_ann: str = "annotations/instances_train.json",
        train_images: str = "images/train",
        val_ann: str | None = "annotations/instances_val.json",
        val_images: str | None = "images/val",
        test_ann: str | None = None,
        test_images: str | None = None,
        image_size: int = 640,
        batch_size: int = 4,
        num_workers: int = 0,
        augment: bool = True,
        hflip_prob: float = 0.5,
        zoom_out: bool = False,
        iou_crop: bool = False,
        photometric: bool = False,
        on_bad_annotation: Literal["skip", "error"] = "skip",
        clip_tolerance: float = 1.0,
        min_box_size: float = 1.0,
        class_names: list[str] | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for key, value, low in (("batch_size", batch_size, 1), ("image_size", image_size, 32),
                                ("num_workers", num_workers, 0)):
            if int(value) < low:
                raise ConfigError(f"data.init_args.{key} must be >= {low}, got {value}")
        if on_bad_annotation not in ("skip", "error"):
            raise ConfigError(f"data.init_args.on_bad_annotation must be 'skip' or 'error', got {on_bad_annotation!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.init_args.val_fraction must be in (0, 1), got {val_fraction}")
        if clip_tolerance < 0 or min_box_size < 0:
            raise ConfigError("data.init_args.clip_tolerance and min_box_size must be >= 0")
        self.root = Path(root)
        self.paths = {"train": (train_ann, train_images), "val": (val_ann, val_images),
                      "test": (test_ann, test_images)}
        for split, (ann, images) in self.paths.items():
            if (ann is None) != (images is None):
                raise ConfigError(f"data.init_args.{split}_ann and {split}_images must be set together")
        self.image_size, self.batch_size, self.num_workers = int(image_size), int(batch_size), int(num_workers)
        self.augment, self.hflip_prob = augment, float(hflip_prob)
        self.zoom_out, self.iou_crop, self.photometric = zoom_out, iou_crop, photometric
        self.on_bad_annotation, self.clip_tolerance = on_bad_annotation, float(clip_tolerance)
        self.min_box_size, self.val_fraction, self.seed = float(min_box_size), float(val_fraction), int(seed)

        # categories come from the training file and fix the label space before setup, so the
        # CLI can link num_classes / class_names into the model at instantiation
        self._raw: dict[str, dict] = {"train": load_coco_json(self._resolve(train_ann))}
        self.categories = CategoryMap.from_categories(self._raw["train"]["categories"], source=str(train_ann))
        if class_names is not None and len(class_names) != len(self.categories):
            raise ConfigError(f"data.init_args.class_names has {len(class_names)} names but {train_ann} has "
                              f"{len(self.categories)} categories")
        self.num_classes = len(self.categories)
        self.class_names = list(class_names) if class_names is not None else list(self.categories.names)
        self.category_ids = list(self.categories.ids)
        self.reports: dict[str, AnnotationReport] = {}
        self._datasets: dict[str, tuple[dict, Path, str]] = {}  # split -> (clean dataset, image dir, source)
        self._coco: dict[str, COCO] = {}

    # --- paths and splits ---------------------------------------------------------------------
    def _resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.root / p

    def _load(self, split: str) -> tuple[dict, Path, str] | None:
        ann, images = self.paths[split]
        if ann is None:
            return None
        source = str(self._resolve(ann))
        raw = self._raw.get(split) or load_coco_json(source)
        if split != "train":
            self._check_categories(raw, source)
        image_dir = self._resolve(images)
        if not image_dir.is_dir():
            raise DataError(f"image folder {str(image_dir)!r} (data.init_args.{split}_images) not found")
        dataset, report = validate_coco(raw, self.categories, image_dir=image_dir, source=source,
                                        on_bad=self.on_bad_annotation, clip_tolerance=self.clip_tolerance,
                                        min_box_size=self.min_box_size)
        report.log(split)
        self.reports[split] = report
        if not dataset["images"]:
            raise DataError(f"{source}: no usable images in the {split} split")
        return dataset, image_dir, source

    def _check_categories(self, raw: dict, source: str) -> None:
        theirs = CategoryMap.from_categories(raw["categories"], source=source)
        ours = dict(zip(self.categories.ids, self.categories.names))
        clash = [(cid, name, ours[cid]) for cid, name in zip(theirs.ids, theirs.names)
                 if cid in ours and ours[cid] != name]
        if clash:
            cid, name, expected = clash[0]
            raise DataError(f"{source}: category id {cid} is {name!r} but the training file calls it {expected!r}; "
                            "all splits must share one category list")

    def split_dataset(self, split: str) -> tuple[dict, Path, str]:
        """The validated dataset dict, image folder and source file of a split (cached)."""
        if split in self._datasets:
            return self._datasets[split]
        if split in ("train", "val"):
            train, val = self._load("train"), self._load("val")
            if val is None:  # hold out part of the training images
                data, image_dir, source = train
                ids = sorted(im["id"] for im in data["images"])
                n_val = max(1, int(round(len(ids) * self.val_fraction)))
                if len(ids) - n_val < 1:
                    raise DataError(f"cannot hold out a validation split from {len(ids)} training image(s); "
                                    "set data.init_args.val_ann")
                order = np.random.default_rng(self.seed).permutation(len(ids))
                val_ids = [ids[i] for i in order[:n_val]]
                train_ids = [ids[i] for i in order[n_val:]]
                log.info("data: no val_ann: holding out %d of %d training images (val_fraction=%s, seed=%d)",
                         n_val, len(ids), self.val_fraction, self.seed)
                train = (subset_dataset(data, train_ids), image_dir, source)
                val = (subset_dataset(data, val_ids), image_dir, f"{source} (held-out part)")
            self._datasets.update(train=train, val=val)
        elif split == "test":
            test = self._load("test")
            if test is None:
                log.warning("data: no test_ann: testing and predicting use the validation split")
                test = self.split_dataset("val")
            self._datasets["test"] = test
        else:
            raise ValueError(f"unknown split {split!r}")
        return self._datasets[split]

    def coco(self, split: Literal["train", "val", "test"]) -> COCO:
        """The validated ground truth of a split as a pycocotools ``COCO`` (what COCOeval scores against)."""
        if split not in self._coco:
            self._coco[split] = build_coco(self.split_dataset(split)[0])
        return self._coco[split]

    def dataset(self, split: Literal["train", "val", "test"]) -> CocoDetectionDataset:
        data, image_dir, source = self.split_dataset(split)
        train = split == "train" and self.augment
        transform = build_transforms(train, self.image_size, self.hflip_prob, self.zoom_out, self.iou_crop,
                                     self.photometric, self.min_box_size)
        return CocoDetectionDataset(self.coco(split), image_dir, self.categories, transform, source)

    def image_path(self, split: str, image_id: int) -> Path:
        data, image_dir, _ = self.split_dataset(split)
        return image_dir / self.coco(split).imgs[int(image_id)]["file_name"]

    # --- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.split_dataset("train")
        if stage in (None, "fit", "validate"):
            self.split_dataset("val")
        if stage in (None, "test", "predict"):
            self.split_dataset("test")
