"""Medical detection datamodule: any COCO-format export, or the embedded synthetic sample.

With ``root`` unset the pack runs offline on a SYNTHETIC endoscopy-like sample generated on
first use (see :mod:`domains.medical.detection_sample`) and says so in the log. A given
``root`` must hold the data: nothing is ever generated at a user path.

:func:`kvasir_to_coco` converts the Kvasir datasets (Kvasir-SEG, Kvasir-Instrument: images +
box JSON or masks) to COCO files: ``python -m domains.medical.detection_data IMAGES OUT.json
--category polyp --bbox-json kavsir_bboxes.json`` (see the dataset cards).
"""

from __future__ import annotations

import logging
from pathlib import Path

from vision_ft.data.coco import COCODetectionData

from .detection_sample import write_detection_sample

log = logging.getLogger("vision_ft")

SAMPLE_NAME = "synthetic_endoscopy_coco_v1"


class MedicalDetectionData(COCODetectionData):
    """:class:`~vision_ft.data.coco.COCODetectionData` with an offline default.

    Args:
        root: folder of a COCO-format dataset (e.g. Kvasir-Instrument or Kvasir-SEG converted as
            the dataset cards describe); ``None`` uses the embedded synthetic sample.
        sample_dir: where the synthetic sample is generated (once; reused if present).
        **kwargs: :class:`~vision_ft.data.coco.COCODetectionData` options (paths inside ``root``,
            image size, augmentation, bad-annotation policy...).
    """

    def __init__(self, root: str | None = None, sample_dir: str = "data/medical_detection_sample", **kwargs):
        self.synthetic = root is None
        if root is None:
            target = write_detection_sample(Path(sample_dir) / SAMPLE_NAME)
            log.warning("data: using the embedded SYNTHETIC detection sample %s (generated shapes, not medical "
                        "data); set data.init_args.root to a COCO-format dataset (see "
                        "datasets_cards/kvasir_instrument.md)", target)
            root = str(target)
        super().__init__(root=root, **kwargs)


# --- converting the Kvasir datasets to COCO --------------------------------------------------------
def kvasir_to_coco(images_dir: str | Path, out_json: str | Path, category: str, category_id: int = 1,
                   bbox_json: str | Path | None = None, masks_dir: str | Path | None = None,
                   names: list[str] | None = None, min_area: int = 16) -> Path:
    """Write a COCO ``instances`` file for a Kvasir-style folder (Kvasir-SEG, Kvasir-Instrument).

    Boxes come from ``bbox_json`` (Kvasir's ``{image_id: {"height", "width", "bbox": [{"xmin",
    "ymin", "xmax", "ymax", ...}]}}``, e.g. Kvasir-SEG's ``kavsir_bboxes.json``) or, without it,
    from the binary masks in ``masks_dir``: one box per connected component of at least
    ``min_area`` pixels (``area`` = the component's pixel count). ``names`` (file stems, e.g. the
    lines of Kvasir-Instrument's ``train.txt``) restricts the file to a split. Images without a
    box are kept as images without annotations.
    """
    import json

    import numpy as np
    from PIL import Image
    from scipy import ndimage

    from vision_ft.errors import DataError

    images_dir = Path(images_dir)
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if names is not None:
        wanted = {n.strip() for n in names if n.strip()}
        files = [p for p in files if p.stem in wanted]
        missing = wanted - {p.stem for p in files}
        if missing:
            raise DataError(f"{len(missing)} listed image(s) not found in {images_dir} (e.g. {sorted(missing)[0]})")
    if bbox_json is None and masks_dir is None:
        raise DataError("kvasir_to_coco needs bbox_json or masks_dir")
    boxes_by_id = json.loads(Path(bbox_json).read_text()) if bbox_json is not None else None
    images, annotations = [], []
    for image_id, path in enumerate(files, start=1):
        with Image.open(path) as im:
            width, height = im.size
        images.append({"id": image_id, "file_name": path.name, "width": width, "height": height})
        if boxes_by_id is not None:
            entry = boxes_by_id.get(path.stem, {})
            found = [([float(b["xmin"]), float(b["ymin"]), float(b["xmax"] - b["xmin"]), float(b["ymax"] - b["ymin"])],
                      float((b["xmax"] - b["xmin"]) * (b["ymax"] - b["ymin"]))) for b in entry.get("bbox", [])]
        else:
            mask_path = next((Path(masks_dir) / f"{path.stem}{ext}" for ext in (".png", ".jpg", ".jpeg")
                              if (Path(masks_dir) / f"{path.stem}{ext}").is_file()), None)
            if mask_path is None:
                raise DataError(f"no mask for {path.name} in {masks_dir}")
            with Image.open(mask_path) as m:
                mask = np.asarray(m.convert("L")) > 127  # JPEG masks are not exactly binary
            labels, _ = ndimage.label(mask)
            found = []
            for index, sl in enumerate(ndimage.find_objects(labels), start=1):
                if sl is None:
                    continue
                area = int((labels[sl] == index).sum())
                if area >= min_area:
                    ys, xs = sl
                    found.append(([float(xs.start), float(ys.start), float(xs.stop - xs.start),
                                   float(ys.stop - ys.start)], float(area)))
        for bbox, area in found:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": bbox, "area": area, "iscrowd": 0})
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": category_id, "name": category}]}) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Convert a Kvasir-style folder (images + bbox JSON or masks) to COCO.")
    p.add_argument("images", help="image folder")
    p.add_argument("out", help="output instances_*.json")
    p.add_argument("--category", required=True, help="category name, e.g. polyp or instrument")
    p.add_argument("--category-id", type=int, default=1)
    p.add_argument("--bbox-json", default=None, help="Kvasir box file (e.g. kavsir_bboxes.json)")
    p.add_argument("--masks", default=None, help="mask folder (boxes from connected components)")
    p.add_argument("--split-file", default=None, help="file of image stems, one per line (e.g. train.txt)")
    p.add_argument("--min-area", type=int, default=16)
    a = p.parse_args(argv)
    names = Path(a.split_file).read_text().splitlines() if a.split_file else None
    out = kvasir_to_coco(a.images, a.out, a.category, a.category_id, a.bbox_json, a.masks, names, a.min_area)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
