"""One split's images with their training targets, box-safe augmentation and the batch collate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ...errors import DataError
from ..labelled_images import pil_to_array
from .boxes import coco_to_cxcywh
from .categories import CategoryMap


def build_transforms(train: bool, image_size: int, hflip_prob: float = 0.5, zoom_out: bool = False,
                     iou_crop: bool = False, photometric: bool = False, min_box_size: float = 1.0) -> v2.Compose:
    """Box-safe augmentation: every op moves ``tv_tensors.BoundingBoxes`` with the pixels.

    Training order follows D-FINE's pipeline (photometric distort, zoom-out, IoU crop, flip,
    resize, with boxes sanitised after the geometric ops); evaluation only resizes. The
    resize is to a square ``image_size`` without keeping the aspect ratio, as D-FINE does.
    """
    ops: list[Any] = []
    if train:
        if photometric:
            ops.append(v2.RandomPhotometricDistort(p=0.5))
        if zoom_out:
            ops.append(v2.RandomZoomOut(fill=0.0, side_range=(1.0, 2.0), p=0.5))
        if iou_crop:
            ops += [v2.RandomApply([v2.RandomIoUCrop()], p=0.8), v2.SanitizeBoundingBoxes(min_size=min_box_size)]
        if hflip_prob > 0:
            ops.append(v2.RandomHorizontalFlip(p=hflip_prob))
    ops.append(v2.Resize((image_size, image_size), antialias=True))
    if train:
        ops.append(v2.SanitizeBoundingBoxes(min_size=min(min_box_size, 1.0)))
    return v2.Compose(ops)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image of any mode (gray, RGBA, 16-bit, palette) → float32 ``(3, H, W)`` in [0, 1]."""
    arr = pil_to_array(image)
    x = torch.from_numpy(arr.astype(np.float32))
    if arr.dtype == np.uint8:
        x = x / 255.0
    elif arr.dtype == np.uint16:
        x = x / 65535.0
    x = x.clamp_(0.0, 1.0).permute(2, 0, 1)
    if x.shape[0] in (1, 2):
        x = x[:1].expand(3, -1, -1)
    return x[:3].contiguous()


class CocoDetectionDataset(Dataset):
    """Images of one split with their training targets (crowd boxes excluded)."""

    def __init__(self, coco: COCO, image_dir: Path, categories: CategoryMap, transform: v2.Compose,
                 source: str = ""):
        self.coco, self.image_dir, self.categories, self.transform = coco, Path(image_dir), categories, transform
        self.image_ids = sorted(coco.imgs)
        self.source = source

    def __len__(self) -> int:
        return len(self.image_ids)

    def path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def targets(self, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-crowd boxes (COCO xywh pixels) and contiguous labels of one image."""
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(self.categories.to_index([a["category_id"] for a in anns]), dtype=torch.int64)
        return boxes, labels

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id = self.image_ids[i]
        info = self.coco.imgs[image_id]
        path = self.path(image_id)
        try:
            with Image.open(path) as im:
                im.load()
                pixels = image_to_tensor(im)
        except OSError as e:
            raise DataError(f"cannot read image {path} (image id {image_id} in {self.source}): {e}") from None
        height, width = pixels.shape[-2:]
        if (width, height) != (info["width"], info["height"]):
            raise DataError(f"image {path} is {width}x{height} but {self.source} says "
                            f"{info['width']}x{info['height']} (image id {image_id}); boxes would be misplaced. "
                            "Fix width/height in the annotation file.")
        boxes, labels = self.targets(image_id)
        sample = {"image": tv_tensors.Image(pixels),
                  "boxes": tv_tensors.BoundingBoxes(boxes, format="XYWH", canvas_size=(height, width)),
                  "labels": labels}
        out = self.transform(sample)
        size_h, size_w = out["image"].shape[-2:]
        return {
            "pixel_values": out["image"].as_subclass(torch.Tensor).clamp(0.0, 1.0),
            "labels": {"class_labels": out["labels"],
                       "boxes": coco_to_cxcywh(out["boxes"].as_subclass(torch.Tensor), size_w, size_h)},
            "image_id": image_id,
            "orig_size": (height, width),
        }


def detection_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "labels": [it["labels"] for it in items],
        "image_ids": torch.tensor([it["image_id"] for it in items], dtype=torch.int64),
        "orig_sizes": torch.tensor([it["orig_size"] for it in items], dtype=torch.int64),
    }
