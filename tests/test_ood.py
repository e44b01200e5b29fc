"""OOD detection: FPR95 / AUROC / AUPR-In, the OOD datamodule, and the CLIP OOD task end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from vision_ft.errors import ConfigError, DataError
from vision_ft.metrics.ood import OODScores, evaluate_ood, flatten, fpr_at_tpr, ood_metrics

ROOT = Path(__file__).resolve().parents[1]

# --- metrics -----------------------------------------------------------------------------------
# A fixed example with ties between ID and OOD scores (higher = in-distribution).
ID = np.arange(1, 21, dtype=np.float64)  # 20 ID scores 1, 2, ..., 20
OOD = np.array([25, 12, 7.5, 3, 2, 1.5, 1.5, 0.5, 0, -1], dtype=np.float64)  # 10 OOD scores


def test_metrics_on_a_hand_computed_example():
    m = ood_metrics(ID, OOD)
    # FPR95. TPR(t) = #(ID >= t) / 20 is 19/20 = 0.95 exactly at t = 2 (ID 2..20) and still at t = 1.5 (no ID
    # score in between); the official rule takes the lowest of the equally close thresholds, t* = 1.5.
    # OOD >= 1.5: 25, 12, 7.5, 3, 2, 1.5, 1.5 -> 7 of 10.
    assert m["threshold"] == 1.5 and m["tpr"] == 0.95
    assert m["fpr95"] == pytest.approx(7 / 10)
    # (t = 2, the highest threshold keeping 95 %, would give 5 / 10: the rule matters and is pinned here.)
    # AUROC = P(ID > OOD) + P(tie) / 2 over the 200 pairs; ID values above each OOD score (ties):
    # 25: 0 | 12: 8 (+1 tie) | 7.5: 13 | 3: 17 (+1 tie) | 2: 18 (+1 tie) | 1.5: 19, twice | 0.5, 0, -1: 20 each
    assert m["auroc"] == pytest.approx((0 + 8.5 + 13 + 17.5 + 18.5 + 2 * 19 + 3 * 20) / 200)  # 0.7775
    # AUPR-In = mean over the 20 ID samples of the precision at the threshold that adds each (ID positive):
    # t = 20..13: TP 1..8 with FP 1 (the OOD 25); t = 12: 9 TP, 2 FP (tie); 11..8: 10..13 TP, 2 FP;
    # 7: 14 TP, 3 FP (OOD 7.5); 6, 5, 4: 15..17 TP, 3 FP; 3: 18 TP, 4 FP (tie); 2: 19 TP, 5 FP (tie);
    # 1: 20 TP, 7 FP (the two OOD 1.5)
    precisions = [Fraction(1, 2), Fraction(2, 3), Fraction(3, 4), Fraction(4, 5), Fraction(5, 6), Fraction(6, 7),
                  Fraction(7, 8), Fraction(8, 9), Fraction(9, 11), Fraction(10, 12), Fraction(11, 13),
                  Fraction(12, 14), Fraction(13, 15), Fraction(14, 17), Fraction(15, 18), Fraction(16, 19),
                  Fraction(17, 20), Fraction(18, 22), Fraction(19, 24), Fraction(20, 27)]
    assert m["aupr"] == pytest.approx(float(sum(precisions) / 20))
    # and they are sklearn's, with ID as the positive class (AUPR-Out would differ)
    labels, scores = np.r_[np.ones(20), np.zeros(10)], np.r_[ID, OOD]
    assert m["auroc"] == roc_auc_score(labels, scores)
    assert m["aupr"] == average_precision_score(labels, scores)
    assert abs(m["aupr"] - average_precision_score(1 - labels, -scores)) > 0.05
    assert (m["n_id"], m["n_ood"]) == (20, 10)


def _fpr95_by_enumeration(id_scores, ood_scores, level=0.95):
    """The official rule written as a plain search over thresholds (independent of sklearn's curve)."""
    candidates = sorted(set(id_scores) | set(ood_scores), reverse=True)
    lowest_full = max(t for t in candidates if (id_scores >= t).all())
    best = None
    for t in candidates:  # high -> low; '<=' keeps moving to lower thresholds on ties
        if t < lowest_full:
            break
        gap = abs((id_scores >= t).sum() / len(id_scores) - level)
        if best is None or gap <= best[0]:
            best = (gap, (ood_scores >= t).mean())
    return best[1]


def test_fpr95_matches_the_rule_on_random_tied_scores():
    rng = np.random.default_rng(0)
    for trial in range(40):
        ids = rng.integers(0, 12, rng.integers(3, 40)).astype(float)
        oods = rng.integers(-3, 9, rng.integers(1, 30)).astype(float)
        assert fpr_at_tpr(ids, oods)[0] == pytest.approx(_fpr95_by_enumeration(ids, oods)), trial


def test_degenerate_inputs():
    same = ood_metrics(np.full(5, 0.3), np.full(3, 0.3))  # no information: one threshold keeps everything
    assert (same["fpr95"], same["auroc"]) == (1.0, 0.5)
    assert same["aupr"] == pytest.approx(5 / 8)  # precision of accepting everything
    perfect = ood_metrics(np.arange(10) + 10.0, np.arange(4.0))
    assert (perfect["fpr95"], perfect["auroc"]) == (0.0, 1.0) and perfect["aupr"] == pytest.approx(1.0)
    reversed_ = ood_metrics(np.arange(4.0), np.arange(10) + 10.0)
    assert (reversed_["fpr95"], reversed_["auroc"]) == (1.0, 0.0)
    with pytest.raises(ValueError, match="no OOD scores"):
        ood_metrics(ID, [])
    with pytest.raises(ValueError, match="non-finite in-distribution"):
        ood_metrics([1.0, float("nan")], OOD)


def test_per_set_results_and_their_average():
    scores = {"a": np.r_[ID, OOD, OOD[:4] + 30], "b": -np.r_[ID, OOD, OOD[:4] + 30]}
    source = np.r_[np.zeros(20), np.ones(10), np.full(4, 2)].astype(int)
    res = evaluate_ood(scores, source, ["near", "far"])
    assert res["a"]["near"] == ood_metrics(ID, OOD)
    assert res["a"]["far"]["auroc"] == 0.0 and res["b"]["far"]["auroc"] == 1.0
    for m in ("fpr95", "auroc", "aupr"):
        assert res["a"]["avg"][m] == pytest.approx((res["a"]["near"][m] + res["a"]["far"][m]) / 2)
    flat = flatten(res)
    assert flat["test/a/near/fpr95"] == pytest.approx(0.7) and len(flat) == 2 * 3 * 3
    with pytest.raises(ValueError, match="outside"):
        evaluate_ood(scores, source + 1, ["near", "far"])


def test_score_collector_drops_sampler_padding_and_orders_by_index():
    c = OODScores()
    c.update(torch.tensor([2, 0]), torch.tensor([1, 0]), {"mcm": torch.tensor([0.2, 0.0]), "r": torch.tensor([2., 0.])})
    c.update(torch.tensor([1, 2]), torch.tensor([0, 1]), {"mcm": torch.tensor([0.1, 0.2]), "r": torch.tensor([1., 2.])})
    out = c.compute()  # index 2 twice: a DistributedSampler pads with repeats
    assert out["index"].tolist() == [0, 1, 2] and out["ood_set"].tolist() == [0, 0, 1]
    assert out["scores"]["mcm"].tolist() == pytest.approx([0.0, 0.1, 0.2]) and list(out["scores"]) == ["mcm", "r"]
    with pytest.raises(ValueError, match="changed"):
        c.update(torch.tensor([3]), torch.tensor([0]), {"mcm": torch.tensor([0.3])})


# --- data --------------------------------------------------------------------------------------
def _png(path: Path, value: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def _id_folder(root: Path, per_class: int = 4) -> Path:
    """A tiny ImageFolder tree: 2 classes, train + test."""
    for split in ("train", "test"):
        for c, name in enumerate(("cat", "dog")):
            for i in range(per_class):
                _png(root / split / name / f"{i}.png", 40 + 100 * c + 7 * i)
    return root


def _ood_folders(root: Path) -> dict[str, str]:
    for i in range(3):
        _png(root / "noise" / f"{i}.png", 250 - i)
    for i in range(5):  # nested two levels, with a non-image file
        _png(root / "tex" / "a" / f"b{i % 2}" / f"{i}.jpg", 5 + i)
    (root / "tex" / "README.txt").write_text("not an image")
    return {"noise": str(root / "noise"), "tex": str(root / "tex")}


def _ood_data(tmp_path: Path, ood=None, **id_kwargs):
    from vision_ft.data import ImageFolderData
    from vision_ft.data.ood import OODData

    id_kwargs = {"image_size": 16, "batch_size": 4, "val_dir": None, **id_kwargs}
    in_dist = ImageFolderData(root=str(_id_folder(tmp_path / "id")), **id_kwargs)
    return OODData(in_dist, ood=_ood_folders(tmp_path / "ood") if ood is None else ood)


def test_ood_data_tags_interleaves_and_reads_nested_folders(tmp_path):
    dm = _ood_data(tmp_path)
    dm.setup("test")
    assert dm.ood_names == ["noise", "tex"] and dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    items = list(dm.test_set())
    assert len(items) == 8 + 3 + 5  # ID test + every image at any depth, the .txt ignored
    assert [int(it["index"]) for it in items] == list(range(16))
    source = [int(it["ood_set"]) for it in items]
    assert sorted(source) == [0] * 8 + [1] * 3 + [2] * 5
    assert set(source[:4]) == {0, 1, 2}  # the first batch already holds every set
    assert all(int(it["label"]) == -1 for it in items if int(it["ood_set"]) > 0)
    assert {int(it["label"]) for it in items if int(it["ood_set"]) == 0} == {0, 1}
    assert items[0]["image"].shape == (3, 16, 16)
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) == {"image", "label", "ood_set", "index"} and len(batch["index"]) == 4


def test_class_names_file_in_both_formats(tmp_path):
    from vision_ft.data.ood import OODData

    dm = _ood_data(tmp_path)
    (tmp_path / "pairs.txt").write_text("dog a dog\ncat house cat\n")
    (tmp_path / "plain.txt").write_text("feline\n\ncanine\n")
    (tmp_path / "short.txt").write_text("feline\n")
    assert OODData(dm.in_distribution, dm.ood, class_names_file=str(tmp_path / "pairs.txt")).class_names == \
        ["house cat", "a dog"]
    assert OODData(dm.in_distribution, dm.ood, class_names_file=str(tmp_path / "plain.txt")).class_names == \
        ["feline", "canine"]
    with pytest.raises(ConfigError, match="class_names_file.*1 names.*2 classes"):
        OODData(dm.in_distribution, dm.ood, class_names_file=str(tmp_path / "short.txt"))


def test_bad_ood_folders_are_clear_errors_naming_the_key(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"data\.init_args\.ood\.SUN: folder .*missing.* does not exist"):
        _ood_data(tmp_path, ood={"SUN": str(tmp_path / "missing")})
    with pytest.raises(DataError, match=r"data\.init_args\.ood\.Places: no images"):
        _ood_data(tmp_path, ood={"Places": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="'avg' is not allowed"):
        _ood_data(tmp_path, ood={"avg": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="at least one OOD set"):
        _ood_data(tmp_path, ood={})


def test_unreadable_ood_images_follow_the_corrupt_policy(tmp_path):
    folders = _ood_folders(tmp_path / "o")
    (Path(folders["noise"]) / "broken.png").write_bytes(b"not a png")
    skip = _ood_data(tmp_path, ood=folders)
    skip.setup("test")
    assert len(skip.ood_dataset("noise")) == 3 and skip.skipped == [str(Path(folders["noise"]) / "broken.png")]
    strict = _ood_data(tmp_path, ood=folders, on_corrupt="error")
    with pytest.raises(DataError, match=r"broken\.png in OOD set 'noise' \(data\.init_args\.ood\.noise\)"):
        strict.setup("test")


def test_synthetic_sample_is_deterministic_and_labelled(tmp_path):
    from vision_ft.data.ood import list_images, write_ood_sample

    a, b = write_ood_sample(tmp_path / "a", per_set=6, size=16), write_ood_sample(tmp_path / "b", per_set=6, size=16)
    files = list_images(a)
    assert len(files) == 12 and files == list_images(b)
    assert all(np.array_equal(np.asarray(Image.open(a / f)), np.asarray(Image.open(b / f))) for f in files)
    assert "SYNTHETIC" in (a / "README.txt").read_text()
    tex = np.stack([np.asarray(Image.open(a / f)) for f in files if f.startswith("textures")]).astype(float)
    noise = np.stack([np.asarray(Image.open(a / f)) for f in files if f.startswith("noise")]).astype(float)
    assert tex[..., 0].mean() < tex[..., 1].mean()  # cool colours, unlike the pink ID sample
    assert noise.std(axis=(1, 2)).mean() > tex.std(axis=(1, 2)).mean()  # noisier than the textures


# --- task ----------------------------------------------------------------------------------------
class _OODMethod:
    """Mixin for test methods: a second OOD score (mean brightness), an ID classifier by brightness and a
    scaled training loss."""

    calls = 0

    def ood_scores(self, task, images):
        return {"bright": images.mean(dim=(1, 2, 3))}

    def id_logits(self, task, images):
        m = images.mean(dim=(1, 2, 3))
        return torch.stack([0.4 - m, m - 0.4], dim=1)  # dark -> class 0 (cat), bright -> class 1 (dog)

    def training_loss(self, task, images, labels):
        type(self).calls += 1
        assert labels.max() < task.num_classes
        loss = 2.0 * F.cross_entropy(task(images, task.seen), labels)
        self.last = float(loss.detach())
        return loss


def _trainer(tmp_path, **kw):
    return pl.Trainer(logger=CSVLogger(str(tmp_path / "runs"), name="ood"), accelerator="cpu",
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **kw)


def _task(method="linear", **kw):
    from vision_ft.backbones.open_clip import OpenCLIP
    from vision_ft.tasks.clip_ood import CLIPOODTask

    return CLIPOODTask(OpenCLIP("open_clip_test_tiny"), method=method, num_classes=2, class_names=["cat", "dog"],
                       **kw)


def test_zero_shot_mcm_metrics_json_and_plots(tmp_path):
    dm, task = _ood_data(tmp_path), _task(mcm_temperature=0.5)
    trainer = _trainer(tmp_path)
    metrics = trainer.test(task, datamodule=dm, verbose=False)[0]
    keys = {f"test/mcm/{s}/{m}" for s in ("noise", "tex", "avg") for m in ("fpr95", "auroc", "aupr")}
    assert keys | {"test/acc"} == set(metrics)
    run = Path(trainer.log_dir)
    doc = json.loads((run / "ood_metrics.json").read_text())
    assert doc["n_id"] == 8 and doc["ood_sets"]["tex"]["n"] == 5 and doc["mcm_temperature"] == 0.5
    for name in ("ood_roc_mcm.png", "ood_hist_mcm.png"):
        assert (run / name).stat().st_size > 1000
    # MCM recomputed by hand: softmax over the raw cosine similarities / T (not CLIP's logit scale)
    test = dm.test_set()
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    source = np.array([int(test[i]["ood_set"]) for i in range(len(test))])
    b = task.backbone
    with torch.no_grad():
        img = F.normalize(b.encode_image(b.preprocess(images)), dim=-1)
        txt = F.normalize(b.encode_text(b.tokenize(["a photo of a cat.", "a photo of a dog."])), dim=-1)
        mcm = ((img @ txt.T) / 0.5).softmax(-1).max(-1).values.double().numpy()
    # AUROC by its definition (the implementation is scikit-learn's): P(ID > OOD) + P(tie) / 2 over all pairs
    id_scores, ood_scores = mcm[source == 0], mcm[source == 2]
    pairs = id_scores[:, None] - ood_scores[None, :]
    assert doc["scores"]["mcm"]["tex"]["auroc"] == pytest.approx(
        float((pairs > 0).mean() + 0.5 * (pairs == 0).mean()), abs=1e-6)
    assert metrics["test/mcm/avg/fpr95"] == pytest.approx(doc["scores"]["mcm"]["avg"]["fpr95"], abs=1e-6)


def test_a_method_with_its_own_loss_and_ood_scores_is_trained_and_reported(tmp_path):
    from vision_ft.methods.clip_lora import CLIPLoRA

    class LoRAWithScores(_OODMethod, CLIPLoRA):
        pass

    dm, task = _ood_data(tmp_path, shots=2), _task(LoRAWithScores(r=2))
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=1)
    trainer.fit(task, datamodule=dm)
    assert LoRAWithScores.calls == 1  # 2 shots x 2 classes = one batch of 4
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(task.method.last)
    metrics = trainer.test(task, datamodule=dm, verbose=False)[0]
    assert metrics["test/acc"] == 1.0  # the method's id_logits classify the ID test set (cats dark, dogs bright)
    assert {f"test/bright/{s}/auroc" for s in ("noise", "tex", "avg")} <= set(metrics)
    # noise images are bright (~250), texture images dark (~5), ID in between: exact separations
    assert metrics["test/bright/noise/auroc"] == 0.0 and metrics["test/bright/tex/auroc"] == 1.0
    assert metrics["test/bright/tex/fpr95"] == 0.0 and metrics["test/bright/noise/fpr95"] == 1.0
    run = Path(trainer.log_dir)
    assert (run / "ood_hist_bright.png").is_file() and (run / "adapter.json").is_file()
    assert json.loads((run / "adapter.json").read_text())["metrics"]["test/bright/avg/auroc"] == 0.5


def test_bad_method_scores_and_non_ood_data_are_clear_errors(tmp_path):
    from vision_ft.data import ImageFolderData
    from vision_ft.methods.baselines import LinearProbe

    class BadScores(LinearProbe):
        def ood_scores(self, task, images):
            return {"a/b": images.mean(dim=(1, 2, 3))}

    class OwnMCM(LinearProbe):
        def ood_scores(self, task, images):
            return {"mcm": images.mean(dim=(1, 2, 3))}

    class WrongShape(LinearProbe):
        def ood_scores(self, task, images):
            return {"r": images.mean(dim=(2, 3))}

    x = torch.rand(3, 3, 16, 16)
    with pytest.raises(ValueError, match="BadScores.ood_scores: score name 'a/b'"):
        _task(BadScores()).eval().ood_scores(x)
    assert torch.equal(_task(OwnMCM()).eval().ood_scores(x)["mcm"], x.mean(dim=(1, 2, 3)))  # replaces the task's
    with pytest.raises(ValueError, match=r"WrongShape.ood_scores: score 'r' must be a \(3,\) tensor"):
        _task(WrongShape()).eval().ood_scores(x)
    with pytest.raises(ConfigError, match="mcm_temperature"):
        _task(mcm_temperature=0)
    plain = ImageFolderData(root=str(_id_folder(tmp_path / "id")), image_size=16, batch_size=4, val_dir=None)
    with pytest.raises(ConfigError, match="vision_ft.data.ood.OODData"):
        _trainer(tmp_path).test(_task(), datamodule=plain, verbose=False)


@pytest.mark.ddp
@pytest.mark.timeout(600)
@pytest.mark.slow
def test_two_process_ddp_gives_the_single_process_results(tmp_path):
    """Scores are gathered across 2 gloo ranks, the sampler's padding dropped: same JSON as one process."""
    config = str(ROOT / "domains" / "clip_ood.yaml")
    ood = _ood_folders(tmp_path / "ood")  # 200 ID + 3 + 5 OOD, plus one below: 209, odd, so the sampler pads
    _png(Path(ood["noise"]) / "extra.png", 200)
    common = ["test", "--config", config, "--model.init_args.method=linear", "--trainer.accelerator=cpu",
              "--trainer.enable_progress_bar=false", f"--data.init_args.ood={json.dumps(ood)}",
              f"--data.init_args.in_distribution.init_args.sample_dir={tmp_path / 'sample'}"]
    env = {k: v for k, v in os.environ.items() if k not in {"MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK",
                                                            "LOCAL_RANK", "NODE_RANK"}}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    docs = []
    for name, extra in (("one", []), ("two", ["--trainer.strategy=ddp", "--trainer.devices=2"])):
        args = [*common, f"--trainer.logger.init_args.save_dir={tmp_path / name}", *extra]
        proc = subprocess.run([sys.executable, "-m", "vision_ft", *args], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        docs.append(json.loads(next((tmp_path / name).rglob("ood_metrics.json")).read_text()))
    assert docs[0]["n_id"] == docs[1]["n_id"] == 200
    assert docs[1]["ood_sets"]["noise"]["n"] == 4
    assert docs[0]["scores"] == docs[1]["scores"]
