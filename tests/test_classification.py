"""Classification task: multi-label training, metrics in adapter.json, loading guards, inference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image

from conftest import make_task
from vision_ft.data import MedMNISTData
from vision_ft.errors import AdapterError
from vision_ft.export import load_adapter, save_adapter


def _chest_like_npz(path, n=64, labels=3, size=28):
    """A multi-label MedMNIST-format file: label j is on when quadrant j is bright."""
    rng = np.random.default_rng(0)
    data = {}
    for split, count in (("train", n), ("val", n // 2), ("test", n // 2)):
        y = rng.integers(0, 2, size=(count, labels))
        x = rng.integers(0, 40, size=(count, size, size)).astype(np.uint8)
        h = size // 2
        for j, (r, c) in enumerate([(0, 0), (0, h), (h, 0)][:labels]):
            x[y[:, j] == 1, r:r + h, c:c + h] += 200
        data[f"{split}_images"], data[f"{split}_labels"] = x, y
    np.savez(path, **data)
    return path


def test_multilabel_training_logs_per_label_auroc(tmp_path):
    torch.manual_seed(0)  # SSF's init, the head and the shuffling draw from the global RNG: one fixed run
    dm = MedMNISTData(str(_chest_like_npz(tmp_path / "chest.npz")), image_size=32, batch_size=16,
                      class_names=["a", "b", "c"])
    assert dm.multilabel and dm.num_classes == 3
    task = make_task("ssf", num_classes=3, class_names=dm.class_names, multilabel=True, lr=0.01)
    trainer = Trainer(max_epochs=3, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=dm)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert meta["multilabel"] is True and "val/auroc" in meta["metrics"]
    trainer.test(task, datamodule=dm, verbose=False)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert {"test/auroc_a", "test/auroc_b", "test/auroc_c"} <= set(meta["metrics"])
    assert (tmp_path / "per_label_auroc.png").is_file()
    # quadrant brightness is easy: the model must have learnt something
    assert meta["metrics"]["test/auroc"] > 0.75
    preds = load_adapter(tmp_path).predict_images(torch.rand(2, 3, 32, 32))
    assert all(isinstance(p["label"], list) for p in preds)


def test_load_adapter_refuses_other_base_weights(tmp_path):
    task = make_task("lora")
    save_adapter(task, tmp_path)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    meta["backbone"]["init_args"]["init_seed"] = 7  # rebuilds different random base weights
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="fingerprint mismatch"):
        load_adapter(tmp_path)


def test_truncated_adapter_file_is_a_clear_error(tmp_path):
    save_adapter(make_task("ssf"), tmp_path)
    data = (tmp_path / "adapter.safetensors").read_bytes()
    (tmp_path / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="cannot be read as safetensors"):
        load_adapter(tmp_path)


def test_checkpoint_from_another_method_is_refused(tmp_path):
    trainer = Trainer(max_steps=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0)
    task = make_task("ssf")
    data = torch.utils.data.DataLoader(
        [{"image": torch.rand(3, 32, 32), "label": torch.tensor(i % 3)} for i in range(8)], batch_size=4)
    trainer.fit(task, train_dataloaders=data)
    trainer.save_checkpoint(tmp_path / "ssf.ckpt")
    other = make_task("lora")
    trainer2 = Trainer(max_steps=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                       enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(AdapterError, match="method 'ssf'"):
        trainer2.fit(other, train_dataloaders=data, ckpt_path=tmp_path / "ssf.ckpt")


def test_predict_images_accepts_files_of_any_mode(tmp_path):
    task = make_task("linear", class_names=["x", "y", "z"])
    Image.fromarray((np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 80)).save(tmp_path / "a16.png")
    Image.new("RGBA", (40, 30), (10, 200, 10, 128)).save(tmp_path / "rgba.png")
    Image.new("L", (28, 28), 90).save(tmp_path / "gray.png")
    preds = task.predict_images([tmp_path / "a16.png", tmp_path / "rgba.png", tmp_path / "gray.png"])
    assert [p["label"] in {"x", "y", "z"} for p in preds] == [True] * 3
