"""Test set-up: no network, quiet logs, tiny models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PYTHONHASHSEED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _work_in_tmp_dir(tmp_path, monkeypatch):
    """Runs write relative paths (runs/, data/, checkpoints/): keep them out of the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def tiny_backbone():
    from vision_ft.backbones import TimmViT

    return TimmViT("vit_test_tiny")


class TinyData:
    """A stand-in datamodule for methods whose prepare() reads training data (no disk)."""

    def __init__(self, num_classes=3, n=48, size=32, batch_size=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        self.items = [{"image": torch.rand(3, size, size, generator=g), "label": torch.tensor(i % num_classes)}
                      for i in range(n)]
        self.batch_size = batch_size

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.items, batch_size=self.batch_size, shuffle=False)


def make_task(method="ssf", num_classes=3, name="vit_test_tiny", prepare=True, **kw):
    """A classification task on a tiny ViT; data-dependent methods are prepared on TinyData."""
    from vision_ft.backbones import TimmViT
    from vision_ft.tasks import ImageClassificationTask

    task = ImageClassificationTask(TimmViT(name), method=method, num_classes=num_classes, **kw)
    if prepare and task.method.requires_data:
        task.method.prepare(task, TinyData(num_classes=num_classes))
    return task
