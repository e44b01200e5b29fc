"""Test set-up: no network, quiet logs, tiny models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PYTHONHASHSEED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_backbone():
    from vision_ft.backbones import TimmViT

    return TimmViT("vit_test_tiny")


def make_task(method="ssf", num_classes=3, name="vit_test_tiny", **kw):
    from vision_ft.backbones import TimmViT
    from vision_ft.tasks import ImageClassificationTask

    return ImageClassificationTask(TimmViT(name), method=method, num_classes=num_classes, **kw)
