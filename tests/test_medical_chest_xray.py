"""Chest X-ray multi-label: CheXpert / NIH conventions, uncertain-label policies in the loss and the
metrics (checked against hand computation), per-finding thresholds chosen on validation."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_task
from lightning.pytorch import Trainer
from PIL import Image

from vision_ft.data.medical.chest_xray import (
    CHEXPERT_FINDINGS,
    NIH_FINDINGS,
    ChestXrayData,
    map_uncertain,
)
from vision_ft.errors import ConfigError, DataError
from vision_ft.metrics.multilabel import (
    masked_bce_with_logits,
    metric_targets,
    youden_thresholds,
)

NAN = float("nan")


# ---- policies ---------------------------------------------------------------------------------------
def test_uncertain_policies_map_codes_by_hand():
    codes = np.array([1.0, 0.0, -1.0, NAN])
    assert map_uncertain(codes, "ones").tolist() == [1, 0, 1, 0]
    assert map_uncertain(codes, "zeros").tolist() == [1, 0, 0, 0]
    ignored = map_uncertain(codes, "ignore")
    assert ignored[:2].tolist() == [1, 0] and np.isnan(ignored[2]) and ignored[3] == 0
    blank_ignored = map_uncertain(codes, "ones", blank="ignore")
    assert blank_ignored[:3].tolist() == [1, 0, 1] and np.isnan(blank_ignored[3])
    with pytest.raises(ConfigError):
        map_uncertain(codes, "maybe")


def _bce(z: float, y: float) -> float:
    p = 1 / (1 + math.exp(-z))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_ignored_labels_are_left_out_of_the_loss():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 1.5, -2.0]])
    chexpert = np.array([[1.0, -1.0, 0.0], [-1.0, 1.0, NAN]])  # two uncertain, one blank
    task = make_task("linear", num_classes=3, multilabel=True)
    for policy, known in (("ignore", [(0, 0, 1), (0, 2, 0), (1, 1, 1), (1, 2, 0)]),
                          ("ones", [(0, 0, 1), (0, 1, 1), (0, 2, 0), (1, 0, 1), (1, 1, 1), (1, 2, 0)]),
                          ("zeros", [(0, 0, 1), (0, 1, 0), (0, 2, 0), (1, 0, 0), (1, 1, 1), (1, 2, 0)])):
        labels = torch.from_numpy(map_uncertain(chexpert, policy))
        expected = sum(_bce(float(logits[i, j]), y) for i, j, y in known) / len(known)
        assert float(task.loss(logits, labels)) == pytest.approx(expected, rel=1e-6), policy
    # the masked entries get no gradient
    z = logits.clone().requires_grad_(True)
    masked_bce_with_logits(z, torch.from_numpy(map_uncertain(chexpert, "ignore"))).backward()
    assert z.grad[0, 1] == 0 and z.grad[1, 0] == 0 and z.grad[0, 0] != 0
    all_unknown = torch.full((2, 3), NAN)
    assert float(masked_bce_with_logits(logits, all_unknown)) == 0.0


def _auroc_by_pairs(scores, labels) -> float:
    """Mann-Whitney: the share of (positive, negative) pairs ranked right, ties counting one half."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_ignored_labels_are_left_out_of_the_metrics():
    rng = np.random.default_rng(0)
    probs = torch.tensor(rng.random((30, 3)), dtype=torch.float32)
    codes = rng.choice([1.0, 0.0, -1.0], size=(30, 3), p=[0.35, 0.4, 0.25])
    codes[0, 0], codes[1, 0] = 1.0, 0.0  # every column has both classes
    task = make_task("linear", num_classes=3, multilabel=True)
    for policy in ("ignore", "ones", "zeros"):
        labels = torch.from_numpy(map_uncertain(codes, policy))
        task.test_auroc_per_label.update(probs, metric_targets(labels))
        task.val_metrics.update(probs, metric_targets(labels))
        per_label = task.test_auroc_per_label.compute().numpy()
        macro = float(task.val_metrics.compute()["val/auroc"])
        task.test_auroc_per_label.reset()
        task.val_metrics.reset()
        expected = []
        for j in range(3):
            y = labels[:, j].numpy()
            keep = ~np.isnan(y)
            expected.append(_auroc_by_pairs(probs[keep, j].tolist(), y[keep].tolist()))
        assert per_label == pytest.approx(expected, abs=1e-6), policy
        assert macro == pytest.approx(np.mean(expected), abs=1e-6), policy
        if policy == "ignore":
            ignore_auroc = expected
    assert ignore_auroc != pytest.approx(expected, abs=1e-3)  # "zeros" scored the uncertain ones: it differs


