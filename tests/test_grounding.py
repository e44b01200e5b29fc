"""Grounding answers: parsing, coordinate frames per family, metrics against hand-computed values, the pack."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vision_ft.metrics.grounding import GroundingScores, box_iou, from_original, parse_answer, to_original


@pytest.mark.parametrize("text,expected", [
    ('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "polyp"}]\n```', [{"bbox_2d": [1, 2, 3, 4], "label": "polyp"}]),
    ('Here: [{"point_2d": [5, 6]}] done', [{"point_2d": [5, 6]}]),
    ('{"count": 3, "label": "polyp"}', [{"count": 3, "label": "polyp"}]),
    ("```json\n[]\n```", []),
    ("no json here", None), ('[{"bbox_2d": [1, 2, 3]}]', None), ("[1, 2]", None), ("```json\n[{]\n```", None),
])
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_frames_map_to_original_pixels():
    size = (200, 100)
    assert to_original([500, 500], "0-1000", size) == [100.0, 50.0]
    assert to_original([0.5, 0.25], "0-1", size) == [100.0, 25.0]
    assert to_original([56, 28], "resized-pixels", size, resized=(112, 56)) == [100.0, 50.0]
    assert from_original([100, 50, 150, 75], "0-1000", size) == [500, 500, 750, 750]
    assert from_original([100, 50], "resized-pixels", size, resized=(112, 56)) == [56, 28]
    with pytest.raises(ValueError, match="needs the resized image size"):
        to_original([1, 2], "resized-pixels", size)


def test_scores_against_hand_computed_values():
    truth = [{"bbox": [0, 0, 10, 10], "label": "polyp"}, {"bbox": [20, 20, 40, 40], "label": "polyp"}]
    s = GroundingScores(["polyp"], radius=3.0)
    s.add("count", [{"count": 3}], truth)      # |3 - 2| = 1
    s.add("count", None, truth)                # unreadable: 2 + 1 = 3
    s.add("point", [{"point_2d": [5, 6]}, {"point_2d": [50, 50]}, {"point_2d": [31, 30]}], truth)  # 2 hits / 3
    s.add("point", None, [])                   # unreadable: wrong even with nothing to find
    s.add("detect", [{"bbox_2d": [0, 0, 10, 5], "label": "polyp"}], truth)  # IoUs: 0.5 and 0
    out = s.compute()
    assert out["count_mae"] == pytest.approx((1 + 3) / 2)
    assert out["point_acc"] == pytest.approx((2 / 3 + 0) / 2)
    assert out["mean_best_iou"] == pytest.approx((0.5 + 0.0) / 2)
    assert out["unparsed"] == 2
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    perfect = GroundingScores(["polyp"])
    perfect.add("detect", [{"bbox_2d": t["bbox"], "label": "polyp"} for t in truth], truth)
    assert perfect.compute()["box_map"] == pytest.approx(1.0)
    wrong = GroundingScores(["polyp"])
    wrong.add("detect", [{"bbox_2d": [60, 60, 70, 70], "label": "polyp"}], truth)
    assert wrong.compute()["box_map"] == pytest.approx(0.0)


@pytest.mark.parametrize("name,frame", [("qwen2_5_vl_test_tiny", "resized-pixels"), ("qwen2_vl_test_tiny", "0-1000"),
                                        ("qwen3_vl_test_tiny", "0-1000"), ("llava_test_tiny", "0-1000"),
                                        ("llava_onevision_test_tiny", "0-1000")])
def test_pack_answers_are_in_the_family_frame_and_map_back_to_the_boxes(tmp_path, name, frame):
    from domains.medical.detection_sample import write_detection_sample
    from domains.medical_vlm import conversations
    from vision_ft.backbones import VisionLanguageModel

    vlm = VisionLanguageModel(name)
    assert vlm.coordinate_frame == frame
    root = write_detection_sample(tmp_path / "coco", n_train=4, n_val=2, size=96)
    records = conversations(root / "annotations" / "instances_train.json", root / "images" / "train",
                            frame, vlm.resized_size, ["detect", "point", "count"])
    assert len(records) == 12
    checked = 0
    for r in records:
        image = Image.open(root / "images" / "train" / r["image"]).convert("RGB")
        resized = vlm.resized_size(image)
        if frame == "resized-pixels":  # the processor's own grid of 14-pixel patches
            thw = vlm.processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
            assert resized == (thw[2] * 14, thw[1] * 14)
        answer = parse_answer(r["conversations"][1]["value"])
        truth = r["grounding"]["objects"]
        if r["grounding"]["task"] == "count":
            assert answer[0]["count"] == len(truth)
        elif r["grounding"]["task"] == "detect":
            for a, t in zip(answer, truth):
                back = to_original(a["bbox_2d"], frame, image.size, resized)
                step = max(image.size[0] / resized[0], image.size[1] / resized[1]) if frame != "0-1000" else 0.1
                assert np.allclose(back, t["bbox"], atol=step)  # integer rounding in the model's frame
                checked += 1
    assert checked > 0
