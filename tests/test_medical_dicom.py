"""DICOM reading: HU conversion, windowing, MONOCHROME1, multi-frame, series, bad files, metadata privacy."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")

from domains.medical.dicom_sample import write_dicom, write_dicom_sample
from vision_ft.data.medical import DicomManifestData, linear_window, resolve_window
from vision_ft.data.medical.dicom import decode_modality, open_source, read_frame
from vision_ft.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "backbones" / "vit_test_tiny.yaml")


def _manifest(folder: Path, rows: list[tuple[str, str, str]]) -> Path:
    path = folder / "manifest.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id"])
        w.writerows(rows)
    return path


# ---- HU and windowing against hand-computed values --------------------------------------------
def test_rescale_slope_intercept_gives_hounsfield_units(tmp_path):
    stored = np.array([[0, 1024], [1064, 2024]])
    hu, _ = decode_modality(write_dicom(tmp_path / "a.dcm", stored, slope=1.0, intercept=-1024.0))
    assert hu.shape == (1, 2, 2)
    assert hu[0].tolist() == [[-1024.0, 0.0], [40.0, 1000.0]]
    signed = np.array([[-500, 0], [10, 250]])
    hu2, _ = decode_modality(write_dicom(tmp_path / "b.dcm", signed, slope=2.0, intercept=-1000.0, signed=True))
    assert hu2[0].tolist() == [[-2000.0, -1000.0], [-980.0, -500.0]]  # 2 * stored - 1000


def test_linear_window_matches_the_dicom_formula_by_hand():
    # centre 40, width 400: y = (x - 39.5) / 399 + 0.5, clipped to [0, 1]
    x = np.array([-1000.0, -160.0, 40.0, 100.0, 239.0, 240.0, 3000.0])
    expected = [0.0, 0.0, 0.5 + 0.5 / 399, 0.5 + 60.5 / 399, 0.5 + 199.5 / 399, 1.0, 1.0]
    assert np.allclose(linear_window(x, 40.0, 400.0), expected, atol=1e-6)
    # the lung preset is (-600, 1500): -600 HU sits just above the middle grey
    assert resolve_window("lung") == (-600.0, 1500.0)
    assert np.isclose(linear_window(np.array([-600.0]), *resolve_window("lung"))[0], 0.5 + 0.5 / 1499)


@pytest.mark.parametrize("bad", ["lungs", [40], [40, 0], "file?"])
def test_bad_window_names_the_key(bad):
    with pytest.raises(ConfigError, match="data.init_args.window"):
        resolve_window(bad)


def test_presets_file_window_and_explicit_numbers_through_the_reader(tmp_path):
    stored = np.array([[424, 1064, 1424, 2024]])  # HU -600, 40, 400, 1000
    path = write_dicom(tmp_path / "w.dcm", stored, window=(40.0, 400.0))
    source = open_source(path)
    hu = np.array([-600.0, 40.0, 400.0, 1000.0])
    for window, (c, w) in (("lung", (-600, 1500)), ("mediastinum", (50, 350)), ("bone", (400, 1800)),
                           ("brain", (40, 80)), ((10.0, 100.0), (10, 100))):
        got = read_frame(source, 0, resolve_window(window))
        assert np.allclose(got[0], np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1), atol=1e-6), window
    # "file" uses the file's own centre/width (40/400)
    assert np.allclose(read_frame(source, 0, "file")[0], linear_window(hu, 40, 400))
    # a file without a window falls back to min-max of the frame
    plain = open_source(write_dicom(tmp_path / "p.dcm", stored))
    assert np.allclose(read_frame(plain, 0, "file")[0], (hu + 600) / 1600)


def test_monochrome1_is_inverted(tmp_path):
    stored = np.array([[100, 800], [1500, 3000]])
    m2 = read_frame(open_source(write_dicom(tmp_path / "m2.dcm", stored, modality="DX", window=(1500, 3000))), 0,
                    "file")
    m1 = read_frame(open_source(write_dicom(tmp_path / "m1.dcm", stored, modality="DX", photometric="MONOCHROME1",
                                            window=(1500, 3000))), 0, "file")
    assert np.allclose(m1 + m2, 1.0) and m2[0, 0] < m2[1, 1] and m1[0, 0] > m1[1, 1]


def test_multi_frame_file_gives_one_sample_per_frame(tmp_path):
    stored = np.stack([np.full((4, 4), 1024 + 100 * k) for k in range(3)])  # HU 0, 100, 200
    write_dicom(tmp_path / "mf.dcm", stored)
    manifest = _manifest(tmp_path, [("mf.dcm", "a", "P1"), ("mf.dcm", "b", "P2"), ("mf.dcm", "a", "P3"),
                                    ("mf.dcm", "b", "P4")])
    dm = DicomManifestData(str(manifest), frames="all", window=[100, 201], image_size=4,
                           split_fractions=[0.5, 0.25, 0.25], split_file=str(tmp_path / "split.json"))
    samples, patients = dm._all_samples()
    assert len(samples) == 12 and samples.keys[:3] == ["mf.dcm#0", "mf.dcm#1", "mf.dcm#2"]
    # window centre 100 width 201: y = (x - 99.5) / 200 + 0.5
    assert [float(samples.read(i)[0, 0, 0]) for i in range(3)] == pytest.approx([0.0025, 0.5025, 1.0])
    middle = DicomManifestData(str(manifest), frames="middle", image_size=4, split_fractions=[0.5, 0.25, 0.25],
                               split_file=str(tmp_path / "split.json"))
    assert middle._all_samples()[0].keys[0] == "mf.dcm#1"


# ---- series folders -----------------------------------------------------------------------------
def _series(folder: Path, zs, modality="CT", names=None) -> Path:
    for i, z in enumerate(zs):
        name = names[i] if names else f"s{i}.dcm"
        write_dicom(folder / name, np.full((4, 4), 1024 + 10 * i), position=(0, 0, z), instance=i + 1,
                    modality=modality if isinstance(modality, str) else modality[i], series=1)
    return folder


def test_series_is_sorted_along_the_slice_normal(tmp_path):
    folder = _series(tmp_path / "ser", [10.0, 0.0, 5.0, -5.0], names=["a.dcm", "b.dcm", "c.dcm", "d.dcm"])
    source = open_source(folder)
    assert [p.name for p in source.files] == ["d.dcm", "b.dcm", "c.dcm", "a.dcm"]
    assert source.series and source.n_frames == 4


def test_mixed_modality_series_is_refused(tmp_path):
    folder = _series(tmp_path / "mix", [0.0, 5.0, 10.0], modality=["CT", "CT", "MR"])
    with pytest.raises(DataError, match=r"mix.*mixes modalities \['CT', 'MR'\]"):
        open_source(folder)


def test_inconsistent_slice_spacing_is_refused(tmp_path):
    folder = _series(tmp_path / "gap", [0.0, 5.0, 10.0, 20.0, 25.0])  # a missing slice at 15
    with pytest.raises(DataError, match="gap.*inconsistent slice spacing"):
        open_source(folder)


# ---- bad files ----------------------------------------------------------------------------------
def test_file_without_pixel_data_is_an_error_or_skipped_and_counted(tmp_path):
    for i in range(4):
        write_dicom(tmp_path / f"ok{i}.dcm", np.full((4, 4), 1024))
    write_dicom(tmp_path / "empty.dcm", np.zeros((4, 4)), pixel_data=False)
    rows = [(f"ok{i}.dcm", "ab"[i % 2], f"P{i}") for i in range(4)] + [("empty.dcm", "a", "P9")]
    manifest = _manifest(tmp_path, rows)
    kwargs = dict(image_size=4, split_fractions=[0.5, 0.25, 0.25], split_file=str(tmp_path / "s.json"))
    with pytest.raises(DataError, match="empty.dcm: the DICOM file has no pixel data"):
        DicomManifestData(str(manifest), on_corrupt="error", **kwargs).setup()
    dm = DicomManifestData(str(manifest), on_corrupt="skip", **kwargs)
    dm.setup()
    assert len(dm.skipped) == 1 and "empty.dcm" in dm.skipped[0]
    assert sum(len(dm.dataset(s)) for s in ("train", "val", "test")) == 4


def test_missing_file_in_the_manifest_names_it(tmp_path):
    for i in range(4):
        write_dicom(tmp_path / f"ok{i}.dcm", np.full((4, 4), 1024))
    manifest = _manifest(tmp_path, [(f"ok{i}.dcm", "ab"[i % 2], f"P{i}") for i in range(4)] + [("gone.dcm", "a", "P5")])
    with pytest.raises(DataError, match=r"gone.dcm: file does not exist \(listed in .*manifest.csv line 6"):
        DicomManifestData(str(manifest), on_corrupt="error", image_size=4, split_file=str(tmp_path / "s.json"),
                          split_fractions=[0.5, 0.25, 0.25]).setup()


def test_compressed_syntax_without_decoder_names_the_package(tmp_path):
    from pydicom.pixels import get_decoder

    jpeg_ls = "1.2.840.10008.1.2.4.80"
    if get_decoder(jpeg_ls).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    path = write_dicom(tmp_path / "c.dcm", np.full((4, 4), 1024), transfer_syntax=jpeg_ls)
    with pytest.raises(DataError, match=r"c.dcm: pixel data is compressed with JPEG-LS.*(pylibjpeg|pyjpegls|gdcm)"):
        decode_modality(path)


def test_not_a_dicom_file_is_named(tmp_path):
    (tmp_path / "x.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(DataError, match=r"x.dcm: not a readable DICOM file"):
        open_source(tmp_path / "x.dcm")


# ---- metadata and privacy -----------------------------------------------------------------------
def test_chosen_metadata_is_copied_and_names_and_private_tags_are_refused(tmp_path):
    root = write_dicom_sample(tmp_path / "s", n_patients=8, n_slices=3)
    dm = DicomManifestData(str(root / "manifest.csv"), metadata=["PatientID", "Modality", "KVP"], image_size=8,
                           split_file=str(tmp_path / "split.json"), split_fractions=[0.5, 0.25, 0.25])
    dm.setup()
    samples = dm.dataset("train").samples
    for key, record in zip(samples.keys, samples.records):
        assert record == {"PatientID": key.split("/")[0], "Modality": "CT", "KVP": "120.0"}  # DS value as text
    for bad, why in (("PatientName", "person name"), ("OperatorsName", "person name"), ("NotATag", "not a DICOM")):
        with pytest.raises(ConfigError, match=why):
            DicomManifestData(str(root / "manifest.csv"), metadata=[bad])


def test_patient_names_and_private_tags_never_reach_logs_or_run_files(tmp_path, caplog, capsys):
    from vision_ft.cli import main

    caplog.set_level(logging.DEBUG)
    code = main(["fit", "--config", str(ROOT / "domains" / "medical_dicom.yaml"), "--config", TINY,
                 f"--data.init_args.sample_dir={tmp_path / 'sample'}", "--trainer.max_epochs=1",
                 "--data.init_args.metadata=[PatientID,StudyInstanceUID,Modality,PatientSex]",
                 f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.enable_progress_bar=false"])
    assert code == 0
    # the sample really carries a name and a private value (else this test could not fail)
    import pydicom

    ds = pydicom.dcmread(next((tmp_path / "sample").rglob("*.dcm")))
    assert str(ds.PatientName).startswith("Synthetic^Patient") and "SYNTHETIC-PRIVATE" in str(ds)
    written = capsys.readouterr()
    texts = [caplog.text, written.out, written.err]
    assert "SYNTHETIC sample" in "".join(texts)  # the logs were captured (else this test could not fail)
    run_files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    split = next((tmp_path / "sample").rglob("patient_split.json"))
    assert run_files and split.is_file()
    for p in [*run_files, split]:
        texts.append(p.read_bytes().decode("latin-1"))
    for text in texts:
        assert "Synthetic^Patient" not in text and "SYNTHETIC-PRIVATE" not in text and "Patient0" not in text
    assert "SYN0001" in split.read_text()  # patient ids (not names) are what the split file records


def test_sample_is_valid_dicom_with_realistic_hu(tmp_path):
    root = write_dicom_sample(tmp_path / "s", n_patients=4, n_slices=8)
    rows = list(csv.DictReader((root / "manifest.csv").open()))
    assert len(rows) == 32 and {r["label"] for r in rows} == {"normal", "nodule"}
    hu, ds = decode_modality(root / rows[0]["path"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.BitsStored == 12 and ds.RescaleIntercept == -1024
    assert "SYNTHETIC" in ds.StudyDescription
    assert hu.min() < -900 and 500 < hu.max() < 1000  # air and bone
    assert -900 < np.median(hu[0][20:44, 12:24]) < -700  # lung
    source = open_source(root / Path(rows[0]["path"]).parent)
    assert source.n_frames == 8  # a valid series folder: one modality, even 5 mm spacing
    shutil.rmtree(root)


def test_voi_lut_table_from_the_file(tmp_path):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 8])  # LUT Descriptor: 4 entries for inputs 0..3, 8-bit output
    item.add_new(0x00283006, "US", [0, 100, 200, 255])  # LUT Data
    stored = np.array([[0, 1, 2, 3, 10]])
    path = write_dicom(tmp_path / "lut.dcm", stored, modality="DX", slope=1.0, intercept=0.0,
                       extra={"VOILUTSequence": [item]})
    got = read_frame(open_source(path), 0, "file")
    assert got[0].tolist() == pytest.approx([0, 100 / 255, 200 / 255, 1, 1])  # beyond the table: its last entry


def test_rescale_from_shared_and_per_frame_functional_groups(tmp_path):
    from pydicom.dataset import Dataset

    def group(slope, intercept):
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = slope, intercept, "HU"
        g = Dataset()
        g.PixelValueTransformationSequence = [transform]
        return g

    stored = np.stack([np.full((2, 2), 100), np.full((2, 2), 200)])
    shared = write_dicom(tmp_path / "shared.dcm", stored, slope=None,
                         extra={"SharedFunctionalGroupsSequence": [group(2.0, -100.0)]})
    hu, _ = decode_modality(shared)
    assert hu[:, 0, 0].tolist() == [100.0, 300.0]  # 2 * stored - 100
    per_frame = write_dicom(tmp_path / "per_frame.dcm", stored, slope=None,
                            extra={"PerFrameFunctionalGroupsSequence": [group(1.0, -1024.0), group(0.5, 0.0)]})
    hu, _ = decode_modality(per_frame)
    assert hu[:, 0, 0].tolist() == [-924.0, 100.0]


def test_unusable_window_in_the_file_is_named_not_applied(tmp_path):
    path = write_dicom(tmp_path / "w0.dcm", np.full((4, 4), 1024), window=(40.0, 0.0))
    with pytest.raises(DataError, match=r"w0.dcm: the file's Window Center/Width .* not a usable window"):
        read_frame(open_source(path), 0, "file")
    assert read_frame(open_source(path), 0, resolve_window("lung")).shape == (4, 4)  # a config window still works


def test_series_rows_with_all_frames_and_patients_from_the_header(tmp_path):
    root = write_dicom_sample(tmp_path / "s", n_patients=8, n_slices=4)
    series = sorted({str(Path(r["path"]).parent) for r in csv.DictReader((root / "manifest.csv").open())})
    (root / series[0] / "DICOMDIR").write_bytes(b"")  # a media directory file beside the slices is not a slice
    manifest = tmp_path / "series.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([(str(root / s), "ab"[i % 2]) for i, s in enumerate(series)])
    dm = DicomManifestData(str(manifest), patient_column=None, frames="all", image_size=8,
                           split_fractions=[0.5, 0.25, 0.25], split_file=str(tmp_path / "split.json"))
    samples, patients = dm._all_samples()
    assert len(samples) == 8 * 4 and patients[:4] == ["SYN0000"] * 4  # the DICOM PatientID
    # slices in order along the normal: positions z = 0, -5, -10, -15 -> IM0003 first
    assert [samples.describe(i).rsplit("/", 1)[1] for i in range(4)] == [f"IM{k:04d}.dcm" for k in (3, 2, 1, 0)]
