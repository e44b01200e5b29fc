"""Radio astronomy pack: MiraBest / FITS / PNG readers on files in the real formats, the restricted
unpickler, radio preprocessing on known arrays, the synthetic generator's morphology, and the
pack's main command end to end."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import domains.radio_astronomy as ra
from domains.radio_astronomy.data import MiraBestData, RadioFITSData, RadioPNGFolderData, read_fits_image
from domains.radio_astronomy.metrics import fr_metrics, fr_ratio
from domains.radio_astronomy.mirabest import CONVENTIONS, load_pickle, read_batch, write_batch, write_meta
from domains.radio_astronomy.preprocess import RadioPreprocess, background_stats, clip_background, stretch_to_unit
from domains.radio_astronomy.sample import make_images, to_mirabest, write_sample
from vision_ft.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "backbones" / "vit_test_tiny.yaml")


# ---- the pack's surface -----------------------------------------------------------------------------
def test_package_exposes_datamodules_transforms_metrics_and_config():
    assert ra.CONFIG == ROOT / "domains" / "radio_astronomy.yaml" and ra.CONFIG.is_file()
    from vision_ft.data import ClassificationData

    for cls in (ra.MiraBestData, ra.RadioFITSData, ra.RadioPNGFolderData):
        assert issubclass(cls, ClassificationData)
    assert callable(ra.RadioPreprocess()) and callable(ra.fr_metrics) and callable(ra.fr_ratio)
    assert set(ra.__all__) >= {"CONFIG", "MiraBestData", "RadioPreprocess", "fr_metrics", "write_sample"}
    with pytest.raises(AttributeError):
        ra.NotAThing  # noqa: B018


# ---- MiraBest batches ---------------------------------------------------------------------------------
def _mirabest(folder: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Two training batches and a test batch with every label code (uncertain and hybrid included)."""
    rng = np.random.default_rng(seed)
    written = {}
    for name, codes in (("data_batch_1", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 5]),
                        ("data_batch_2", [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]),
                        ("test_batch", [5, 3, 0, 8, 7, 9, 1, 6, 2, 4])):
        images = rng.integers(0, 256, (len(codes), 150, 150), dtype=np.uint8)
        write_batch(folder / name, images, codes, [f"{c}_{i}.png" for i, c in enumerate(codes)], name)
        written[name] = (images, np.array(codes))
    write_meta(folder, 12)
    return written


def test_written_batches_have_the_public_mirabest_layout(tmp_path):
    _mirabest(tmp_path)
    with open(tmp_path / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="latin1")  # how the public dataset classes read them (trusted here)
    assert set(entry) == {"batch_label", "labels", "data", "filenames"}
    first = entry["data"][0]
    assert isinstance(entry["data"], list) and first.shape == (150, 150) and first.dtype == np.uint8
    assert np.vstack(entry["data"]).reshape(-1, 1, 150, 150).shape == (12, 1, 150, 150)
    with open(tmp_path / "batches.meta", "rb") as f:
        meta = pickle.load(f)
    assert meta["label_names"] == ["100", "102", "104", "110", "112", "200", "201", "210", "300", "310"]
    assert meta["num_vis"] == 22500


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_mirabest_round_trip_maps_codes_by_convention(tmp_path, convention):
    written = _mirabest(tmp_path / "MiraBest" / "batches")
    dm = MiraBestData(root=str(tmp_path / "MiraBest"), convention=convention,
                      train_batches=["data_batch_1", "data_batch_2"], image_size=32, val_fraction=0.25)
    names, mapping = CONVENTIONS[convention]
    assert (dm.num_classes, dm.class_names) == (len(names), names)
    dm.setup()
    images, codes = written["test_batch"]
    keep = [i for i, c in enumerate(codes) if c in mapping]
    test = dm.dataset("test").samples
    assert test.labels.tolist() == [mapping[int(codes[i])] for i in keep]
    for pos, i in enumerate(keep):  # pixels come back exactly
        assert np.array_equal(test.inner.read(pos), images[i])
    train_codes = np.concatenate([written["data_batch_1"][1], written["data_batch_2"][1]])
    n_train = sum(int(c) in mapping for c in train_codes)
    assert len(dm.dataset("train")) + len(dm.dataset("val")) == n_train


