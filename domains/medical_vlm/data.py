"""Medical VLM pack data: point / detect / count conversations generated from COCO boxes.

Each image of a COCO detection split (the medical detection sample by default: SYNTHETIC endoscopy-like
images of polyps and instruments, see ``domains.medical.detection_sample``) gives one conversation per task:

- ``detect``: "Detect every polyp ..." -> ```json [{"bbox_2d": [x1, y1, x2, y2], "label": "polyp"}, ...]```;
- ``point``: "Point to each polyp ..." -> ```json [{"point_2d": [x, y], "label": "polyp"}, ...]``` (box centres);
- ``count``: "How many polyps ..." -> ```json {"count": n, "label": "polyp"}```.

Coordinates are written in the frame of the model being trained (Qwen2.5-VL: pixels of the image as its
processor resizes it; Qwen2-VL / Qwen3-VL and LLaVA: 0-1000), which is why the conversations are generated
when the model's processor is known, and each record keeps its boxes in original pixels (``grounding``)
for the metrics. Real conversations in this layout (e.g. converted MedMultiPoints) are read as they are with
``vision_ft.data.ConversationData``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from vision_ft.data import ConversationData
from vision_ft.errors import DataError
from vision_ft.io import atomic_write_text
from vision_ft.metrics.grounding import from_original

log = logging.getLogger("vision_ft")

TEMPLATES = {
    "detect": ["Detect every {label} in the image. Answer in JSON: a list of {{\"bbox_2d\": [x1, y1, x2, y2], "
               "\"label\"}} objects.", "Find all {label}s and give their bounding boxes as JSON."],
    "point": ["Point to each {label} in the image. Answer in JSON: a list of {{\"point_2d\": [x, y], \"label\"}} "
              "objects.", "Where are the {label}s? Give one point per {label} as JSON."],
    "count": ["How many {label}s are in the image? Answer in JSON: {{\"count\": n, \"label\"}}.",
              "Count the {label}s and answer as JSON."],
}


def read_coco(path: Path) -> tuple[dict[int, dict], dict[int, list[dict]], dict[int, str]]:
    try:
        data = json.loads(path.read_text())
        images = {im["id"]: im for im in data["images"]}
        cats = {c["id"]: c["name"] for c in data["categories"]}
        boxes: dict[int, list[dict]] = {i: [] for i in images}
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            boxes[a["image_id"]].append({"bbox": [x, y, x + w, y + h], "label": cats[a["category_id"]]})
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a readable COCO instances file ({type(e).__name__}: {e})") from None
    return images, boxes, cats


def conversations(coco: Path, image_dir: Path, frame: str, resized_size: Any, tasks: list[str],
                  limit: int | None = None) -> list[dict[str, Any]]:
    """Records (LLaVA layout + ``grounding``) for every image and task, answers in ``frame``."""
    images, boxes, cats = read_coco(coco)
    labels = sorted(set(cats.values()))
    records = []
    for n, (image_id, im) in enumerate(sorted(images.items())):
        if limit is not None and n >= limit:
            break
        path = image_dir / im["file_name"]
        with Image.open(path) as img:
            size = img.size
            resized = resized_size(img.convert("RGB")) if frame == "resized-pixels" else None
        for t, task in enumerate(tasks):
            label = labels[(n + t) % len(labels)]
            objects = [o for o in boxes[image_id] if o["label"] == label]
            question = TEMPLATES[task][(n // len(labels)) % len(TEMPLATES[task])].format(label=label)
            if task == "count":
                answer: Any = {"count": len(objects), "label": label}
            else:
                key = "bbox_2d" if task == "detect" else "point_2d"
                answer = []
                for o in objects:
                    x1, y1, x2, y2 = o["bbox"]
                    coords = [x1, y1, x2, y2] if task == "detect" else [(x1 + x2) / 2, (y1 + y2) / 2]
                    answer.append({key: from_original(coords, frame, size, resized), "label": label})
            records.append({"image": im["file_name"], "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": f"```json\n{json.dumps(answer)}\n```"}],
                "grounding": {"task": task, "objects": objects}})
    return records


class MedicalVLMData(ConversationData):
    """Point / detect / count conversations from a COCO detection folder (``images/<split>/``,
    ``annotations/instances_<split>.json``), generated in the trained model's coordinate frame.

    Args:
        root: a COCO detection folder; ``None`` uses the embedded SYNTHETIC medical detection sample.
        sample_dir: where the sample (and the generated conversations) are written.
        tasks: any of ``detect``, ``point``, ``count``.
        max_images: training images used (``None``: all); validation / test use half as many.
        **kwargs: :class:`~vision_ft.data.ConversationData` options.
    """

    def __init__(self, root: str | None = None, sample_dir: str = "data/medical_vlm_sample",
                 tasks: list[str] | None = None, max_images: int | None = None, **kwargs: Any) -> None:
        self.root, self.sample_dir, self.max_images = root, Path(sample_dir), max_images
        self.tasks = list(tasks or ["detect", "point", "count"])
        bad = sorted(set(self.tasks) - set(TEMPLATES))
        if bad:
            raise DataError(f"data.init_args.tasks: unknown {bad}; choose from {sorted(TEMPLATES)}")
        base = Path(root) if root else self.sample_dir / "coco"
        super().__init__(train=str(self.sample_dir / "conversations_train.jsonl"),
                         val=str(self.sample_dir / "conversations_val.jsonl"), image_root=None, **kwargs)
        self.coco_root = base

    def prepare_sample(self) -> None:
        if self.root is None:
            from domains.medical.detection_sample import write_detection_sample

            write_detection_sample(self.coco_root)
            log.warning("data: using the embedded SYNTHETIC endoscopy-like detection sample in %s (generated shapes, "
                        "not medical data); set data.init_args.root (see datasets_cards/medical_vlm.md)", self.coco_root)
        model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        backbone = getattr(model, "backbone", None)
        if backbone is None:
            raise DataError("MedicalVLMData writes answers in the model's coordinate frame: use it with "
                            "vision_ft.tasks.VisionLanguageSFTTask")
        for split in ("train", "val"):
            coco = self.coco_root / "annotations" / f"instances_{split}.json"
            image_dir = self.coco_root / "images" / split
            if not coco.is_file():
                raise DataError(f"{coco}: no such file (data.init_args.root must be a COCO detection folder)")
            limit = self.max_images if split == "train" or self.max_images is None else max(1, self.max_images // 2)
            records = conversations(coco, image_dir, backbone.coordinate_frame, backbone.resized_size, self.tasks,
                                    limit)
            for r in records:
                r["image"] = str((image_dir / r["image"]).resolve())
            atomic_write_text(self.sample_dir / f"conversations_{split}.jsonl",
                              "".join(json.dumps(r) + "\n" for r in records))
