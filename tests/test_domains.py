"""Domain generalisation data: leave-one-domain-out splits, domain-labelled batches, per-domain accuracy."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision_ft.data.domain_generalisation import DomainFolderData, write_domain_sample
from vision_ft.errors import ConfigError, DataError
from vision_ft.metrics import PerDomainAccuracy

DOMAINS = ["cartoon", "photo", "sketch"]  # sorted, as domain_names lists them
CLASSES = ["circle", "square", "triangle"]


@pytest.fixture
def sample(tmp_path) -> Path:
    return write_domain_sample(tmp_path / "dg", per_class=5, size=16)


def _keys(dm: DomainFolderData, split: str) -> list[str]:
    return list(dm.dataset(split).samples.keys)


# ---- layout ---------------------------------------------------------------------------------------
def test_layout_is_parsed_before_setup(sample):
    dm = DomainFolderData(str(sample), test_domains=["sketch"], image_size=16)
    assert dm.domain_names == DOMAINS
    assert (dm.train_domains, dm.test_domains) == (["cartoon", "photo"], ["sketch"])
    assert (dm.num_classes, dm.class_names, dm.multilabel) == (3, CLASSES, False)
    assert dm._cache == {}  # nothing decoded yet: __init__ only lists files


def test_classes_are_the_union_with_one_index_in_every_domain(sample):
    shutil.rmtree(sample / "photo" / "square")  # a class missing in one domain is fine
    (sample / "cartoon" / "hexagon").mkdir()  # a class only one domain has
    shutil.copy(sample / "cartoon" / "circle" / "0000.png", sample / "cartoon" / "hexagon" / "0000.png")
    (sample / ".cache").mkdir()  # hidden folders are neither domains nor classes
    (sample / "sketch" / ".thumbs").mkdir()
    (sample / "notes.txt").write_text("files beside the domains are ignored")
    dm = DomainFolderData(str(sample), test_domains=["photo"], image_size=16, batch_size=4)
    assert dm.domain_names == DOMAINS and dm.class_names == ["circle", "hexagon", "square", "triangle"]
    dm.setup()
    for split in ("train", "val", "test"):
        samples = dm.dataset(split).samples
        for key, label, domain in zip(samples.keys, samples.labels, samples.domains):
            assert key.split("/")[:2] == [dm.domain_names[domain], dm.class_names[label]]
    assert "square" not in {k.split("/")[1] for k in _keys(dm, "test")}


# ---- leave-one-domain-out -------------------------------------------------------------------------
def test_test_domain_never_reaches_train_or_val(sample):
    dm = DomainFolderData(str(sample), test_domains=["sketch"], image_size=16, val_fraction=0.2)
    dm.setup()
    train, val, test = _keys(dm, "train"), _keys(dm, "val"), _keys(dm, "test")
    every = {p.relative_to(sample).as_posix() for p in sample.rglob("*.png")}
    assert set(test) == {k for k in every if k.startswith("sketch/")}
    assert not {k for k in train + val if k.startswith("sketch/")}
    assert set(train) | set(val) == every - set(test) and not set(train) & set(val)
    # validation is carved from each training domain: round(15 * 0.2) = 3 images of each
    assert sorted(k.split("/")[0] for k in val) == ["cartoon"] * 3 + ["photo"] * 3


def test_explicit_train_domains_leave_other_domains_unused(sample):
    dm = DomainFolderData(str(sample), train_domains=["photo"], test_domains=["sketch", "cartoon"], image_size=16)
    assert (dm.train_domains, dm.test_domains) == (["photo"], ["cartoon", "sketch"])  # sorted
    dm.setup()
    assert {k.split("/")[0] for k in _keys(dm, "train") + _keys(dm, "val")} == {"photo"}
    assert {k.split("/")[0] for k in _keys(dm, "test")} == {"cartoon", "sketch"}
    unused = DomainFolderData(str(sample), train_domains=["photo"], test_domains=["sketch"], image_size=16)
    unused.setup()
    assert not any(k.startswith("cartoon/") for s in ("train", "val", "test") for k in _keys(unused, s))


def test_val_carve_depends_on_seed_and_domain_only(sample):
    def val(test: str, domain: str = "photo", seed: int = 0) -> list[str]:
        dm = DomainFolderData(str(sample), test_domains=[test], image_size=16, seed=seed, val_fraction=0.4)
        dm.setup("fit")
        return [k.split("/", 1)[1] for k in _keys(dm, "val") if k.startswith(f"{domain}/")]

    assert len(val("sketch")) == 6
    assert val("sketch") == val("cartoon")  # same validation images whatever is held out
    assert val("sketch", seed=1) != val("sketch")
    assert val("sketch", domain="cartoon") != val("sketch")  # equal-sized domains get independent draws
    before = val("sketch")
    shutil.copytree(sample / "cartoon", sample / "abstract")  # a new domain shifts every domain index...
    assert val("sketch") == before  # ...but not the validation images of the others


def test_batches_carry_the_domain_index(sample):
    dm = DomainFolderData(str(sample), test_domains=["sketch"], image_size=16, batch_size=64)
    dm.setup()
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"image", "label", "domain"}
        image, label, domain = batch["image"], batch["label"], batch["domain"]
        assert image.shape[1:] == (3, 16, 16) and image.dtype == torch.float32
        assert label.dtype == domain.dtype == torch.int64 and domain.shape == label.shape == (image.shape[0],)
    assert next(iter(dm.test_dataloader()))["domain"].unique().tolist() == [DOMAINS.index("sketch")]
    train = dm.dataset("train")
    for i in range(len(train)):
        assert DOMAINS[int(train[i]["domain"])] == train.samples.keys[i].split("/")[0]
    assert set(next(iter(dm.train_dataloader()))["domain"].tolist()) == {0, 1}  # cartoon and photo


def test_corrupt_images_skipped_with_domains_kept(sample, caplog):
    bad = sample / "photo" / "circle" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    dm = DomainFolderData(str(sample), test_domains=["sketch"], image_size=16)
    with caplog.at_level(logging.WARNING, logger="vision_ft"):
        dm.setup("fit")
    assert dm.skipped == [str(bad)] and str(bad) in caplog.text
    samples = dm.dataset("train").samples
    assert [DOMAINS[d] for d in samples.domains] == [k.split("/")[0] for k in samples.keys]
    with pytest.raises(DataError, match=r"broken\.png.*on_corrupt"):
        DomainFolderData(str(sample), test_domains=["sketch"], on_corrupt="error").setup("fit")


def test_few_shot_draws_from_training_domains(sample, tmp_path):
    dm = DomainFolderData(str(sample), test_domains=["sketch"], shots=2, split_dir=str(tmp_path / "splits"),
                          image_size=16)
    dm.setup("fit")
    samples = dm.dataset("train").samples
    assert np.bincount(samples.labels).tolist() == [2, 2, 2]
    assert not any(k.startswith("sketch/") for k in samples.keys)
    assert dm.few_shot_file.name == "fewshot_dg_cartoon_photo_2shot_seed0.json"
    assert json.loads(dm.few_shot_file.read_text())["dataset"]["test_domains"] == ["sketch"]


# ---- errors ---------------------------------------------------------------------------------------
def test_errors_name_what_to_fix(sample, tmp_path):
    with pytest.raises(DataError, match=r"data\.init_args\.root.*does not exist"):
        DomainFolderData(str(tmp_path / "nowhere"), test_domains=["sketch"])
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match="no domain folders"):
        DomainFolderData(str(tmp_path / "bare"), test_domains=["sketch"])
    available = r"available domains in .*\['cartoon', 'photo', 'sketch'\]"
    unknown = r"data\.init_args\.test_domains: unknown domain\(s\) \['art'\]; "
    with pytest.raises(ConfigError, match=unknown + available):
        DomainFolderData(str(sample), test_domains=["art"])
    with pytest.raises(ConfigError, match=r"data\.init_args\.train_domains: unknown domain\(s\) \['Photo'\]"):
        DomainFolderData(str(sample), train_domains=["Photo"], test_domains=["sketch"])
    for bad in ([], "sketch"):  # a bare string would otherwise be read letter by letter
        with pytest.raises(ConfigError, match="data.init_args.test_domains must be a non-empty list"):
            DomainFolderData(str(sample), test_domains=bad)
    with pytest.raises(ConfigError, match=r"\['sketch'\] are in both"):
        DomainFolderData(str(sample), train_domains=["photo", "sketch"], test_domains=["sketch"])
    with pytest.raises(ConfigError, match="leave at least one out"):
        DomainFolderData(str(sample), test_domains=DOMAINS)
    with pytest.raises(ConfigError, match="data.init_args.class_names"):
        DomainFolderData(str(sample), test_domains=["sketch"], class_names=["a", "b"])


def test_empty_domain_is_an_error_naming_it(sample):
    (sample / "empty" / "circle").mkdir(parents=True)  # class folder, no images
    with pytest.raises(DataError, match=r"domain 'empty' .*has no images.*data\.init_args\.train_domains"):
        DomainFolderData(str(sample), test_domains=["sketch"])  # default: train on every other domain
    with pytest.raises(DataError, match=r"domain 'empty' .*data\.init_args\.test_domains"):
        DomainFolderData(str(sample), test_domains=["empty"])
    dm = DomainFolderData(str(sample), train_domains=["photo", "cartoon"], test_domains=["sketch"])
    assert dm.domain_names == ["cartoon", "empty", "photo", "sketch"]  # listed, indexed, but unused: fine


def test_cli_parser_sees_all_arguments():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DomainFolderData, "data")
    actions = {a.dest: a for a in parser._actions}
    for key in ("root", "test_domains", "train_domains", "val_fraction", "batch_size", "image_size", "shots",
                "seed", "on_corrupt", "augment"):
        assert f"data.{key}" in actions
    assert actions["data.val_fraction"].default == 0.2  # DomainBed holdout_fraction


# ---- PerDomainAccuracy ----------------------------------------------------------------------------
def test_per_domain_accuracy_matches_hand_computation():
    metric = PerDomainAccuracy(num_domains=4)
    # batch 1: scores (B, C); arg-max = [0, 1, 2, 1, 0]
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1]])
    metric.update(scores, torch.tensor([0, 1, 1, 1, 2]), torch.tensor([0, 0, 1, 3, 3]))
    # batch 2: class indices (B,)
    metric.update(torch.tensor([2, 2, 0]), torch.tensor([2, 1, 0]), torch.tensor([1, 1, 0]))
    # domain 0: hits 1,1 then 1 -> 3/3; domain 1: 0 then 1,0 -> 1/3; domain 2: no samples; domain 3: 1,0 -> 1/2
    result = metric.compute()
    assert result.shape == (4,) and result.dtype == torch.float32
    assert torch.isnan(result[2]) and torch.allclose(result[[0, 1, 3]], torch.tensor([1.0, 1 / 3, 0.5]))
    assert metric.total.tolist() == [3, 3, 0, 2] and metric.correct.tolist() == [3, 1, 0, 1]
    assert torch.isclose(torch.nanmean(result), torch.tensor((1 + 1 / 3 + 0.5) / 3))  # training-domain mean
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.total.tolist() == [0, 0, 0, 0] and torch.isnan(metric.compute()).all()


def test_per_domain_accuracy_states_sum_across_processes():
    """dist_reduce_fx='sum': merging per-rank states equals one metric over all the data."""
    g = torch.Generator().manual_seed(0)
    preds, target, domain = (torch.randint(0, k, (40,), generator=g) for k in (3, 3, 3))
    whole, rank0, rank1 = (PerDomainAccuracy(num_domains=3) for _ in range(3))
    whole.update(preds, target, domain)
    rank0.update(preds[:13], target[:13], domain[:13])
    rank1.update(preds[13:], target[13:], domain[13:])
    rank0.merge_state(rank1)
    assert torch.equal(rank0.compute(), whole.compute())
    expected = [((preds == target) & (domain == d)).sum() / (domain == d).sum() for d in range(3)]
    assert torch.allclose(whole.compute(), torch.stack(expected).float())


def test_per_domain_accuracy_rejects_bad_input():
    metric = PerDomainAccuracy(num_domains=2)
    with pytest.raises(ValueError, match=r"domain indices must be in \[0, 2\)"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="must all be"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="class indices"):
        metric.update(torch.tensor([0.2, 0.9]), torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_domains"):
        PerDomainAccuracy(num_domains=0)


# ---- synthetic sample -----------------------------------------------------------------------------
def test_sample_generator_is_deterministic(tmp_path):
    a = write_domain_sample(tmp_path / "a", per_class=3, size=16)
    b = write_domain_sample(tmp_path / "b", per_class=3, size=16)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.png"))
    assert len(files) == 27 and files[0] == "cartoon/circle/0000.png"
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    c = write_domain_sample(tmp_path / "c", per_class=3, size=16, seed=1)
    assert (c / files[0]).read_bytes() != (a / files[0]).read_bytes()
    with Image.open(a / files[0]) as img:
        assert (img.mode, img.size) == ("RGB", (16, 16))
    with pytest.raises(ValueError, match="unknown shape"):
        write_domain_sample(tmp_path / "d", classes=("circle", "star"))


def _orientation_histogram(x: np.ndarray) -> np.ndarray:
    """Gradient-orientation histogram of the strongest edges: a shape cue, blind to colour and texture."""
    gray = x.astype(np.float32).mean(-1) / 255.0
    gy, gx = np.gradient(gray)
    magnitude = np.hypot(gx, gy)
    strong = magnitude > np.quantile(magnitude, 0.85)
    angle = np.mod(np.arctan2(gy[strong], gx[strong]), np.pi)
    hist, _ = np.histogram(angle, bins=12, range=(0, np.pi), weights=magnitude[strong])
    return hist / (hist.sum() + 1e-8)


def test_sample_has_a_domain_shift_but_a_shared_task(tmp_path):
    root = write_domain_sample(tmp_path / "s", per_class=30, size=32)
    images = {d: [(np.asarray(Image.open(p)), c) for c, name in enumerate(CLASSES)
                  for p in sorted((root / d / name).glob("*.png"))] for d in DOMAINS}
    # Domain shift: colour statistics alone tell the domains apart.
    def colour(x):
        x = x.astype(np.float32) / 255.0
        return np.array([x.mean(), x.std(), (x.max(-1) - x.min(-1)).mean(), (x.mean(-1) > 0.9).mean()])

    stats = {d: np.stack([colour(x) for x, _ in images[d]]) for d in DOMAINS}
    centres = {d: s.mean(0) for d, s in stats.items()}
    hits = [min(centres, key=lambda e: np.abs(f - centres[e]).sum()) == d for d in DOMAINS for f in stats[d]]
    assert np.mean(hits) > 0.95
    # Shared task: a shape cue learned on two domains classifies the held-out third (chance 1/3).
    for held_out in DOMAINS:
        train = [(_orientation_histogram(x), c) for d in DOMAINS if d != held_out for x, c in images[d]]
        feats, labels = np.stack([f for f, _ in train]), np.array([c for _, c in train])
        centroids = np.stack([feats[labels == c].mean(0) for c in range(3)])
        test = np.stack([_orientation_histogram(x) for x, _ in images[held_out]])
        pred = ((test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
        assert (pred == np.array([c for _, c in images[held_out]])).mean() > 0.7, held_out


# ---- with the classification task ---------------------------------------------------------------------
def test_task_logs_accuracy_per_domain(sample, tmp_path):
    from lightning.pytorch import Trainer

    from vision_ft.backbones import TimmViT
    from vision_ft.tasks import ImageClassificationTask

    dm = DomainFolderData(str(sample), test_domains=["sketch"], image_size=32, batch_size=64)
    task = ImageClassificationTask(TimmViT("vit_test_tiny"), method="linear", num_classes=dm.num_classes,
                                   class_names=dm.class_names)
    trainer = Trainer(max_epochs=1, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    logged = set(trainer.callback_metrics)
    assert {"val/acc_cartoon", "val/acc_photo"} <= logged and "val/acc_sketch" not in logged
    trainer.test(task, datamodule=dm, verbose=False)
    metrics = trainer.callback_metrics
    assert "test/acc_sketch" in metrics and "test/acc_photo" not in metrics
    assert torch.isclose(metrics["test/acc_sketch"], metrics["test/acc"])  # one test domain: the same number
