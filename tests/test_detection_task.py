"""The detection task end to end: overfitting proof, COCOeval against pycocotools by hand, what trains
and what is saved, adapters and checkpoints, the medical detection config through the CLI."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import vision_ft
from domains.medical.detection_sample import write_detection_sample
from vision_ft.backbones.dfine import DFineDetector
from vision_ft.data.coco import COCODetectionData
from vision_ft.errors import AdapterError, ConfigError
from vision_ft.export import save_adapter
from vision_ft.metrics.coco_eval import STAT_NAMES
from vision_ft.tasks.detection import DetectionTask

ROOT = Path(__file__).resolve().parents[1]
YAML = str(ROOT / "domains" / "medical_detection.yaml")


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    return write_detection_sample(tmp_path_factory.mktemp("det") / "sample", n_train=6, n_val=3, size=64, seed=1)


def _data(root: Path, on_train: bool = False, **kw) -> COCODetectionData:
    """The sample; ``on_train`` validates/tests on the training images themselves."""
    split = dict(val_ann="annotations/instances_train.json", val_images="images/train",
                 test_ann="annotations/instances_train.json", test_images="images/train") if on_train else {}
    return COCODetectionData(root=str(root), image_size=64, **{"batch_size": 6, "augment": False, **split, **kw})


def _task(dm: COCODetectionData, preset: str = "dfine_test_tiny", **kw) -> DetectionTask:
    return DetectionTask(DFineDetector(preset), num_classes=dm.num_classes, class_names=dm.class_names, **kw)


def _trainer(tmp_path: Path, **kw) -> pl.Trainer:
    return pl.Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", **kw)


def _by_hand(annotation_file: Path, results_file: Path) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
        evaluator = COCOeval(gt, gt.loadRes(str(results_file)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return list(evaluator.stats)


# ---- the key proof --------------------------------------------------------------------------------
def test_tiny_detector_overfits_its_training_images_and_cocoeval_matches_pycocotools(sample, tmp_path):
    """Boxes, label remapping (ids 3 and 7), post-processing and evaluation agree: a tiny D-FINE
    learns six images to AP50 > 0.9, and the logged numbers are pycocotools' on the written JSON."""
    torch.manual_seed(0)
    dm = _data(sample, on_train=True)
    task = _task(dm, lr=4e-3, weight_decay=1e-4, warmup_fraction=0.1, freeze="none", draw_images=2)
    trainer = _trainer(tmp_path, max_steps=350, limit_val_batches=0, gradient_clip_val=1.0)
    trainer.fit(task, dm)
    metrics = trainer.test(task, dm, verbose=False)[0]
    assert metrics["test/AP50"] > 0.9, metrics
    assert task.category_ids == [3, 7]

    written = tmp_path / "predictions_test.json"
    results = json.loads(written.read_text())
    assert {r["category_id"] for r in results} <= {3, 7} and {r["category_id"] for r in results} == {3, 7}
    stats = _by_hand(sample / "annotations" / "instances_train.json", written)
    for name, value in zip(STAT_NAMES, stats):
        if value >= 0:  # pycocotools' -1 (no ground truth in that range) is not logged
            assert metrics[f"test/{name}"] == pytest.approx(value, abs=1e-6), name

    trainer.predict(task, dm)
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert predictions and set(predictions[0]) == {"image_id", "category_id", "bbox", "score"}
    assert len(list((tmp_path / "predictions").glob("*.png"))) == 2


# ---- what trains, what is saved ---------------------------------------------------------------------
@pytest.mark.parametrize("freeze,trained", [("backbone", {"encoder", "decoder", "class_heads"}),
                                            ("backbone_encoder", {"decoder", "class_heads"}),
                                            ("all", {"class_heads"}), ("none", {"backbone", "encoder", "decoder",
                                                                                "class_heads"})])
def test_freeze_policy_decides_what_trains(sample, freeze, trained):
    task = _task(_data(sample), freeze=freeze)
    report = task.trainable_report()
    for part in ("backbone", "encoder", "decoder", "class_heads"):
        row = report[part]
        assert row["trainable"] == (row["total"] if part in trained else 0), (part, row)
    assert report["all"]["total"] == sum(p.numel() for p in task.backbone.model.parameters())