def test_confident_convention_drops_uncertain_and_hybrid_and_says_so(tmp_path, caplog):
    _mirabest(tmp_path)
    with caplog.at_level(logging.INFO, logger="vision_ft"):
        dm = MiraBestData(root=str(tmp_path), train_batches=["data_batch_1"], image_size=32)
    assert dm.code_counts["train"] == {0: 2, 1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 6: 1, 7: 1, 8: 1, 9: 1}
    kept = "7 of 12 images kept {'FRI': 4, 'FRII': 3}; dropped label codes {3: 1, 4: 1, 7: 1, 8: 1, 9: 1}"
    assert kept in caplog.text


def test_mirabest_reads_array_form_and_rejects_bad_files(tmp_path):
    rng = np.random.default_rng(1)
    flat = rng.integers(0, 256, (3, 22500), dtype=np.uint8)  # CIFAR-style (N, H*W) rows
    (tmp_path / "b").write_bytes(pickle.dumps({"data": flat, "labels": [0, 5, 9], "filenames": ["a", "b", "c"]}))
    batch = read_batch(tmp_path / "b")
    assert batch.images.shape == (3, 150, 150) and np.array_equal(batch.images[1].reshape(-1), flat[1])
    (tmp_path / "c").write_bytes(pickle.dumps({"data": flat[:, :100], "labels": [0, 5, 9]}))
    with pytest.raises(DataError, match="expected 150x150"):
        read_batch(tmp_path / "c")
    (tmp_path / "d").write_bytes(pickle.dumps({"data": flat, "labels": [0, 5, 12]}))
    with pytest.raises(DataError, match="codes must be 0-9"):
        read_batch(tmp_path / "d")
    rgz = {"data": flat, "filenames": ["a", "b", "c"], "src_ids": [1, 2, 3], "mb_flag": [0, 0, 1], "LAS": [9, 8, 7]}
    (tmp_path / "e").write_bytes(pickle.dumps(rgz))  # an unlabelled RGZ108k-style batch
    with pytest.raises(DataError, match=r"lacks key\(s\) \['labels'\].*Unlabelled batches"):
        read_batch(tmp_path / "e")
    with pytest.raises(DataError, match=r"data\.init_args\.root.*holds no MiraBest batches"):
        MiraBestData(root=str(tmp_path))
    with pytest.raises(ConfigError, match="data.init_args.convention"):
        MiraBestData(root=str(tmp_path), convention="FRI")


