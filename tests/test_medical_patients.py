"""Patient-level splits: no leakage, stratification, the split file reused, hand-written leaks refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vision_ft.data.medical import (
    check_no_leakage,
    draw_patient_split,
    read_split_file,
    resolve_patient_split,
)
from vision_ft.data.medical.patients import patient_strata
from vision_ft.errors import ConfigError, DataError


def _data(n_patients=40, per_patient=5, seed=0):
    rng = np.random.default_rng(seed)
    patients, labels = [], []
    for p in range(n_patients):
        sick = p % 4 == 0  # a quarter of the patients have class 1 on some of their images
        for k in range(per_patient):
            patients.append(f"P{p:03d}")
            labels.append(int(sick and k < 2 and rng.random() < 0.9))
    return patients, np.array(labels)


def test_every_patient_lands_in_exactly_one_split():
    patients, labels = _data()
    splits, stratified = draw_patient_split(patients, labels, (0.7, 0.15, 0.15), seed=3)
    sets = {s: set(v) for s, v in splits.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert sets["train"] | sets["val"] | sets["test"] == set(patients)
    # folds of round(1/0.15) = 7 over 40 patients, then of round(0.85/0.15) = 6 over the rest
    assert 4 <= len(sets["test"]) <= 8 and 4 <= len(sets["val"]) <= 8
    assert stratified
    strata = patient_strata(patients, labels)
    for s in ("val", "test"):  # each held-out split gets some patients of the rare stratum
        assert any(strata[p] == 1 for p in splits[s]), s


def test_stratum_is_the_rarest_class_a_patient_has():
    strata = patient_strata(["a", "a", "a", "b", "b", "c"], np.array([0, 0, 1, 0, 0, 2]))
    assert strata == {"a": 1, "b": 0, "c": 2}
    multi = np.array([[1, 0, np.nan], [0, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=np.float32)
    assert patient_strata(["a", "a", "b", "c"], multi) == {"a": 2, "b": -1, "c": 1}


def test_too_few_patients_per_stratum_falls_back_to_a_plain_draw():
    patients = [f"P{i}" for i in range(10)]
    labels = np.array([1] + [0] * 9)  # one patient of class 1: cannot be stratified into 7 folds
    splits, stratified = draw_patient_split(patients, labels, (0.7, 0.15, 0.15), seed=0)
    assert not stratified and sum(len(v) for v in splits.values()) == 10


def test_split_file_is_written_and_reused(tmp_path):
    patients, labels = _data()
    file = tmp_path / "split.json"
    a = resolve_patient_split(file, patients, labels, fractions=(0.7, 0.15, 0.15), seed=1, stratify=True,
                              identity={"name": "x"})
    data = json.loads(file.read_text())
    assert data["splits"] == a and data["seed"] == 1 and data["stratified"] is True
    # a different seed does not redraw: the file wins
    b = resolve_patient_split(file, patients, labels, fractions=(0.7, 0.15, 0.15), seed=99, stratify=True,
                              identity={"name": "x"})
    assert b == a


def test_hand_written_split_with_a_patient_in_two_splits_fails_loudly(tmp_path):
    file = tmp_path / "mine.json"
    file.write_text(json.dumps({"splits": {"train": ["A", "B"], "val": ["C"], "test": ["B", "D"]}}))
    with pytest.raises(DataError, match=r"mine.json: patient 'B' is in both train and test"):
        read_split_file(file)
    with pytest.raises(DataError, match="mine.json"):
        resolve_patient_split(file, ["A", "B", "C", "D"], np.zeros(4), fractions=(0.5, 0.25, 0.25), seed=0,
                              stratify=False, identity={})
    with pytest.raises(DataError, match="twice in val"):
        check_no_leakage({"train": ["A"], "val": ["C", "C"]}, "x")


def test_split_file_that_misses_a_patient_of_the_data_is_refused(tmp_path):
    file = tmp_path / "old.json"
    file.write_text(json.dumps({"splits": {"train": ["A", "B"], "val": ["C"], "test": []}}))
    with pytest.raises(DataError, match=r"old.json .* does not place 1 patient\(s\) of the data, e.g. \['D'\]"):
        resolve_patient_split(file, ["A", "B", "C", "D"], np.zeros(4), fractions=(0.5, 0.25, 0.25), seed=0,
                              stratify=False, identity={})


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.8, 0.0, 0.2), (0.7, 0.2, 0.2), (-0.1, 0.6, 0.5)])
def test_bad_fractions_name_the_key(fractions):
    with pytest.raises(ConfigError, match="split_fractions"):
        draw_patient_split(["a", "b"], np.zeros(2), fractions)


def test_datamodule_never_puts_a_patient_in_two_splits(tmp_path):
    pytest.importorskip("pydicom")
    from domains.medical.dicom_sample import write_dicom_sample
    from vision_ft.data.medical import DicomManifestData

    root = write_dicom_sample(tmp_path / "s", n_patients=12, n_slices=4)
    dm = DicomManifestData(str(root / "manifest.csv"), image_size=8, split_fractions=[0.5, 0.25, 0.25],
                           split_dir=str(tmp_path / "splits"))
    dm.setup()
    seen = {}
    for split in ("train", "val", "test"):
        for key in dm.dataset(split).samples.keys:
            patient = key.split("/")[0]
            assert seen.setdefault(patient, split) == split, f"{patient} in {seen[patient]} and {split}"
    assert set(seen) == {f"SYN{i:04d}" for i in range(12)}
    assert dm.patient_split_file == tmp_path / "splits" / "patient_split.json"
    assert {s: sorted(v) for s, v in dm.split_patients.items()} == read_split_file(dm.patient_split_file)
    # a hand-edit that leaks a test patient into train is caught on the next run
    data = json.loads(dm.patient_split_file.read_text())
    data["splits"]["train"].append(data["splits"]["test"][0])
    dm.patient_split_file.write_text(json.dumps(data))
    again = DicomManifestData(str(root / "manifest.csv"), image_size=8, split_file=str(dm.patient_split_file))
    with pytest.raises(DataError, match="patient_split.json: patient 'SYN.*' is in both train and test"):
        again.setup()


def test_leaking_split_file_stops_the_main_job_with_the_file_named(tmp_path, capsys):
    pytest.importorskip("pydicom")
    from pathlib import Path

    from vision_ft.cli import main

    root = Path(__file__).resolve().parents[1]
    patients = [f"SYN{i:04d}" for i in range(30)]
    split = tmp_path / "hand_written_split.json"
    split.write_text(json.dumps({"splits": {"train": patients[:22], "val": patients[22:26],
                                            "test": patients[26:] + ["SYN0005"]}}))
    code = main(["fit", "--config", str(root / "domains" / "medical_dicom.yaml"),
                 "--config", str(root / "configs" / "backbones" / "vit_test_tiny.yaml"),
                 f"--data.init_args.sample_dir={tmp_path / 'sample'}", f"--data.init_args.split_file={split}",
                 f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.fast_dev_run=true"])
    err = capsys.readouterr().err
    assert code == 2
    assert "hand_written_split.json: patient 'SYN0005' is in both train and test" in err
    assert "Traceback" not in err


def test_image_csv_with_a_patient_column(tmp_path):
    from PIL import Image

    from vision_ft.data.medical import PatientCSVData

    rows = []
    for p in range(12):
        for k in range(3):
            name = f"img/p{p}_{k}.png"
            (tmp_path / "img").mkdir(exist_ok=True)
            if (p, k) != (4, 1):  # one row names a missing file
                Image.new("L", (8, 8), 40 * k).save(tmp_path / name)
            rows.append(f"{name},{'sick' if p % 3 == 0 else 'well'},P{p}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,patient_id\n" + "\n".join(rows) + "\n")
    kw = dict(image_size=8, split_fractions=[0.5, 0.25, 0.25], split_file=str(tmp_path / "split.json"))
    with pytest.raises(DataError, match=r"p4_1.png"):
        PatientCSVData(str(manifest), on_corrupt="error", **kw).setup()
    dm = PatientCSVData(str(manifest), **kw)
    assert dm.class_names == ["sick", "well"]
    dm.setup()
    assert len(dm.skipped) == 1 and "p4_1.png" in dm.skipped[0]
    where = {}
    for split in ("train", "val", "test"):
        for key in dm.dataset(split).samples.keys:
            patient = key.split("/")[1].split("_")[0]
            assert where.setdefault(patient, split) == split
    assert len(where) == 12
