"""Data modules: batch contract, formats, corrupt images, few-shot splits, medical sample."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from domains.medical.data import SAMPLE_FILE, MedicalSampleData
from domains.medical.sample import CLASS_NAMES, make_split, write_sample
from vision_ft.data import CSVManifestData, ImageFolderData, MedMNISTData, sample_indices
from vision_ft.errors import ConfigError, DataError

CLASSES = ["cat", "dog", "emu"]


def _png(path: Path, kind: str = "rgb", seed: int = 0, size: int = 12) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "gray":
        img = Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L")
    elif kind == "rgba":
        img = Image.fromarray(rng.integers(0, 256, (size, size, 4), dtype=np.uint8), "RGBA")
    elif kind == "16bit":
        img = Image.fromarray(rng.integers(0, 65536, (size, size), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8), "RGB")
    img.save(path)


def _folder(root: Path, splits=("train", "val", "test"), per_class: int = 4) -> Path:
    kinds = ["rgb", "gray", "rgba", "16bit"]
    for s, split in enumerate(splits):
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                _png(root / split / name / f"{i}.png", kinds[i % 4], seed=100 * s + 10 * c + i)
    return root


def _npz(path: Path, n=(20, 8, 8), labels_width: int = 1, num_classes: int = 3, shape=(10, 10), drop=()) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
        if labels_width == 1:
            arrays[f"{split}_labels"] = (np.arange(count) % num_classes).astype(np.uint8)[:, None]
        else:
            arrays[f"{split}_labels"] = rng.integers(0, 2, (count, labels_width), dtype=np.uint8)
    for key in drop:
        arrays.pop(key)
    np.savez(path, **arrays)
    return path


def _check_batch(batch, n_classes: int, size: int, multilabel: bool = False) -> None:
    image, label = batch["image"], batch["label"]
    assert image.dtype == torch.float32 and image.ndim == 4 and image.shape[1:] == (3, size, size)
    assert 0.0 <= image.min() and image.max() <= 1.0
    if multilabel:
        assert label.dtype == torch.float32 and label.shape == (image.shape[0], n_classes)
        assert set(label.unique().tolist()) <= {0.0, 1.0}
    else:
        assert label.dtype == torch.int64 and label.shape == (image.shape[0],)
        assert 0 <= label.min() and label.max() < n_classes


# ---- formats and the batch contract -------------------------------------------------------
def test_image_folder_batches_and_classes_before_setup(tmp_path):
    dm = ImageFolderData(str(_folder(tmp_path / "d")), image_size=16, batch_size=5, augment=True)
    assert (dm.num_classes, dm.class_names, dm.multilabel) == (3, CLASSES, False)  # before setup
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        _check_batch(next(iter(loader)), 3, 16)
    dm.setup("test")
    _check_batch(next(iter(dm.test_dataloader())), 3, 16)
    _check_batch(next(iter(dm.predict_dataloader())), 3, 16)
    assert len(dm.dataset("train")) == 12 and dm.skipped == []


def test_image_modes_are_rgb_in_unit_range(tmp_path):
    for kind in ("gray", "rgba", "16bit"):
        _png(tmp_path / "d" / "train" / "a" / f"{kind}.png", kind)
    dm = ImageFolderData(str(tmp_path / "d"), val_dir=None, test_dir=None, image_size=12, val_fraction=0.34)
    dm.setup()
    for i in range(len(dm.dataset("train"))):
        image = dm.dataset("train")[i]["image"]
        assert image.shape == (3, 12, 12) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1 and image.max() > 0.5  # 16-bit scaled, not clipped to 1/255


def test_missing_val_is_carved_and_missing_test_uses_val(tmp_path, caplog):
    root = _folder(tmp_path / "d", splits=("train",), per_class=10)
    dm = ImageFolderData(str(root), image_size=8, val_fraction=0.2, seed=3)
    with caplog.at_level(logging.WARNING, logger="vision_ft"):
        dm.setup()
    train, val = dm.dataset("train").samples.keys, dm.dataset("val").samples.keys
    assert len(val) == 6 and len(train) == 24 and not set(train) & set(val)
    assert dm.dataset("test").samples.keys == val
    assert "no test split" in caplog.text
    again = ImageFolderData(str(root), image_size=8, val_fraction=0.2, seed=3)
    again.setup("fit")
    assert again.dataset("val").samples.keys == val  # deterministic carve


def test_csv_manifest_names_and_indices(tmp_path):
    root = _folder(tmp_path / "d", splits=("train",))
    rows = [f"train/{c}/{i}.png,{c}" for c in CLASSES for i in range(4)]
    (root / "train.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    (root / "val.csv").write_text("path,label\ntrain/dog/0.png,1\ntrain/cat/0.png,cat\n")
    dm = CSVManifestData(str(root / "train.csv"), val_csv=str(root / "val.csv"), image_size=8, batch_size=4)
    assert (dm.num_classes, dm.class_names, dm.multilabel) == (3, CLASSES, False)
    dm.setup()
    _check_batch(next(iter(dm.train_dataloader())), 3, 8)
    assert dm.dataset("val").samples.labels.tolist() == [1, 0]
    # integer labels with given names, and a root other than the CSV folder
    (tmp_path / "m.csv").write_text("path,label\ntrain/cat/0.png,0\ntrain/emu/1.png,2\n")
    dm = CSVManifestData(str(tmp_path / "m.csv"), root=str(root), class_names=["a", "b", "c"], image_size=8)
    assert dm.class_names == ["a", "b", "c"]
    dm.setup("fit")


def test_csv_errors_name_file_and_line(tmp_path):
    root = _folder(tmp_path / "d", splits=("train",), per_class=1)
    (root / "t.csv").write_text("path,label\ntrain/cat/0.png,cat\n")
    (root / "v.csv").write_text("path,label\ntrain/cat/0.png,cow\n")
    with pytest.raises(DataError, match=r"v\.csv line 2: unknown label 'cow'"):
        CSVManifestData(str(root / "t.csv"), val_csv=str(root / "v.csv"))
    (root / "v.csv").write_text("path,label\ntrain/cat/0.png,5\n")
    with pytest.raises(DataError, match=r"out of range"):
        CSVManifestData(str(root / "t.csv"), val_csv=str(root / "v.csv"), class_names=["cat", "dog"])
    (root / "bad.csv").write_text("file,class\nx.png,cat\n")
    with pytest.raises(DataError, match="path,label"):
        CSVManifestData(str(root / "bad.csv"))
    with pytest.raises(DataError, match="data.init_args.train_csv"):
        CSVManifestData(str(root / "nope.csv"))


def test_medmnist_single_and_multilabel(tmp_path):
    dm = MedMNISTData(str(_npz(tmp_path / "a.npz", shape=(10, 10))), image_size=14, batch_size=4)
    assert (dm.num_classes, dm.class_names, dm.multilabel) == (3, ["0", "1", "2"], False)
    dm.setup()
    _check_batch(next(iter(dm.train_dataloader())), 3, 14)
    _check_batch(next(iter(dm.test_dataloader())), 3, 14)
    for shape in [(10, 10, 1), (10, 10, 3)]:
        dm = MedMNISTData(str(_npz(tmp_path / "b.npz", shape=shape)), image_size=10, batch_size=4)
        dm.setup("fit")
        _check_batch(next(iter(dm.train_dataloader())), 3, 10)
    dm = MedMNISTData(str(_npz(tmp_path / "c.npz", labels_width=5)), image_size=8, batch_size=4)
    assert (dm.num_classes, dm.multilabel) == (5, True)
    dm.setup("fit")
    _check_batch(next(iter(dm.train_dataloader())), 5, 8, multilabel=True)


def test_medmnist_errors(tmp_path):
    with pytest.raises(DataError, match=r"data\.init_args\.path.*does not exist"):
        MedMNISTData(str(tmp_path / "missing.npz"))
    path = _npz(tmp_path / "a.npz", drop=("val_labels",))
    with pytest.raises(DataError, match=r"lacks key\(s\) \['val_labels'\].*it has \[.*'val_images'"):
        MedMNISTData(str(path))
    path = _npz(tmp_path / "b.npz", num_classes=4)
    with pytest.raises(DataError, match=r"train_labels has values in \[0, 3\], outside \[0, 2\)"):
        MedMNISTData(str(path), class_names=["x", "y"])
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", train_images=rng.integers(0, 255, (5, 4, 4), dtype=np.uint8),
             train_labels=np.zeros((4, 1), np.uint8))
    with pytest.raises(DataError, match="5 images"):
        MedMNISTData(str(tmp_path / "c.npz"))
    (tmp_path / "d.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        MedMNISTData(str(tmp_path / "d.npz"))


def test_folder_errors_name_what_to_fix(tmp_path):
    with pytest.raises(DataError, match="data.init_args.root"):
        ImageFolderData(str(tmp_path / "nothing"))
    root = _folder(tmp_path / "d", splits=("train",), per_class=1)
    (root / "train" / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty class folder.*empty_class"):
        ImageFolderData(str(root))
    (root / "train" / "empty_class").rmdir()
    _png(root / "val" / "zebra" / "0.png")
    with pytest.raises(DataError, match="zebra"):
        ImageFolderData(str(root))
    with pytest.raises(ConfigError, match="data.init_args.class_names"):
        ImageFolderData(str(root), val_dir=None, class_names=["only", "two"])


# ---- corrupt images -----------------------------------------------------------------------
def test_corrupt_images_skipped_or_error(tmp_path, caplog):
    root = _folder(tmp_path / "d", per_class=3)
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    truncated = root / "train" / "cat" / "truncated.png"
    truncated.write_bytes((root / "train" / "cat" / "0.png").read_bytes()[:60])
    dm = ImageFolderData(str(root), image_size=8)
    with caplog.at_level(logging.WARNING, logger="vision_ft"):
        dm.setup("fit")
    assert sorted(dm.skipped) == sorted([str(bad), str(truncated)])
    assert "skipped 2 unreadable" in caplog.text and str(bad) in caplog.text
    assert len(dm.dataset("train")) == 9
    next(iter(dm.train_dataloader()))
    dm = ImageFolderData(str(root), image_size=8, on_corrupt="error")
    with pytest.raises(DataError, match=r"(broken|truncated)\.png.*data\.init_args\.on_corrupt"):
        dm.setup("fit")


# ---- few-shot -----------------------------------------------------------------------------
def test_sample_indices_k_per_class():
    labels = np.repeat(np.arange(4), 10)
    idx = sample_indices(labels, 3, seed=1)
    assert np.bincount(labels[idx]).tolist() == [3, 3, 3, 3]
    assert idx == sample_indices(labels, 3, seed=1) and idx != sample_indices(labels, 3, seed=2)
    multi = np.eye(3, dtype=np.uint8)[np.arange(30) % 3]
    assert len(sample_indices(multi, 2, seed=0)) == 6


def test_few_shot_written_reused_and_verified(tmp_path):
    root = _folder(tmp_path / "d", per_class=4)
    splits = tmp_path / "splits"
    dm = ImageFolderData(str(root), shots=2, seed=5, split_dir=str(splits), image_size=8)
    dm.setup("fit")
    keys = dm.dataset("train").samples.keys
    assert len(keys) == 6 and dm.few_shot_file == splits / "fewshot_d_2shot_seed5.json"
    doc = json.loads(dm.few_shot_file.read_text())
    assert doc["shots"] == 2 and doc["seed"] == 5 and doc["dataset"]["class_names"] == CLASSES
    assert [s["key"] for s in doc["samples"]] == keys and all(len(s["sha1"]) == 40 for s in doc["samples"])
    # The file is read, not re-drawn: a hand-edited selection (other images, new order) is respected.
    other = [f"{c}/{i}.png" for c in reversed(CLASSES) for i in range(4) if f"{c}/{i}.png" not in keys][:3]
    again = ImageFolderData(str(root), shots=2, seed=5, split_dir=str(splits), image_size=8)
    ref = again._split("pool")
    doc["samples"] = [{"key": k, "label": 0, "sha1": ref.sha1(ref.keys.index(k))} for k in other]
    dm.few_shot_file.write_text(json.dumps(doc))
    again.setup("fit")
    assert again.dataset("train").samples.keys == other
    # Changed content → error naming the file.
    _png(root / "train" / other[0], "rgb", seed=999)
    third = ImageFolderData(str(root), shots=2, seed=5, split_dir=str(splits), image_size=8)
    with pytest.raises(DataError, match=r"fewshot_d_2shot_seed5\.json.*content hash"):
        third.setup("fit")


def test_few_shot_npz_uses_trainer_log_dir(tmp_path):
    class FakeTrainer:
        log_dir = str(tmp_path / "run")
        is_global_zero = True

    dm = MedMNISTData(str(_npz(tmp_path / "a.npz", n=(30, 6, 6))), shots=3, image_size=8)
    dm.trainer = FakeTrainer()
    dm.setup("fit")
    assert dm.few_shot_file == tmp_path / "run" / "fewshot_a_3shot_seed0.json" and dm.few_shot_file.exists()
    assert np.bincount(dm.dataset("train").samples.labels).tolist() == [3, 3, 3]
    FakeTrainer.is_global_zero, FakeTrainer.log_dir = False, str(tmp_path / "run2")
    dm2 = MedMNISTData(str(_npz(tmp_path / "a.npz", n=(30, 6, 6))), shots=3, image_size=8)
    dm2.trainer = FakeTrainer()
    dm2.setup("fit")  # non-zero rank: same draw, nothing written
    assert dm2.dataset("train").samples.keys == dm.dataset("train").samples.keys
    assert not (tmp_path / "run2").exists()


# ---- medical sample -----------------------------------------------------------------------
def test_sample_generator_is_deterministic(tmp_path):
    a = write_sample(tmp_path / "a.npz", n_train=16, n_val=8, n_test=8)
    b = write_sample(tmp_path / "b.npz", n_train=16, n_val=8, n_test=8)
    assert a.read_bytes() == b.read_bytes()
    with np.load(a) as f:
        assert f["train_images"].shape == (16, 28, 28, 3) and f["train_images"].dtype == np.uint8
        assert f["train_labels"].shape == (16, 1) and set(f["train_labels"].ravel()) == {0, 1, 2, 3}
    assert write_sample(tmp_path / "c.npz", 16, 8, 8, seed=1).read_bytes() != a.read_bytes()


def _stats(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32) / 255.0
    gray = x.mean(-1)
    grad = np.abs(np.diff(gray, axis=1)).mean((1, 2)) + np.abs(np.diff(gray, axis=2)).mean((1, 2))
    return np.stack([*x.mean((1, 2)).T, gray.std((1, 2)), (gray > 0.85).mean((1, 2)), grad,
                     np.abs(np.diff(gray, 2, axis=2)).mean((1, 2))], 1)


def test_sample_classes_are_learnable_from_simple_statistics():
    xtr, ytr = make_split(200, 28, np.random.default_rng(0))
    xte, yte = make_split(200, 28, np.random.default_rng(1))
    ftr, fte = _stats(xtr), _stats(xte)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-8
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    centroids = np.stack([ftr[ytr[:, 0] == c].mean(0) for c in range(4)])
    pred = ((fte[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yte[:, 0]).mean() > 0.8  # chance is 0.25


def test_medical_sample_data_generates_into_sample_dir(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vision_ft"):
        dm = MedicalSampleData(sample_dir=str(tmp_path / "sample"), image_size=28, batch_size=8)
    target = tmp_path / "sample" / SAMPLE_FILE
    assert target.is_file() and "SYNTHETIC" in caplog.text and "data.init_args.path" in caplog.text
    assert (dm.num_classes, dm.class_names, dm.multilabel) == (4, CLASS_NAMES, False)
    stamp = target.stat().st_mtime_ns
    MedicalSampleData(sample_dir=str(tmp_path / "sample"))  # reused, not regenerated
    assert target.stat().st_mtime_ns == stamp
    dm.setup("fit")
    _check_batch(next(iter(dm.train_dataloader())), 4, 28)


def test_medical_sample_data_never_generates_at_user_path(tmp_path):
    user = tmp_path / "pathmnist.npz"
    with pytest.raises(DataError, match=r"data\.init_args\.path"):
        MedicalSampleData(path=str(user), sample_dir=str(tmp_path / "sample"))
    assert not user.exists() and not (tmp_path / "sample").exists()
    dm = MedicalSampleData(path=str(_npz(user)), sample_dir=str(tmp_path / "sample"))
    assert dm.class_names == ["0", "1", "2"] and not (tmp_path / "sample").exists()


def test_cli_parser_sees_all_arguments():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MedicalSampleData, "data")
    dests = {a.dest for a in parser._actions}
    for key in ("path", "sample_dir", "batch_size", "image_size", "shots", "seed", "split_dir", "on_corrupt",
                "class_names", "augment", "num_workers", "val_fraction"):
        assert f"data.{key}" in dests


def test_train_order_depends_only_on_seed_and_epoch(tmp_path):
    """Resume-safe shuffling: Lightning calls set_epoch, so a resumed run sees the same order."""
    dm = MedMNISTData(str(_npz(tmp_path / "a.npz", n=(40, 4, 4))), image_size=4, batch_size=40, seed=7)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first, second = (next(iter(loader))["image"] for _ in range(2))
    assert not torch.equal(first, second)  # a new order each pass
    fresh = dm.train_dataloader()
    fresh.sampler.set_epoch(1)
    assert torch.equal(next(iter(fresh))["image"], second)  # epoch 1 of a fresh loader = epoch 1 of the first
    other = MedMNISTData(str(tmp_path / "a.npz"), image_size=4, batch_size=40, seed=8)
    other.setup("fit")
    assert not torch.equal(next(iter(other.train_dataloader()))["image"], first)
