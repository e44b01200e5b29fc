"""COCO detection data: box formats, id remapping, box-safe augmentation, bad-input policy."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from domains.medical.detection_sample import write_detection_sample
from vision_ft.data.coco import (
    CategoryMap, COCODetectionData, build_transforms, coco_to_cxcywh, cxcywh_to_coco, xyxy_to_coco,
)
from vision_ft.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    return write_detection_sample(tmp_path_factory.mktemp("det") / "sample", n_train=12, n_val=4, size=64, seed=3)


def _copy(sample: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(sample, root)
    return root


def _edit(root: Path, split: str, fn) -> None:
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


# ---- box formats ----------------------------------------------------------------------------------
def test_coco_xywh_pixels_to_normalised_cxcywh_and_back():
    xywh = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 200.0, 100.0]])
    cxcywh = coco_to_cxcywh(xywh, width=200, height=100)
    expected = torch.tensor([[25 / 200, 40 / 100, 30 / 200, 40 / 100], [0.5, 0.5, 1.0, 1.0]])
    assert torch.allclose(cxcywh, expected)
    assert torch.allclose(cxcywh_to_coco(expected, width=200, height=100), xywh)
    g = torch.Generator().manual_seed(0)
    boxes = torch.cat([torch.rand(50, 2, generator=g) * 300, torch.rand(50, 2, generator=g) * 100 + 1], dim=1)
    assert torch.allclose(cxcywh_to_coco(coco_to_cxcywh(boxes, 437, 311), 437, 311), boxes, atol=1e-4)
    assert torch.allclose(xyxy_to_coco(torch.tensor([[1.0, 2.0, 4.0, 8.0]])), torch.tensor([[1.0, 2.0, 3.0, 6.0]]))


def test_category_ids_map_to_contiguous_indices_and_back():
    cats = CategoryMap.from_categories([{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"},
                                        {"id": 7, "name": "train"}])
    assert cats.ids == (1, 7, 90) and cats.names == ("person", "train", "toothbrush")
    assert cats.to_index([90, 1, 7, 7]) == [2, 0, 1, 1]
    assert cats.to_category_id(cats.to_index([7, 90, 1])) == [7, 90, 1]
    with pytest.raises(DataError, match="appears twice"):
        CategoryMap.from_categories([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])


# ---- the datamodule on real COCO files --------------------------------------------------------------
def test_datamodule_reads_coco_remaps_ids_and_keeps_boxes(sample):
    dm = COCODetectionData(root=str(sample), image_size=32, batch_size=4, augment=False)
    assert (dm.num_classes, dm.class_names, dm.category_ids) == (2, ["polyp", "instrument"], [3, 7])
    dm.setup("fit")
    gt = dm.coco("train")
    seen_empty = False
    for batch in dm.train_dataloader():
        assert batch["pixel_values"].shape[1:] == (3, 32, 32) and batch["pixel_values"].dtype == torch.float32
        assert 0.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
        for image_id, (h, w), target in zip(batch["image_ids"].tolist(), batch["orig_sizes"].tolist(), batch["labels"]):
            anns = gt.imgToAnns[image_id]
            seen_empty |= not anns
            # the resize to 32 px keeps normalised boxes; labels are the contiguous index of each category id
            expected = coco_to_cxcywh(torch.tensor([a["bbox"] for a in anns]).reshape(-1, 4), w, h)
            assert torch.allclose(target["boxes"], expected, atol=1e-5)
            assert target["class_labels"].tolist() == [dm.category_ids.index(a["category_id"]) for a in anns]
    assert seen_empty, "the sample should contain an image without annotations"


def test_no_val_file_holds_out_part_of_train(sample):
    dm = COCODetectionData(root=str(sample), val_ann=None, val_images=None, val_fraction=0.25, image_size=32)
    dm.setup()
    train, val = set(dm.coco("train").imgs), set(dm.coco("val").imgs)
    assert len(val) == 3 and not train & val and len(train | val) == 12
    assert set(dm.coco("test").imgs) == val  # no test file: test on validation


@pytest.mark.parametrize("ops", [dict(hflip_prob=1.0), dict(zoom_out=True, iou_crop=True, hflip_prob=0.5)])
def test_augmentations_move_boxes_with_the_pixels(ops):
    """A white rectangle on black: after each augmentation the box label must match the white pixels."""
    from torchvision import tv_tensors

    transform = build_transforms(True, 96, **ops)
    for seed in range(8):
        torch.manual_seed(seed)
        img = torch.zeros(3, 60, 80)
        img[:, 10:30, 45:70] = 1.0  # x 45..70, y 10..30
        box = tv_tensors.BoundingBoxes(torch.tensor([[45.0, 10.0, 25.0, 20.0]]), format="XYWH", canvas_size=(60, 80))
        out = transform({"image": tv_tensors.Image(img), "boxes": box, "labels": torch.tensor([1])})
        if len(out["boxes"]) == 0:  # cropped away: the label must go too
            assert len(out["labels"]) == 0
            continue
        ys, xs = torch.nonzero(out["image"][0] > 0.5, as_tuple=True)
        from_pixels = torch.tensor([xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]).float()
        assert torch.allclose(out["boxes"][0].as_subclass(torch.Tensor), from_pixels, atol=2.5), seed
        assert out["labels"].tolist() == [1]


def test_horizontal_flip_mirrors_the_normalised_centre(sample):
    dm = COCODetectionData(root=str(sample), image_size=64, augment=True, hflip_prob=1.0)
    plain = COCODetectionData(root=str(sample), image_size=64, augment=False)
    a, b = dm.dataset("train"), plain.dataset("train")
    for i in range(len(a)):
        fa, fb = a[i]["labels"]["boxes"], b[i]["labels"]["boxes"]
        assert torch.allclose(fa[:, 0], 1 - fb[:, 0], atol=1e-5) and torch.allclose(fa[:, 1:], fb[:, 1:], atol=1e-5)
        assert torch.allclose(a[i]["pixel_values"], b[i]["pixel_values"].flip(-1), atol=1e-6)


# ---- bad input ----------------------------------------------------------------------------------
def _break(data: dict) -> None:
    image = data["images"][0]
    anns = data["annotations"]
    base = dict(anns[0])
    anns += [
        {**base, "id": 9001, "image_id": 424242},                               # unknown image id
        {**base, "id": 9002, "bbox": [-20.0, 5.0, 10.0, 10.0]},                 # outside (negative x)
        {**base, "id": 9003, "bbox": [5.0, 5.0, image["width"] + 30.0, 8.0]},   # outside (too wide)
        {**base, "id": 9004, "category_id": 99},                                 # unknown category id
        {**base, "id": 9005, "bbox": [5.0, 5.0, -3.0, 8.0]},                    # negative width
        {**base, "id": 9006, "bbox": [5.0, 5.0, float("nan"), 8.0]},            # malformed
        {**base, "id": 9007, "bbox": [-0.5, 2.0, 10.0, 10.0]},                  # overshoot within tolerance: clipped
    ]


def test_bad_annotations_are_counted_and_skipped(sample, tmp_path, caplog):
    root = _copy(sample, tmp_path)
    before = len(json.loads((root / "annotations" / "instances_train.json").read_text())["annotations"])
    _edit(root, "train", _break)
    dm = COCODetectionData(root=str(root), image_size=32, on_bad_annotation="skip")
    with caplog.at_level(logging.WARNING, logger="vision_ft"):
        dm.setup("fit")
    report = dm.reports["train"]
    assert dict(report.skipped) == {"unknown image id": 1, "box outside the image": 2, "unknown category id": 1,
                                    "box with non-positive width/height": 1, "malformed bbox": 1}
    assert report.clipped == 1
    assert len(dm.coco("train").anns) == before + 1  # only the clipped one was added
    clipped = dm.coco("train").anns[9007]["bbox"]
    assert clipped[0] == 0.0 and clipped[2] == pytest.approx(9.5)
    assert "skipped 6 annotation(s)" in caplog.text and "on_bad_annotation=skip" in caplog.text


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["annotations"].append({**d["annotations"][0], "id": 77, "category_id": 5}), "unknown category id"),
    (lambda d: d["annotations"].append({**d["annotations"][0], "id": 77, "image_id": 5}), "unknown image id"),
    (lambda d: d["annotations"].append({**d["annotations"][0], "id": 77, "bbox": [-9, 0, 4, 4]}), "outside the image"),
])
def test_bad_annotations_stop_the_run_by_config(sample, tmp_path, edit, match):
    root = _copy(sample, tmp_path)
    _edit(root, "train", edit)
    dm = COCODetectionData(root=str(root), on_bad_annotation="error")
    with pytest.raises(DataError, match=match) as e:
        dm.setup("fit")
    assert "annotation id 77" in str(e.value) and "on_bad_annotation=skip" in str(e.value)


def test_missing_image_files_are_skipped_or_fatal(sample, tmp_path):
    root = _copy(sample, tmp_path)
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    victim = next(im for im in data["images"] if any(a["image_id"] == im["id"] for a in data["annotations"]))
    (root / "images" / "train" / victim["file_name"]).unlink()
    dm = COCODetectionData(root=str(root), on_bad_annotation="skip")
    dm.setup("fit")
    assert dm.reports["train"].skipped_images == 1 and victim["id"] not in dm.coco("train").imgs
    assert not any(a["image_id"] == victim["id"] for a in dm.coco("train").anns.values())
    report = dm.reports["train"]
    assert report.total_skipped == 0 and report.dropped_with_images >= 1  # its annotations went with it
    with pytest.raises(DataError, match="image file missing"):
        COCODetectionData(root=str(root), on_bad_annotation="error").setup("fit")


def test_structural_errors_name_the_file(sample, tmp_path):
    root = _copy(sample, tmp_path)
    with pytest.raises(DataError, match="not found"):
        COCODetectionData(root=str(root), train_ann="annotations/nope.json")
    (root / "annotations" / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        COCODetectionData(root=str(root), train_ann="annotations/broken.json")
    _edit(root, "train", lambda d: d["images"].append(dict(d["images"][0])))
    with pytest.raises(DataError, match="appears twice"):
        COCODetectionData(root=str(root)).setup("fit")
    root2 = _copy(sample, tmp_path / "b")
    _edit(root2, "val", lambda d: d["categories"][0].update(name="adenoma"))
    with pytest.raises(DataError, match="category id 3 is 'adenoma'"):
        COCODetectionData(root=str(root2)).setup("fit")
    with pytest.raises(ConfigError, match="on_bad_annotation"):
        COCODetectionData(root=str(root2), on_bad_annotation="ignore")


def test_image_size_disagreeing_with_the_json_is_an_error(sample, tmp_path):
    root = _copy(sample, tmp_path)
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    name = data["images"][0]["file_name"]
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(root / "images" / "train" / name)
    ds = COCODetectionData(root=str(root), augment=False).dataset("train")
    index = ds.image_ids.index(data["images"][0]["id"])
    with pytest.raises(DataError, match="50x40 but"):
        ds[index]


def test_grayscale_and_missing_width_height_are_handled(sample, tmp_path):
    root = _copy(sample, tmp_path)
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    first = data["images"][0]
    path = root / "images" / "train" / first["file_name"]
    Image.open(path).convert("L").save(path)
    _edit(root, "train", lambda d: [d["images"][0].pop(k) for k in ("width", "height")])
    ds = COCODetectionData(root=str(root), augment=False, image_size=32).dataset("train")
    item = ds[ds.image_ids.index(first["id"])]
    assert item["orig_size"] == (64, 64) and item["pixel_values"].shape == (3, 32, 32)
    assert torch.equal(item["pixel_values"][0], item["pixel_values"][1])


def test_kvasir_folders_convert_to_coco_from_masks_or_box_json(tmp_path):
    from domains.medical.detection_data import kvasir_to_coco

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    blobs = {"cju0a": [(5, 8, 20, 30), (40, 10, 60, 25)], "cju0b": [], "cju0c": [(0, 0, 64, 10)]}  # x0 y0 x1 y1
    boxes_json = {}
    for stem, boxes in blobs.items():
        Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(images / f"{stem}.jpg")
        mask = np.zeros((48, 64), np.uint8)
        for x0, y0, x1, y1 in boxes:
            mask[y0:y1, x0:x1] = 255
        Image.fromarray(mask).save(masks / f"{stem}.jpg", quality=90)  # Kvasir ships JPEG masks
        boxes_json[stem] = {"height": 48, "width": 64, "bbox": [
            {"label": "polyp", "xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1} for x0, y0, x1, y1 in boxes]}
    (tmp_path / "kavsir_bboxes.json").write_text(json.dumps(boxes_json))
    expected = sorted([x0, y0, x1 - x0, y1 - y0] for b in blobs.values() for x0, y0, x1, y1 in b)
    for kind in ("masks", "json"):
        out = kvasir_to_coco(images, tmp_path / f"ann_{kind}.json", "polyp", category_id=5,
                             masks_dir=masks if kind == "masks" else None,
                             bbox_json=tmp_path / "kavsir_bboxes.json" if kind == "json" else None)
        data = json.loads(out.read_text())
        assert sorted(a["bbox"] for a in data["annotations"]) == expected, kind
        dm = COCODetectionData(root=str(tmp_path), train_ann=out.name, train_images="images", val_ann=out.name,
                               val_images="images", image_size=32, on_bad_annotation="error")
        dm.setup("fit")
        assert dm.category_ids == [5] and len(dm.coco("train").imgs) == 3  # the empty image is kept
    split = kvasir_to_coco(images, tmp_path / "train.json", "polyp", masks_dir=masks, names=["cju0a", "cju0c", ""])
    assert [im["file_name"] for im in json.loads(split.read_text())["images"]] == ["cju0a.jpg", "cju0c.jpg"]
    with pytest.raises(DataError, match="not found"):
        kvasir_to_coco(images, tmp_path / "x.json", "polyp", masks_dir=masks, names=["nope"])
