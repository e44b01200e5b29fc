"""NIfTI volumes: orientation through the affine, slices and 2.5-D stacks, slice labels, bad volumes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from domains.medical.nifti_sample import abdomen_volume, write_nifti_sample
from vision_ft.data.medical import NiftiSliceData
from vision_ft.data.medical.nifti import (
    load_canonical,
    plane_slice,
    slice_indices,
    slice_labels,
    slice_stack,
    windowed_volume,
)
from vision_ft.errors import ConfigError, DataError

RAS = np.diag([2.0, 3.0, 4.0, 1.0])


def _save(path: Path, data: np.ndarray, affine: np.ndarray = RAS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def _volume(shape=(5, 6, 7), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---- orientation ---------------------------------------------------------------------------------
def test_flipped_and_permuted_affine_gives_the_same_axial_slices(tmp_path):
    v = _volume()  # RAS+: (X right, Y anterior, Z superior)
    n0 = v.shape[0]
    # stored superior-first with X flipped: stored[i, j, k] = v[n0-1-j, k, i]
    stored = np.ascontiguousarray(v[::-1, :, :].transpose(2, 0, 1))
    m = np.array([[0, -1, 0, n0 - 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    a = load_canonical(_save(tmp_path / "ras.nii.gz", v))
    b = load_canonical(_save(tmp_path / "flipped.nii", stored, RAS @ m))
    assert nib.aff2axcodes(RAS @ m) == ("S", "L", "A")
    assert np.array_equal(a, v) and np.array_equal(b, v)
    for k in range(v.shape[2]):
        assert np.array_equal(plane_slice(a, "axial", k), plane_slice(b, "axial", k))
    # a reader that sliced the stored array's last axis would have cut a different plane
    assert stored.shape[2] != v.shape[2]


def test_planes_are_displayed_as_in_radiology():
    v = np.zeros((4, 5, 6), np.float32)
    v[3, 4, 5] = 1.0  # the most right, anterior, superior voxel
    ax = plane_slice(v, "axial", 5)
    assert ax.shape == (5, 4) and ax[0, 0] == 1  # anterior at the top, patient's right on the image's left
    co = plane_slice(v, "coronal", 4)
    assert co.shape == (6, 4) and co[0, 0] == 1  # superior at the top, right on the left
    sa = plane_slice(v, "sagittal", 3)
    assert sa.shape == (6, 5) and sa[0, 0] == 1  # superior at the top, anterior on the left
    with pytest.raises(ConfigError, match="plane"):
        plane_slice(v, "transverse", 0)


def test_sample_volumes_are_stored_non_ras_and_read_back_exactly(tmp_path):
    root = write_nifti_sample(tmp_path / "s", n_cases=2)
    for case, codes in ((0, ("L", "P", "S")), (1, ("S", "L", "A"))):
        img = nib.load(str(root / "imagesTr" / f"synthetic_{case:03d}.nii"))
        assert nib.aff2axcodes(img.affine) == codes and not np.allclose(img.affine, np.eye(4))
        hu, labels = abdomen_volume(np.random.default_rng([0, case]), tumour=case % 4 != 0)
        assert np.array_equal(load_canonical(root / "imagesTr" / f"synthetic_{case:03d}.nii"), hu)
        assert np.array_equal(load_canonical(root / "labelsTr" / f"synthetic_{case:03d}.nii"), labels)
    assert -1024 <= hu.min() < -900 and 600 < hu.max() < 800  # air and bone in HU


# ---- slices, stacks, labels, intensities ---------------------------------------------------------
def test_slice_range_and_step():
    assert slice_indices(10) == list(range(10))
    assert slice_indices(10, [2, 8], 3) == [2, 5]
    assert slice_indices(10, [-3, 10], 1) == [7, 8, 9]


def test_two_and_a_half_d_stack_holds_the_neighbours_with_edges_repeated():
    v = np.zeros((3, 3, 4), np.float32)
    for k in range(4):
        v[:, :, k] = k
    mid = slice_stack(v, "axial", 2, context=1)
    assert mid.shape == (3, 3, 3) and [float(mid[0, 0, c]) for c in range(3)] == [1, 2, 3]
    edge = slice_stack(v, "axial", 0, context=1)
    assert [float(edge[0, 0, c]) for c in range(3)] == [0, 0, 1]
    assert slice_stack(v, "axial", 3).shape == (3, 3, 1)


def test_slice_is_positive_from_min_voxels_of_the_chosen_labels():
    mask = np.zeros((4, 4, 3), np.int16)
    mask[0, 0, 0] = 2            # slice 0: one tumour voxel
    mask[:2, :2, 1] = 2          # slice 1: four tumour voxels
    mask[:, :, 2] = 1            # slice 2: liver only (16 voxels)
    assert slice_labels(mask, "axial", 1, [2]).tolist() == [1, 1, 0]
    assert slice_labels(mask, "axial", 2, [2]).tolist() == [0, 1, 0]
    assert slice_labels(mask, "axial", 1, None).tolist() == [1, 1, 1]
    assert slice_labels(mask, "axial", 5, None).tolist() == [0, 0, 1]


def test_window_and_percentile_scaling_by_hand(tmp_path):
    ramp = np.arange(101, dtype=np.float32).reshape(101, 1, 1) * np.ones((1, 2, 2), np.float32)  # 0..100
    path = _save(tmp_path / "ramp.nii", ramp)
    pct = windowed_volume(path, "percentile", (10.0, 90.0))
    # the 10th/90th percentiles of 0..100 are 10 and 90: y = (x - 10) / 80, clipped
    assert np.allclose(pct[:, 0, 0], np.clip((np.arange(101) - 10) / 80, 0, 1), atol=1e-6)
    win = windowed_volume(path, (50.0, 21.0), (0.5, 99.5))
    # DICOM linear window: y = (x - 49.5) / 20 + 0.5
    assert np.allclose(win[[39, 40, 50, 59, 60], 0, 0], [0.0, 0.025, 0.525, 0.975, 1.0], atol=1e-6)


# ---- the datamodule -------------------------------------------------------------------------------
def _csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _cases(tmp_path: Path, n: int = 8) -> list[list[str]]:
    rows = []
    for i in range(n):
        v = _volume((4, 4, 6), seed=i)
        m = np.zeros((4, 4, 6), np.int16)
        if i % 2:
            m[:2, :2, 2:4] = 1
        _save(tmp_path / f"img{i}.nii.gz", v)
        _save(tmp_path / f"mask{i}.nii.gz", m)
        rows.append([f"img{i}.nii.gz", f"mask{i}.nii.gz", f"P{i}"])
    return rows


def test_csv_manifest_with_masks_gives_slice_labels_and_patient_splits(tmp_path):
    manifest = _csv(tmp_path / "m.csv", ["image", "mask", "patient_id"], _cases(tmp_path))
    dm = NiftiSliceData(str(manifest), min_voxels=4, image_size=8, split_fractions=[0.5, 0.25, 0.25],
                        split_file=str(tmp_path / "split.json"))
    assert (dm.num_classes, dm.class_names) == (2, ["negative", "positive"])
    dm.setup()
    total = sum(len(dm.dataset(s)) for s in ("train", "val", "test"))
    assert total == 8 * 6
    for s in ("train", "val", "test"):
        samples = dm.dataset(s).samples
        for key, label in zip(samples.keys, samples.labels):
            case = int(key.split(".")[0][3:])
            k = int(key.split("axial")[1])
            assert label == int(case % 2 == 1 and k in (2, 3)), key
    item = dm.dataset("train")[0]
    assert item["image"].shape == (3, 8, 8) and 0 <= float(item["image"].min()) <= float(item["image"].max()) <= 1


def test_volume_label_column_and_decathlon_json(tmp_path):
    rows = _cases(tmp_path)
    manifest = _csv(tmp_path / "v.csv", ["image", "label", "patient_id"],
                    [[r[0], "ab"[i % 2], r[2]] for i, r in enumerate(rows)])
    dm = NiftiSliceData(str(manifest), label_column="label", slice_range=[1, 5], step=2, image_size=8,
                        split_fractions=[0.5, 0.25, 0.25], split_file=str(tmp_path / "s1.json"))
    assert dm.class_names == ["a", "b"]
    samples, patients = dm._all_samples()
    assert len(samples) == 8 * 2 and samples.keys[:2] == ["img0.nii.gz:axial1", "img0.nii.gz:axial3"]
    root = write_nifti_sample(tmp_path / "msd", n_cases=4)
    msd = NiftiSliceData(str(root / "dataset.json"), positive_labels=[2], window="bone", image_size=8,
                         split_fractions=[0.5, 0.25, 0.25], split_file=str(tmp_path / "s2.json"))
    samples, patients = msd._all_samples()
    assert sorted(set(patients)) == [f"synthetic_{i:03d}" for i in range(4)] and len(samples) == 4 * 20
    assert samples.labels.sum() > 0


def test_nan_volume_is_named_or_skipped_and_counted(tmp_path):
    rows = _cases(tmp_path)
    v = _volume((4, 4, 6), seed=99)
    v[1, 1, 1] = np.nan
    _save(tmp_path / "img3.nii.gz", v)
    manifest = _csv(tmp_path / "m.csv", ["image", "mask", "patient_id"], rows)
    kwargs = dict(image_size=8, split_fractions=[0.5, 0.25, 0.25], split_file=str(tmp_path / "split.json"))
    with pytest.raises(DataError, match=r"img3.nii.gz: 1 voxel\(s\) are NaN or infinite"):
        NiftiSliceData(str(manifest), on_corrupt="error", **kwargs).setup()
    dm = NiftiSliceData(str(manifest), on_corrupt="skip", **kwargs)
    dm.setup()
    assert len(dm.skipped) == 6 and all("img3.nii.gz" in s for s in dm.skipped)  # its six slices
    assert sum(len(dm.dataset(s)) for s in ("train", "val", "test")) == 7 * 6


def test_missing_volume_and_mismatched_mask_are_named(tmp_path):
    rows = _cases(tmp_path)
    rows.append(["gone.nii.gz", "mask0.nii.gz", "P9"])
    manifest = _csv(tmp_path / "m.csv", ["image", "mask", "patient_id"], rows)
    kwargs = dict(image_size=8, split_fractions=[0.5, 0.25, 0.25], split_file=str(tmp_path / "split.json"))
    with pytest.raises(DataError, match=r"gone.nii.gz: file does not exist \(listed in .*m.csv, entry 10"):
        NiftiSliceData(str(manifest), on_corrupt="error", **kwargs).setup()
    skip = NiftiSliceData(str(manifest), on_corrupt="skip", **kwargs)
    skip.setup()
    assert len(skip.skipped) == 1 and "gone.nii.gz" in skip.skipped[0]
    _save(tmp_path / "mask1.nii.gz", np.zeros((4, 4, 5), np.int16))
    with pytest.raises(DataError, match=r"mask1.nii.gz: label volume shape \(4, 4, 5\)"):
        NiftiSliceData(str(manifest), on_corrupt="error", **kwargs).setup()


@pytest.mark.parametrize("bad", [{"context": 2}, {"plane": "transverse"}, {"step": 0}, {"window": "file"},
                                 {"slice_range": [1]}])
def test_bad_options_name_the_key(tmp_path, bad):
    manifest = _csv(tmp_path / "m.csv", ["image", "mask", "patient_id"], _cases(tmp_path, 2))
    with pytest.raises(ConfigError, match="data.init_args"):
        NiftiSliceData(str(manifest), **bad)