class _Payload:
    """Pickles to a call of ``builtins.open(target, 'w')``: unpickling it creates ``target``."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_restricted_unpickler_refuses_a_malicious_batch_without_running_it(tmp_path):
    control = tmp_path / "control_created"
    pickle.loads(pickle.dumps(_Payload(control)))  # the payload works with a plain unpickler...
    assert control.exists()
    target = tmp_path / "pwned"
    folder = tmp_path / "batches"
    folder.mkdir()
    evil = {"data": [np.zeros((150, 150), np.uint8)], "labels": [0], "filenames": [_Payload(target)]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(evil))
    with pytest.raises(DataError, match=r"refusing to load the pickled global (io|builtins)\.open"):
        MiraBestData(root=str(tmp_path), train_batches=["data_batch_1"], test_batch=None)
    assert not target.exists()  # ...but not with ours
    (folder / "x").write_bytes(pickle.dumps({"cmd": __import__("os").system}))
    with pytest.raises(DataError, match=r"posix\.system|nt\.system|os\.system"):
        load_pickle(folder / "x")


# ---- FITS cutouts + CSV catalogue -------------------------------------------------------------------
def _fits(path: Path, data: np.ndarray) -> None:
    from astropy.io import fits

    header = fits.Header()
    header["BUNIT"] = "JY/BEAM"
    fits.PrimaryHDU(data, header=header).writeto(path)


def _fits_catalogue(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    (tmp_path / "cutouts").mkdir()
    base = rng.normal(0.002, 0.001, (40, 40)).astype(np.float32)  # background 2 mJy, rms 1 mJy
    base[18:22, 18:22] = 0.05  # a source
    rows = ["path,label,ra,dec"]
    for i in range(6):
        img = base.copy()
        if i % 2 == 0:
            img[:, :5] = np.nan  # blanked edge, as at a survey's edge
        data = img[None, None] if i == 3 else img  # (Stokes, freq, y, x): radio images are often 4-D
        _fits(tmp_path / "cutouts" / f"src{i}.fits", data)
        rows.append(f"cutouts/src{i}.fits,{'FRI' if i < 3 else 'FRII'},{150.0 + i:.3f},{2.0:.3f}")
    (tmp_path / "cat.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "cat.csv", base


def test_fits_reader_flips_rows_and_drops_degenerate_axes(tmp_path):
    data = np.zeros((1, 1, 4, 5), np.float32)
    data[0, 0, 0, 1] = 7.0  # FITS row 0 is the bottom of the image
    _fits(tmp_path / "a.fits", data)
    arr = read_fits_image(tmp_path / "a.fits")
    assert arr.shape == (4, 5) and arr[3, 1] == 7.0 and arr.dtype == np.float64
    (tmp_path / "b.fits").write_bytes(b"SIMPLE  =   not a fits file")
    with pytest.raises(DataError, match="not a readable FITS file"):
        read_fits_image(tmp_path / "b.fits")


def test_fits_catalogue_round_trip_applies_the_nan_policy(tmp_path):
    cat, base = _fits_catalogue(tmp_path)
    pre = RadioPreprocess(nan_policy="background", sigma_clip=3.0)
    dm = RadioFITSData(train_csv=str(cat), test_csv=str(cat), preprocess=pre, image_size=40, val_fraction=0.5)
    assert dm.class_names == ["FRI", "FRII"]
    dm.setup()
    test = dm.dataset("test")
    assert test.samples.labels.tolist() == [0, 0, 0, 1, 1, 1]
    for i in range(6):
        raw = test.samples.inner.read(i)
        assert np.isnan(raw).any() == (i % 2 == 0)
        out = test.samples.read(i)
        assert out.dtype == np.float32 and np.isfinite(out).all() and 0.0 <= out.min() and out.max() == 1.0
        assert (out[:, :5] == 0).all()  # blanks became background, and background is clipped to zero
        assert out[19:21, 19:21].min() == 1.0  # the source is the brightest thing, after the row flip too
        same = pre(base[::-1])  # the NaN-free image, rows flipped as the reader does: only the strip differs
        assert np.abs(out[:, 5:] - same[:, 5:]).mean() < 1e-3 and np.abs(out - same).max() < 0.1
    item = test[0]
    assert item["image"].shape == (3, 40, 40) and torch.equal(item["image"][0], item["image"][2])


def test_fits_nan_policy_error_skips_or_stops_by_config(tmp_path, caplog):
    cat, _ = _fits_catalogue(tmp_path)
    strict = RadioPreprocess(nan_policy="error")
    with caplog.at_level(logging.WARNING, logger="vision_ft"):
        dm = RadioFITSData(train_csv=str(cat), test_csv=str(cat), preprocess=strict, image_size=40, on_corrupt="skip")
        dm.setup("test")
    assert len(dm.dataset("test")) == 3 and len(dm.skipped) == 3
    assert "src0.fits" in caplog.text and "nan_policy" in caplog.text
    dm = RadioFITSData(train_csv=str(cat), test_csv=str(cat), preprocess=strict, on_corrupt="error")
    with pytest.raises(DataError, match=r"src0\.fits.*NaN/inf.*on_corrupt"):
        dm.setup("test")
    with pytest.raises(DataError, match=r"NaN/inf pixel\(s\); set data\.init_args\.preprocess\.nan_policy"):
        strict(np.array([[1.0, np.nan], [0.0, 2.0]]))


# ---- PNG folders ------------------------------------------------------------------------------------
def test_png_folder_with_valid_split_is_read_and_preprocessed(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {}
    for split in ("train", "valid", "test"):
        for cls in ("Bent", "Compact", "FRI", "FRII"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                arr = rng.integers(0, 200, (24, 24), dtype=np.uint8)
                arr[10:14, 10:14] = 200 + i
                Image.fromarray(arr, mode="L").save(tmp_path / split / cls / f"{i}.png")
                arrays[f"{split}/{cls}/{i}.png"] = arr
    rgb = np.stack([arrays["test/FRI/0.png"]] * 3, -1)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "test" / "FRI" / "rgb.png")
    dm = RadioPNGFolderData(root=str(tmp_path), val_dir="valid", image_size=24,
                            preprocess=RadioPreprocess(stretch="asinh"))
    assert dm.class_names == ["Bent", "Compact", "FRI", "FRII"]
    dm.setup()
    assert len(dm.dataset("val")) == 8 and len(dm.dataset("test")) == 9
    test = dm.dataset("test").samples
    expected = stretch_to_unit(arrays["test/FRI/0.png"] / 255.0, "minmax", "asinh")
    for key in ("FRI/0.png", "FRI/rgb.png"):  # a colour rendering of the same image reads the same
        assert np.allclose(test.read(test.keys.index(key)), expected, atol=1e-6)


# ---- preprocessing on known arrays --------------------------------------------------------------------
def test_sigma_clipped_background_ignores_outliers_and_keeps_them():
    rng = np.random.default_rng(0)
    img = rng.normal(10.0, 2.0, (100, 100))
    img[::10, ::10] = 1000.0  # 100 bright outliers: "sources"
    mean, median, std = background_stats(img)
    assert abs(median - 10.0) < 0.1 and abs(std - 2.0) < 0.1 and img.std() > 50
    out = clip_background(img, k=5.0)
    assert np.allclose(out[::10, ::10], 1000.0 - median)  # sources kept, background subtracted
    rest = np.ones_like(img, bool)
    rest[::10, ::10] = False
    assert (out[rest] == 0).mean() > 0.999  # noise below 5 sigma zeroed


@pytest.mark.parametrize("interval,stretch", [("minmax", "asinh"), ("zscale", "linear"), ("zscale", "asinh"),
                                              ("percentile", "sqrt"), ("minmax", "log")])
def test_stretches_are_monotone_and_map_into_unit_range(interval, stretch):
    rng = np.random.default_rng(1)
    img = np.concatenate([rng.normal(0, 1, 4000), rng.exponential(30, 96)])
    out = stretch_to_unit(img, interval, stretch)
    order = np.argsort(img)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.all(np.diff(out[order]) >= -1e-12)  # non-decreasing in the pixel value
    assert out.max() == 1.0 and out[order[0]] == 0.0


def test_asinh_and_zscale_values():
    x = np.array([0.0, 0.5, 1.0])
    assert np.allclose(stretch_to_unit(x, "minmax", "asinh", asinh_a=0.1), [0.0, np.arcsinh(5) / np.arcsinh(10), 1.0])
    assert np.allclose(stretch_to_unit(x, "minmax", "linear"), x)
    rng = np.random.default_rng(2)
    img = rng.normal(0.0, 1.0, (64, 64))
    img[30:34, 30:34] = 500.0
    out = stretch_to_unit(img, "zscale", "linear")
    assert (out[30:34, 30:34] == 1.0).all() and 0.2 < np.median(out) < 0.8  # zscale: noise spans the range
    assert np.median(stretch_to_unit(img, "minmax", "linear")) < 0.01  # minmax: noise is crushed
    assert (stretch_to_unit(np.full((4, 4), 3.0)) == 0).all()


def test_nan_policies_and_integer_inputs():
    img = np.full((20, 20), 5.0)
    img[5, 5] = 50.0
    img[0, :] = np.nan
    zero = RadioPreprocess(nan_policy="zero")(img)
    background = RadioPreprocess(nan_policy="background")(img)
    assert zero[0].max() == 0.0 and np.allclose(background[0], background[10, 10])
    assert zero[5, 5] == background[5, 5] == 1.0
    with pytest.raises(DataError, match="no finite pixels"):
        RadioPreprocess()(np.full((3, 3), np.nan))
    u8 = np.array([[0, 51], [102, 255]], np.uint8)
    assert np.allclose(RadioPreprocess()(u8), u8 / 255.0)
    with pytest.raises(ConfigError, match="preprocess.stretch"):
        RadioPreprocess(stretch="cubic")


# ---- the synthetic sample --------------------------------------------------------------------------------
def test_generator_morphology_fr2_is_edge_brightened_fr1_edge_darkened():
    rng = np.random.default_rng(7)
    codes = np.repeat([0, 5], 30)
    images, sources = make_images(codes, rng)
    ratio = np.array([fr_ratio(to_mirabest(im)) for im in images])
    edge = []  # brightest pixel beyond the core / core peak
    for im in images:
        yy, xx = np.mgrid[0:150, 0:150]
        r = np.hypot(yy - 74.5, xx - 74.5)
        edge.append(im[r > 8].max() / im[r <= 4].max())
    edge = np.array(edge)
    fr1, fr2 = codes == 0, codes == 5
    assert np.median(ratio[fr1]) < 0.5 < np.median(ratio[fr2])  # the Fanaroff-Riley criterion
    assert ((ratio > 0.5) == fr2).mean() > 0.85
    assert np.median(edge[fr2]) > 2.0 > 1.0 > np.median(edge[fr1])
    assert all(s.snr > 0 for s in sources)


def test_sample_is_deterministic_labelled_synthetic_and_mixes_codes(tmp_path):
    a = write_sample(tmp_path / "a", per_batch=12, n_test=12, n_batches=1)
    b = write_sample(tmp_path / "b", per_batch=12, n_test=12, n_batches=1)
    c = write_sample(tmp_path / "c", per_batch=12, n_test=12, n_batches=1, seed=1)
    assert a.name == "batches" and sorted(p.name for p in a.iterdir()) == ["batches.meta", "data_batch_1", "test_batch"]
    assert (a / "data_batch_1").read_bytes() == (b / "data_batch_1").read_bytes()
    assert (a / "data_batch_1").read_bytes() != (c / "data_batch_1").read_bytes()
    batch = read_batch(a / "test_batch")
    assert batch.batch_label.startswith("SYNTHETIC") and all(f.startswith("SYNTHETIC_") for f in batch.filenames)
    assert set(batch.codes.tolist()) == set(range(10))  # uncertain and hybrid codes are there to be filtered
    assert batch.images.dtype == np.uint8 and batch.images.max() == 255 and (batch.images[:, 0, 0] == 0).all()


def test_fr_metrics_collection():
    m = fr_metrics(2)
    m.update(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]), torch.tensor([0, 1, 1, 1]))
    out = m.compute()
    assert out["acc"] == 0.75 and torch.allclose(out["recall"], torch.tensor([1.0, 2 / 3]))
    assert out["confusion"].tolist() == [[1, 0], [1, 2]] and out["auroc"] == 1.0


# ---- the pack's main command ------------------------------------------------------------------------------
def test_pack_config_fits_end_to_end_and_writes_adapter_metrics_plots(tmp_path, capsys, caplog):
    from vision_ft.cli import main

    args = ["fit", "--config", str(ra.CONFIG), "--config", TINY,
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--data.init_args.sample_dir={tmp_path / 's'}",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]
    with caplog.at_level(logging.WARNING, logger="vision_ft"):
        assert main(args) == 0
    assert "SYNTHETIC radio-galaxy sample" in caplog.text
    assert "random init" in capsys.readouterr().out
    run = sorted((tmp_path / "runs" / "radio_astronomy").glob("version_*"))[-1]
    for name in ("adapter.safetensors", "adapter.json", "curves.png", "confusion_matrix.png", "metrics.csv"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "adapter.json").read_text())
    assert meta["class_names"] == ["FRI", "FRII"] and meta["method"] == "lora"
    assert {"test/acc", "test/auroc", "test/f1", "val/acc"} <= set(meta["metrics"])
    assert {"test/recall_FRI", "test/recall_FRII"} <= set(meta["metrics"])  # per-class recall, by class name
    # inference on raw cutouts through the run's own preprocessing
    import yaml

    import vision_ft

    model = vision_ft.load_adapter(run)
    pre = yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"]["preprocess"]
    images, _ = make_images(np.array([0, 5]), np.random.default_rng(0))
    batch = ra.images_to_tensor([to_mirabest(im) for im in images], pre, model.backbone.input_size[0])
    assert batch.shape == (2, 3, 32, 32) and 0.0 <= batch.min() and batch.max() <= 1.0
    preds = model.predict_images(batch)
    assert [set(p["probs"]) for p in preds] == [{"FRI", "FRII"}] * 2