def test_youden_threshold_by_hand():
    probs = torch.tensor([[0.1], [0.3], [0.35], [0.4], [0.8], [0.9], [0.2]])
    targets = torch.tensor([[0], [0], [1], [0], [1], [1], [-1]])
    # t=0.35: TPR 3/3, TNR 2/3 -> J=0.667; t=0.8: TPR 2/3, TNR 3/3 -> J=0.667; tie -> the higher threshold
    assert youden_thresholds(probs, targets).tolist() == pytest.approx([0.8])
    only_one_class = torch.tensor([[1], [1], [-1], [1], [1], [1], [1]])
    assert youden_thresholds(probs, only_one_class).tolist() == [0.5]


# ---- CSV conventions ----------------------------------------------------------------------------------
def _chexpert(tmp_path: Path, n_patients: int = 12, missing: str | None = None) -> Path:
    """A CheXpert-style CSV + PNGs: finding 'Cardiomegaly' = a bright left half, 'Edema' = a bright top."""
    rng = np.random.default_rng(1)
    rows = []
    for p in range(n_patients):
        for view, kind in (("view1_frontal", "Frontal"), ("view2_lateral", "Lateral")):
            rel = f"CheXpert-v1.0-small/train/patient{p:05d}/study1/{view}.png"
            codes = {f: "" for f in CHEXPERT_FINDINGS}
            cardio, edema = rng.choice(["1.0", "0.0", "-1.0"]), rng.choice(["1.0", "0.0", "-1.0", ""])
            codes["Cardiomegaly"], codes["Edema"] = cardio, edema
            codes["No Finding"] = "1.0" if cardio in ("0.0",) and edema in ("0.0", "") else ""
            img = rng.integers(0, 60, (32, 32)).astype(np.uint8)
            if cardio == "1.0":
                img[:, :16] += 150
            if edema == "1.0":
                img[:16] += 90
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            if rel != missing:
                Image.fromarray(img).save(tmp_path / rel)
            rows.append({"Path": rel, "Sex": "Female", "Age": "50", "Frontal/Lateral": kind, "AP/PA": "PA", **codes})
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_chexpert_csv_views_patients_and_policies(tmp_path):
    file = _chexpert(tmp_path)
    kw = dict(root=str(tmp_path), image_size=32, split_fractions=[0.5, 0.25, 0.25], stratify=False)
    dm = ChestXrayData(str(file), uncertain="ignore", split_file=str(tmp_path / "s.json"), **kw)
    assert dm.multilabel and dm.num_classes == 14 and dm.class_names == CHEXPERT_FINDINGS
    assert len(dm._paths) == 12 and all("frontal" in p for p in dm._paths)
    assert sorted(set(dm._patients)) == [f"patient{p:05d}" for p in range(12)]
    rows = list(csv.DictReader(file.open()))
    frontal = [r for r in rows if r["Frontal/Lateral"] == "Frontal"]
    c = CHEXPERT_FINDINGS.index("Cardiomegaly")
    for r, y in zip(frontal, dm._labels):
        expected = {"1.0": 1.0, "0.0": 0.0, "-1.0": NAN}[r["Cardiomegaly"]]
        assert (np.isnan(y[c]) and np.isnan(expected)) or y[c] == expected
        assert y[CHEXPERT_FINDINGS.index("Fracture")] == 0  # blank -> 0
    lateral = ChestXrayData(str(file), views="lateral", split_file=str(tmp_path / "l.json"), **kw)
    assert all("lateral" in p for p in lateral._paths)
    both = ChestXrayData(str(file), views="all", uncertain={"Cardiomegaly": "ones", "Edema": "zeros"},
                         findings=["Cardiomegaly", "Edema"], split_file=str(tmp_path / "a.json"), **kw)
    assert both.num_classes == 2 and len(both._paths) == 24 and not np.isnan(both._labels).any()
    dm.setup()
    train = dm.dataset("train")
    assert train[0]["label"].shape == (14,) and train[0]["label"].dtype == torch.float32
    with pytest.raises(ConfigError, match="findings"):
        ChestXrayData(str(file), findings=["Effusion"])  # an NIH name under the CheXpert convention