def test_method_and_policy_combinations(sample):
    dm = _data(sample)
    with pytest.raises(ConfigError, match="freeze=none"):
        _task(dm, method="full", freeze="backbone")
    assert _task(dm, method="full").freeze == "none"
    assert _task(dm).freeze == "backbone"  # linear: the "no registry method" path
    lora = _task(dm, method={"class_path": "vision_ft.methods.LoRA", "init_args": {"r": 2, "targets": ["proj", "fc1"]}})
    assert lora.freeze == "all"
    trainable = {n for n, p in lora.backbone.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or lora.backbone.part_of(n) == "class_heads" for n in trainable)
    # r (d_in + d_out) per target: proj 32->32, fc1 32->64, in 1 encoder + 2 decoder layers
    assert lora.trainable_report()["method"]["trainable"] == 3 * (2 * (32 + 32) + 2 * (32 + 64))
    with pytest.raises(vision_ft.BackboneError, match="no fused qkv"):
        _task(dm, method="ssf")


def test_frozen_batch_norms_keep_their_statistics(sample, tmp_path):
    dm = _data(sample)
    stats = {}
    for freeze in ("backbone_encoder", "backbone"):
        task = _task(dm, freeze=freeze)
        bn = task.backbone.model.model.encoder_input_proj[0][1]  # a BatchNorm2d of the hybrid encoder
        before = bn.running_mean.clone()
        _trainer(tmp_path / freeze, max_steps=2, limit_val_batches=0).fit(task, dm)
        stats[freeze] = torch.equal(bn.running_mean, before)
        saved = task.adapter_tensors()
        prefix = "backbone.model."
        assert not any(k.startswith(prefix + "model.backbone.") for k in saved)
        assert not any(k.startswith(prefix + "class_embed.") for k in saved), "tied aliases are saved once"
        assert (prefix + "model.encoder_input_proj.0.1.running_mean" in saved) == (freeze == "backbone")
    assert stats == {"backbone_encoder": True, "backbone": False}


def test_adapter_and_checkpoint_round_trip(sample, tmp_path):
    dm = _data(sample)
    task = _task(dm, method={"class_path": "vision_ft.methods.LoRA", "init_args": {"r": 2, "targets": ["proj", "fc2"]}},
                 lr=1e-2)
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         max_steps=2, limit_val_batches=0, accelerator="cpu",
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    trainer.fit(task, dm)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    task.eval()
    with torch.no_grad():
        expected = task(x)
    save_adapter(task, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "adapter.json").read_text())
    assert meta["category_ids"] == [3, 7] and meta["task_args"]["freeze"] == "all"
    loaded = vision_ft.load_adapter(tmp_path / "run")
    with torch.no_grad():
        got = loaded(x)
    assert torch.allclose(expected.logits, got.logits, atol=1e-5)
    assert torch.allclose(expected.pred_boxes, got.pred_boxes, atol=1e-6)

    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    keys = list(ckpt["state_dict"])
    assert all("lora_" in k or any(h in k for h in ("class_embed", "enc_score_head", "denoising_class_embed"))
               for k in keys), "only the trainable state is checkpointed"
    fresh = _task(dm, method={"class_path": "vision_ft.methods.LoRA",
                              "init_args": {"r": 2, "targets": ["proj", "fc2"]}})
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"], strict=False)
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(x).logits, expected.logits, atol=1e-5)
    other = _task(dm, freeze="backbone")  # another policy expects other tensors
    with pytest.raises(AdapterError):
        other.on_load_checkpoint(torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu"))


def test_ema_checkpoint_keeps_tied_copies_identical(sample, tmp_path):
    dm = _data(sample, on_train=True)
    task = _task(dm, method="full", ema_decay=0.5, lr=1e-2)
    callback = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/AP", mode="max")
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         max_steps=3, val_check_interval=1, check_val_every_n_epoch=None, limit_val_batches=1,
                         num_sanity_val_steps=0, accelerator="cpu", callbacks=[callback])
    trainer.fit(task, dm)
    state = torch.load(callback.best_model_path, weights_only=True, map_location="cpu")["state_dict"]
    pairs = [(a, c) for a, c in task._aliases.items() if a in state]
    assert pairs and all(torch.equal(state[a], state[c]) for a, c in pairs)


