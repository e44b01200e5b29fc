"""Captioned image folders (metadata.jsonl or .txt captions) and the medical synthesis pack's data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vision_ft.data.captioned import CaptionedImageData, load_square
from vision_ft.errors import DataError


def _png(path, w=40, h=24, value=None):
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = 255 if value is None else value  # left half white: shows which side the crop kept
    Image.fromarray(arr).save(path)


def test_metadata_jsonl_and_txt_layouts(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    for i in range(5):
        _png(a / f"{i}.png")
    (a / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "text": f"cap {i}"})
                                                for i in range(5)) + "\n")
    data = CaptionedImageData(str(a), image_size=16, batch_size=2, val_fraction=0.2)
    data.setup("fit")
    assert len(data.dataset("train")) == 4 and len(data.dataset("val")) == 1
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and all(c.startswith("cap ") for c in batch["caption"])
    b = tmp_path / "b" / "train"
    b.mkdir(parents=True)
    for i in range(3):
        _png(b / f"{i}.png")
        (b / f"{i}.txt").write_text(f"caption {i}\n")
    data = CaptionedImageData(str(tmp_path / "b"), image_size=16, batch_size=1)
    assert sorted(data.captions("train") + data.captions("val")) == ["caption 0", "caption 1", "caption 2"]


def test_resize_and_centre_crop(tmp_path):
    _png(tmp_path / "wide.png", w=40, h=20)  # left half white
    x = load_square(tmp_path / "wide.png", 10)
    assert x.shape == (3, 10, 10)
    # shorter side 20 -> 10, width 40 -> 20, centre crop keeps columns 5..15: white then black
    assert x[:, :, :4].min() > 0.9 and x[:, :, 6:].max() < 0.1


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_bad_samples_are_skipped_and_counted_or_named(tmp_path, policy):
    d = tmp_path / "train"
    d.mkdir()
    for i in range(4):
        _png(d / f"{i}.png")
    (d / "0.txt").write_text("fine")
    (d / "1.txt").write_text("   \n")  # empty caption file
    (d / "2.txt").write_text("unreadable image")
    (d / "2.png").write_bytes(b"not a png")
    # 3.png has no caption at all
    data = CaptionedImageData(str(tmp_path), image_size=8, on_corrupt=policy)
    if policy == "error":
        with pytest.raises(DataError, match="on_corrupt=skip") as e:
            data.setup("fit")
        assert "1.txt" in str(e.value) or "3.png" in str(e.value)
        return
    with pytest.raises(DataError, match="cannot hold out a validation split from 1"):
        data.setup("fit")
    assert len(data.skipped) == 3
    joined = "\n".join(data.skipped)
    assert "empty caption" in joined and "3.png: no caption" in joined and "unreadable image" in joined


def test_bad_metadata_lines_name_the_line(tmp_path):
    d = tmp_path / "train"
    d.mkdir()
    _png(d / "0.png")
    (d / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "ok"}\nnot json\n{"file_name": "9.png", "text": "x"}\n'
                                      '{"file_name": "0.png"}\n')
    data = CaptionedImageData(str(tmp_path), image_size=8, on_corrupt="skip")
    with pytest.raises(DataError):
        data.setup("fit")
    assert any("metadata.jsonl:2: not JSON" in s for s in data.skipped)
    assert any("9.png does not exist" in s for s in data.skipped)
    assert any("metadata.jsonl:4: missing or empty 'text'" in s for s in data.skipped)
    with pytest.raises(DataError, match="is not a folder"):
        CaptionedImageData(str(tmp_path / "nope")).setup("fit")


def test_medical_synthesis_captions_come_from_the_labels(tmp_path):
    from domains.medical.sample import CLASS_NAMES, write_sample
    from domains.medical.synthesis_data import MedicalSynthesisData

    data = MedicalSynthesisData(sample_dir=str(tmp_path / "s"), image_size=32, batch_size=2)
    caps = set(data.captions("train"))
    assert caps == {f"a histology patch showing {c}" for c in CLASS_NAMES}
    npz = write_sample(tmp_path / "m.npz", n_train=8, n_val=4, n_test=4, size=28)
    data = MedicalSynthesisData(path=str(npz), sample_dir=str(tmp_path / "n"), template="slide of {}", image_size=32)
    assert all(c.startswith("slide of ") for c in data.captions("train"))
    assert len(data.captions("test")) == 4
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape[-1] == 32 and torch.all((0 <= batch["image"]) & (batch["image"] <= 1))