def test_label_csv_naming_a_missing_image(tmp_path):
    missing = "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.png"
    file = _chexpert(tmp_path, missing=missing)
    kw = dict(root=str(tmp_path), image_size=32, split_fractions=[0.5, 0.25, 0.25], stratify=False,
              split_file=str(tmp_path / "s.json"))
    with pytest.raises(DataError, match="patient00003/study1/view1_frontal.png"):
        ChestXrayData(str(file), on_corrupt="error", **kw).setup()
    dm = ChestXrayData(str(file), on_corrupt="skip", **kw)
    dm.setup()
    assert len(dm.skipped) == 1 and missing in dm.skipped[0]


def test_nih_csv(tmp_path):
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
                    "00000001_000.png,Cardiomegaly,0,1,58,M,PA\n"
                    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA\n"
                    "00000002_000.png,No Finding,0,2,81,M,AP\n")
    dm = ChestXrayData(str(path), convention="nih", split_file=str(tmp_path / "s.json"))
    assert dm.class_names == NIH_FINDINGS and dm._patients == ["1", "1", "2"]
    assert dm._labels[1, NIH_FINDINGS.index("Emphysema")] == 1 and dm._labels[2].sum() == 0
    path.write_text(path.read_text() + "00000003_000.png,Pneumonitis,0,3,40,F,PA\n")
    with pytest.raises(DataError, match="line 5: unknown finding"):
        ChestXrayData(str(path), convention="nih")


def test_training_with_ignored_labels_chooses_thresholds_and_reports_per_finding_auroc(tmp_path):
    torch.manual_seed(0)
    file = _chexpert(tmp_path, n_patients=40)
    dm = ChestXrayData(str(file), root=str(tmp_path), uncertain="ignore", findings=["Cardiomegaly", "Edema"],
                       image_size=32, batch_size=16, split_file=str(tmp_path / "s.json"),
                       split_fractions=[0.6, 0.2, 0.2])
    task = make_task("ssf", num_classes=2, class_names=dm.class_names, multilabel=True, lr=0.01)
    trainer = Trainer(max_epochs=3, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=dm)
    assert torch.isfinite(torch.tensor(trainer.callback_metrics["val/loss"].item()))
    chosen = task.thresholds.values.clone()
    assert not torch.allclose(chosen, torch.full_like(chosen, 0.5))  # validation chose them
    trainer.test(task, datamodule=dm, verbose=False)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    for key in ("test/auroc", "test/auroc_Cardiomegaly", "test/auroc_Edema", "test/f1_at_val_thresholds",
                "val/threshold_Cardiomegaly"):
        assert key in meta["metrics"], key
    assert meta["metrics"]["val/threshold_Edema"] == pytest.approx(float(chosen[1]), abs=1e-6)
    from vision_ft.export import load_adapter

    loaded = load_adapter(tmp_path)  # the thresholds travel with the adapter
    assert torch.allclose(loaded.thresholds.values, chosen)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        probs = loaded.probabilities(loaded(x))
    labels = [p["label"] for p in loaded.predict_images(x)]
    assert labels == [[n for n, p, t in zip(dm.class_names, row, chosen) if p >= t] for row in probs]


def test_auroc_leaves_out_findings_without_positives_or_negatives():
    from vision_ft.metrics.multilabel import DefinedAUROC

    probs = torch.tensor([[0.9, 0.2, 0.5], [0.4, 0.3, 0.6], [0.6, 0.8, 0.1], [0.1, 0.1, 0.7]])
    labels = torch.tensor([[1.0, 0.0, NAN], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, NAN]])
    per_label = DefinedAUROC(3, average=None)
    per_label.update(probs, metric_targets(labels))
    got = per_label.compute()
    assert float(got[0]) == pytest.approx(_auroc_by_pairs([0.9, 0.4, 0.6, 0.1], [1, 0, 1, 0]))  # = 1.0
    assert torch.isnan(got[1]) and torch.isnan(got[2])  # no positives; only positives once NaN is masked
    mean = DefinedAUROC(3)
    mean.update(probs, metric_targets(labels))
    assert float(mean.compute()) == pytest.approx(1.0)  # the mean of the defined findings only