# ---- the medical detection config through the CLI ----------------------------------------------------
def test_medical_detection_config_fit_predict_and_load(tmp_path, caplog):
    import logging

    from vision_ft.cli import main

    common = ["--config", YAML, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
              f"--data.init_args.sample_dir={tmp_path / 'sample'}", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--model.init_args.backbone.init_args.name=dfine_test_tiny",
              "--model.init_args.backbone.init_args.image_size=64", "--data.init_args.image_size=64"]
    with caplog.at_level(logging.WARNING, logger="vision_ft"):
        assert main(["fit", *common, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                     "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]) == 0
    assert "SYNTHETIC" in caplog.text
    run = sorted((tmp_path / "runs" / "medical_detection").glob("version_*"))[-1]
    for name in ("adapter.json", "adapter.safetensors", "predictions_test.json", "per_class_ap.png", "curves.png"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "adapter.json").read_text())
    assert meta["class_names"] == ["polyp", "instrument"] and meta["category_ids"] == [3, 7]
    assert {"val/AP", "test/AP"} <= set(meta["metrics"]) and meta["trainable_report"]["all"]["trainable"] > 0

    assert main(["predict", *common, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                 "--trainer.limit_predict_batches=1"]) == 0
    predicted = sorted((tmp_path / "runs" / "medical_detection").glob("version_*"))[-1]
    assert json.loads((predicted / "predictions.json").read_text())
    assert list((predicted / "predictions").glob("*.png"))

    model = vision_ft.load_adapter(run)
    image = next((tmp_path / "sample").rglob("val_0000.png"))
    found = model.predict_images([image], threshold=0.0)[0]
    assert found and {d["label"] for d in found} <= {"polyp", "instrument"} and len(found[0]["bbox"]) == 4

    assert main(["export", str(run), "--merge", "--out", str(tmp_path / "exported")]) == 0
    from transformers import DFineForObjectDetection

    native = DFineForObjectDetection.from_pretrained(tmp_path / "exported").eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(native(pixel_values=x).logits, model(x).logits, atol=1e-5)


def test_class_heads_get_their_own_learning_rate(sample):
    task = _task(_data(sample), lr=1e-4, head_lr=1e-2, freeze="backbone")
    groups = task.param_groups()
    by_lr: dict[float, int] = {}
    for g in groups:
        by_lr[g["lr"]] = by_lr.get(g["lr"], 0) + sum(p.numel() for p in g["params"])
    assert by_lr[1e-2] == task.trainable_report()["class_heads"]["trainable"]
    assert sum(by_lr.values()) == task.trainable_report()["all"]["trainable"]
    assert all(g["weight_decay"] == 0.0 for g in groups if all(p.ndim <= 1 for p in g["params"]))


def test_evaluator_merges_ranks_counts_padded_images_once_and_scores_empty_results(sample, monkeypatch):
    from vision_ft.metrics.coco_eval import COCOEvaluator, evaluate_coco

    gt = _data(sample).coco("train")
    ann = next(iter(gt.anns.values()))
    hit = {"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"], "score": 0.9}
    miss = {**hit, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.95}
    other = sorted(set(gt.imgs) - {ann["image_id"]})[0]
    rank0, rank1 = ([hit], [ann["image_id"]]), ([miss], [ann["image_id"], other])  # rank 1 got the image as padding
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [rank0, rank1]))
    evaluator = COCOEvaluator()
    evaluator.update(*rank0[::-1])
    results, image_ids = evaluator.gathered()
    assert results == [hit] and image_ids == sorted([ann["image_id"], other])
    monkeypatch.undo()
    (stats, per_class, _), _ = evaluator.compute(gt)
    assert stats["AP50"] > 0
    stats, per_class, _ = evaluate_coco(gt, [], class_names=["polyp", "instrument"])
    assert stats["AP"] == 0.0 and set(per_class) == {"polyp", "instrument"}
