"""CLIP classification task: zero-shot head, head caching, base-to-novel metrics and retention."""

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

import vision_ft.methods.clip_lora  # noqa: F401 - registers clip_lora
from vision_ft.backbones.open_clip import OpenCLIP
from vision_ft.errors import ConfigError
from vision_ft.tasks.clip_classification import CLIPClassificationTask

NAMES = ["normal", "lesion", "fibrosis", "calcification"]
TEMPLATES = ["a photo of a {}.", "an image of {}."]
X = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])


def _task(method="linear", **kw):
    kw.setdefault("templates", TEMPLATES)
    return CLIPClassificationTask(OpenCLIP("open_clip_test_tiny"), method=method, num_classes=4,
                                  class_names=NAMES, **kw)


def test_zero_shot_logits_are_the_prompt_ensemble_of_the_paper():
    task = _task().eval()
    b = task.backbone
    with torch.no_grad():
        text = F.normalize(b.encode_text(b.tokenize([t.format(n) for n in NAMES for t in TEMPLATES])), dim=-1)
        head = F.normalize(text.view(4, 2, -1).mean(1), dim=-1)
        image = F.normalize(b.encode_image(b.preprocess(X)), dim=-1)
        assert torch.allclose(task(X), b.model.logit_scale.exp() * image @ head.T, atol=1e-5)


def test_head_is_cached_when_the_text_side_is_frozen_and_recomputed_when_it_trains():
    frozen = _task().train()
    assert frozen.text_head([0, 1]) is frozen.text_head([0, 1])
    tuned = _task("clip_lora").train()
    head = tuned.text_head([0, 1])
    assert head.requires_grad and head is not tuned.text_head([0, 1])
    visual_only = _task({"class_path": "vision_ft.methods.clip_lora.CLIPLoRA",
                         "init_args": {"encoders": ["visual"]}}).train()
    assert not visual_only.text_head([0, 1]).requires_grad


def test_base_to_novel_trains_on_base_samples_among_base_classes():
    task = _task("clip_lora", base_to_novel=True).train()
    assert task.seen == [0, 1] and task.held == [2, 3]
    assert task.training_step({"image": X[:2], "label": torch.tensor([2, 3])}, 0) is None  # novel only: skipped
    images, labels = task._seen_batch({"image": X, "label": Y})
    assert labels.tolist() == [0, 1, 0, 1] and len(images) == 4
    with pytest.raises(ConfigError, match="held_out_classes"):
        _task(held_out_classes=["tumour"])
    with pytest.raises(ConfigError, match="not both"):
        _task(base_to_novel=True, held_out_classes=["lesion"])


def _test_metrics(task):
    loader = torch.utils.data.DataLoader([{"image": x, "label": y} for x, y in zip(X, Y)], batch_size=4)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, accelerator="cpu")
    return trainer.test(task, dataloaders=loader, verbose=False)[0]


def test_base_to_novel_metrics_and_retention_before_and_after_tuning():
    task = _task("clip_lora", held_out_classes=["lesion", "calcification"])
    m0 = _test_metrics(task)
    assert set(m0) == {"test/acc_base", "test/acc_novel", "test/hm", "test/retention_after",
                       "test/retention_before"}
    assert m0["test/retention_before"] == m0["test/retention_after"]  # zero-init: untuned == zero-shot
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "tuning": move the LoRA factors far from zero
        for p in task.backbone.model.parameters():
            if p.requires_grad:
                p.add_(2.0 * torch.randn(p.shape, generator=g))
    task._cache.clear()
    m1 = _test_metrics(task)
    assert m1["test/retention_before"] == m0["test/retention_before"]  # the zero-shot model is restored
    assert m1["test/retention_after"] == m1["test/acc_novel"]
    with torch.no_grad():  # acc_novel recomputed by hand: novel samples among novel classes
        novel = (Y == 1) | (Y == 3)
        pred = task.eval()(X[novel], [1, 3]).argmax(-1)
        assert m1["test/acc_novel"] == pytest.approx((pred == (Y[novel] == 3).long()).float().mean().item())
    a, n = m1["test/acc_base"], m1["test/acc_novel"]
    assert m1["test/hm"] == pytest.approx(2 * a * n / (a + n) if a + n else 0.0)
    assert 0 <= m1["test/acc_base"] <= 1 and not math.isnan(m1["test/acc_base"])


def test_inputs_a_clip_task_cannot_use_are_refused():
    from vision_ft.backbones import TimmViT

    with pytest.raises(ConfigError, match="CLIP backbone"):
        CLIPClassificationTask(TimmViT("vit_test_tiny"), method="linear", num_classes=2)
    with pytest.raises(ConfigError, match="templates"):
        _task(templates=["no placeholder"])
    with pytest.raises(ConfigError, match="multi-label"):
        _task(multilabel=True)
