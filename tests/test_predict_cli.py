"""`python -m vision_ft predict RUN|--ckpt_path --images ...` writes predictions.csv, and a run's
data preprocessing (the radio pack's sigma clip and stretch) is recorded and applied at inference."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vision_ft
from vision_ft.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "backbones" / "vit_test_tiny.yaml")
QUICK = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
         "--test_after_fit=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _fit(root: Path, pack: str, *extra: str) -> Path:
    assert main(["fit", "--config", str(ROOT / "domains" / f"{pack}.yaml"), "--config", TINY,
                 f"--trainer.logger.init_args.save_dir={root / 'runs'}", f"--data.init_args.sample_dir={root / 's'}",
                 *QUICK, *extra]) == 0
    return sorted((root / "runs" / pack).glob("version_*"))[-1]


@pytest.fixture(scope="module")
def medical_run(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("medical"), "medical")


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _images(folder: Path, n: int = 5) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"img_{i}.png")
        Image.fromarray(g.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_predict_on_a_run_and_a_folder_writes_predictions_csv(medical_run, tmp_path):
    paths = _images(tmp_path / "scans")
    assert main(["predict", str(medical_run), "--images", str(tmp_path / "scans")]) == 0
    rows = _read(medical_run / "predictions.csv")
    names = json.loads((medical_run / "adapter.json").read_text())["class_names"]
    assert list(rows[0]) == ["path", "label", *[f"prob_{n}" for n in names]]
    assert [Path(r["path"]).name for r in rows] == [p.name for p in paths]
    model = vision_ft.load_adapter(medical_run)
    with torch.no_grad():  # the same images decoded here with PIL, through the model's forward
        x = torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255).permute(2, 0, 1)
                         for p in paths])
        expected = model(torch.nn.functional.interpolate(x, size=model.backbone.input_size, mode="bilinear",
                                                         antialias=True, align_corners=False)).softmax(-1)
    got = torch.tensor([[float(r[f"prob_{n}"]) for n in names] for r in rows])
    assert torch.allclose(got, expected, atol=2e-3)
    assert [r["label"] for r in rows] == [names[i] for i in expected.argmax(-1).tolist()]


def test_predict_from_a_checkpoint_and_a_csv_matches_the_run(medical_run, tmp_path):
    paths = _images(tmp_path / "scans", n=3)
    (tmp_path / "list.csv").write_text("path,note\n" + "".join(f"scans/{p.name},x\n" for p in paths))
    out = tmp_path / "from_ckpt.csv"
    assert main(["predict", "--ckpt_path", str(medical_run / "checkpoints" / "last.ckpt"),
                 "--images", str(tmp_path / "list.csv"), "--out", str(out)]) == 0
    assert main(["predict", str(medical_run), "--images", *map(str, paths), "--out", str(tmp_path / "run.csv")]) == 0
    from_ckpt, from_run = _read(out), _read(tmp_path / "run.csv")
    assert len(from_ckpt) == 3
    for a, b in zip(from_ckpt, from_run):
        assert Path(a["path"]).name == Path(b["path"]).name and a["label"] == b["label"]
        assert all(abs(float(a[k]) - float(b[k])) < 1e-5 for k in a if k.startswith("prob_"))


def test_predict_errors_name_what_to_fix(medical_run, tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("file\nx.png\n")
    assert main(["predict", str(medical_run), "--images", str(tmp_path / "bad.csv")]) == 2
    assert "'path' column" in capsys.readouterr().err
    assert main(["predict", str(medical_run), "--images", str(tmp_path / "nothing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_radio_preprocessing_is_recorded_with_the_run_and_applied_at_inference(tmp_path):
    from domains.radio_astronomy.data import images_to_tensor
    from domains.radio_astronomy.mirabest import read_batch

    run = _fit(tmp_path, "radio_astronomy")
    meta = json.loads((run / "adapter.json").read_text())
    spec = meta["input_transform"]
    assert spec["class_path"] == "domains.radio_astronomy.preprocess.RadioPreprocess"
    assert spec["init_args"]["stretch"] == "asinh" and spec["init_args"]["interval"] == "minmax"

    raw = read_batch(next((tmp_path / "s").rglob("test_batch"))).images[:4]  # 8-bit MiraBest cutouts
    model = vision_ft.load_adapter(run)
    got = torch.tensor([[r["probs"][n] for n in meta["class_names"]] for r in model.predict_images(list(raw))])
    with torch.no_grad():  # the pack's own helper, given the training preprocessing explicitly
        x = images_to_tensor(raw, spec["init_args"], model.backbone.input_size[0])
        expected = model(x).softmax(-1)
        unprocessed = model(images_to_tensor(raw, {"stretch": "linear"}, model.backbone.input_size[0])).softmax(-1)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(expected, unprocessed, atol=1e-4), "the stretch should change the inputs"

    folder = tmp_path / "cutouts"
    folder.mkdir()
    for i, image in enumerate(raw):
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(folder / f"c{i}.png")
    assert main(["predict", str(run), "--images", str(folder)]) == 0
    rows = _read(run / "predictions.csv")
    from_cli = torch.tensor([[float(r[f"prob_{n}"]) for n in meta["class_names"]] for r in rows])
    assert torch.allclose(from_cli, expected, atol=1e-5)


def test_fits_cutouts_are_decoded_and_preprocessed_as_the_fits_data_did(tmp_path):
    """A run on FITS cutouts records the FITS reader with its preprocessing: predict_images and
    `predict --images` decode .fits files (NaN blanks and all) exactly as RadioFITSData did in training."""
    pytest.importorskip("astropy")
    from domains.radio_astronomy.data import RadioFITSData, read_fits_image
    from domains.radio_astronomy.preprocess import RadioPreprocess
    from domains.radio_astronomy.sample import write_fits_sample
    from vision_ft.backbones import TimmViT
    from vision_ft.data import to_tensor
    from vision_ft.export import save_adapter
    from vision_ft.tasks import ImageClassificationTask

    write_fits_sample(tmp_path / "fits_sample", n_train=8, n_test=4)
    pre = {"nan_policy": "background", "sigma_clip": 3.0, "interval": "zscale", "stretch": "asinh"}
    data = RadioFITSData(train_csv=str(tmp_path / "fits_sample" / "train.csv"), preprocess=pre, image_size=32)
    task = ImageClassificationTask(TimmViT("vit_test_tiny"), method="ssf", num_classes=data.num_classes,
                                   class_names=data.class_names)
    task.input_transform_spec = data.input_transform()  # what setup("fit") records
    save_adapter(task, tmp_path / "run")
    files = sorted((tmp_path / "fits_sample" / "fits").glob("*_test_*.fits"))
    model = vision_ft.load_adapter(tmp_path / "run")
    got = torch.tensor([[r["probs"][n] for n in data.class_names] for r in model.predict_images(files)])
    with torch.no_grad():  # decoded and preprocessed here by the pack's own functions, independently
        x = torch.stack([to_tensor(RadioPreprocess(**pre)(read_fits_image(f)), 32) for f in files])
        expected = model(x).softmax(-1)
    assert torch.allclose(got, expected, atol=1e-5)
    assert main(["predict", str(tmp_path / "run"), "--images", str(tmp_path / "fits_sample" / "fits")]) == 0
    rows = _read(tmp_path / "run" / "predictions.csv")
    assert len(rows) == len(list((tmp_path / "fits_sample" / "fits").glob("*.fits")))


@pytest.mark.parametrize("window", ["lung", [40.0, 400.0]])
def test_dicom_files_are_read_with_the_runs_window_at_prediction(tmp_path, window):
    """A run on a DICOM manifest records a reader with its window, percentiles and frame choice: predict_images
    and `predict --images` on .dcm files feed the model what the DICOM data fed it in training."""
    pytest.importorskip("pydicom")
    from domains.medical.dicom_sample import write_dicom_sample
    from vision_ft.backbones import TimmViT
    from vision_ft.data import to_tensor
    from vision_ft.data.medical import DicomManifestData
    from vision_ft.export import save_adapter
    from vision_ft.tasks import ImageClassificationTask

    root = write_dicom_sample(tmp_path / "dcm", n_patients=4, n_slices=3)
    data = DicomManifestData(manifest=str(root / "manifest.csv"), window=window, image_size=32,
                             split_file=str(tmp_path / "split.json"))
    task = ImageClassificationTask(TimmViT("vit_test_tiny"), method="ssf", num_classes=data.num_classes,
                                   class_names=data.class_names)
    task.input_transform_spec = data.input_transform()  # what setup("fit") records
    json.dumps(task.input_transform_spec)  # it travels in adapter.json
    save_adapter(task, tmp_path / "run")
    files = sorted(root.rglob("*.dcm"))
    model = vision_ft.load_adapter(tmp_path / "run")
    got = torch.tensor([[r["probs"][n] for n in data.class_names] for r in model.predict_images(files)])
    samples, _ = data._all_samples()  # the training reader, on the same files
    by_key = {samples.keys[i]: i for i in range(len(samples.keys))}
    with torch.no_grad():
        x = torch.stack([to_tensor(samples.read(by_key[f.relative_to(root).as_posix()]), 32) for f in files])
        expected = model(x).softmax(-1)
    assert torch.allclose(got, expected, atol=1e-5)
    other = vision_ft.load_adapter(tmp_path / "run")
    other.input_transform_spec = None  # without the recorded reader PIL cannot open a .dcm at all
    with pytest.raises(Exception):
        other.predict_images(files[:1])
    assert main(["predict", str(tmp_path / "run"), "--images", str(root)]) == 0
    rows = _read(tmp_path / "run" / "predictions.csv")
    assert len(rows) == len(files)
