"""Surgery video pack: Cholec80 / HeiCo readers against files in the real formats, the synthetic
sample, phase metrics on files, and the pack's main command end to end (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import domains.surgery_video as pack
from domains.surgery_video import (
    CHOLEC80_PHASES, HEICO_PHASES, Cholec80Data, HeiCoData, crop_black_margin, evaluate_phase_files, format_report,
    labels_to_ranges, phase_metrics, ranges_to_labels, read_cholec80_phases, read_heico_phase_csv,
    read_phase_json, write_cholec80_phases, write_heico_phase_csv, write_phase_json, write_sample,
)
from domains.surgery_video.sample import MARKER, SAMPLE_SPLITS, phase_lengths
from vision_ft.data.video import check_disjoint, write_video
from vision_ft.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "backbones" / "vit_test_tiny.yaml")


def _cholec80(root: Path, videos: dict[str, list[int]], annotation_fps: int = 25, folder=lambda v: v,
              name=lambda k, fps: f"{k * fps}.jpg", size: int = 12) -> Path:
    """Write a Cholec80-layout folder: per-second phase ids → 25-fps annotation rows + 1-fps frames."""
    for vid, per_second in videos.items():
        rows = [CHOLEC80_PHASES[p] for p in per_second for _ in range(annotation_fps)]
        write_cholec80_phases(root / "phase_annotations" / f"{vid}-phase.txt", rows)
        frames = root / "frames" / folder(vid)
        frames.mkdir(parents=True, exist_ok=True)
        for k, p in enumerate(per_second):
            Image.new("RGB", (size, size), (30 * p, 5 * k, 0)).save(frames / name(k, annotation_fps))
    return root


# ---- the package surface --------------------------------------------------------------------------
def test_pack_exports_datamodules_metrics_transforms_and_config():
    assert pack.CONFIG.is_file() and pack.CONFIG.name == "surgery_video.yaml"
    assert set(pack.__all__) >= {"Cholec80Data", "HeiCoData", "phase_metrics", "crop_black_margin", "CONFIG",
                                 "write_sample", "evaluate_phase_files", "plot_phase_ribbon"}
    with pytest.raises(AttributeError):
        pack.NotAThing  # noqa: B018


# ---- Cholec80 format -------------------------------------------------------------------------------
def test_cholec80_phase_file_round_trip_keeps_the_real_layout(tmp_path):
    phases = ["Preparation"] * 3 + ["CalotTriangleDissection"] * 2
    path = write_cholec80_phases(tmp_path / "video01-phase.txt", phases)
    text = path.read_text()
    assert text.splitlines()[:2] == ["Frame\tPhase", "0\tPreparation"] and text.count("\n") == 6
    frames, read = read_cholec80_phases(path)
    assert frames.tolist() == [0, 1, 2, 3, 4] and read == phases
    (tmp_path / "bad-phase.txt").write_text("Frame\tPhase\n0\tPreparation\nzero\tPreparation\n")
    with pytest.raises(DataError, match=r"bad-phase\.txt:3"):
        read_cholec80_phases(tmp_path / "bad-phase.txt")


def test_cholec80_reader_subsamples_25fps_annotations_to_1fps_frames(tmp_path):
    videos = {"video01": [0, 0, 1, 1, 1, 2], "video02": [0, 3, 3, 4, 5, 6, 6], "video03": [0, 1, 2],
              "video04": [6, 6]}
    root = _cholec80(tmp_path / "c80", videos)
    dm = Cholec80Data(root=str(root), num_frames=2, image_size=12, test_fraction=0.5, val_fraction=0.0)
    assert (dm.num_classes, dm.class_names, dm.multilabel) == (7, CHOLEC80_PHASES, False)
    for vid, per_second in videos.items():
        assert dm.videos[vid].labels.tolist() == per_second
        assert [p.name for p in dm.videos[vid].frames.paths] == [f"{25 * k}.jpg" for k in range(len(per_second))]
    assert dm.splits == {"train": ["video01", "video02"], "val": [], "test": ["video03", "video04"]}
    item = dm.dataset("test")[2]  # video03, frame 2: phase 2
    assert int(item["label"]) == 2 and item["video_id"] == "video03"
    red = item["video"][-1, 0].mean().item()  # the frame written with red = 30 * phase
    assert abs(red * 255 - 60) < 3


def test_cholec80_reader_accepts_numbered_folders_and_sequential_names(tmp_path):
    videos = {"video01": [0, 1, 1, 2], "video02": [0, 0, 1]}
    tmrnet = _cholec80(tmp_path / "a", videos, folder=lambda v: str(int(v[5:])))  # frames/1/0.jpg, 25.jpg …
    ffmpeg = _cholec80(tmp_path / "b", videos, name=lambda k, fps: f"{k + 1:05d}.png")  # ffmpeg %05d.png from 1
    a = Cholec80Data(root=str(tmrnet), num_frames=2, image_size=12, train_videos=["video01"], val_videos=["video02"])
    b = Cholec80Data(root=str(ffmpeg), num_frames=2, image_size=12, frame_names="sequential",
                     train_videos=["video01"], val_videos=["video02"])
    for dm in (a, b):
        assert {v: x.labels.tolist() for v, x in dm.videos.items()} == videos
    assert b.videos["video01"].frames.paths[0].name == "00001.png"


def test_cholec80_missing_frames_and_unknown_phases(tmp_path, caplog):
    root = _cholec80(tmp_path / "c", {"video01": [0, 1, 1, 2], "video02": [0, 1]})
    (root / "frames" / "video01" / "50.jpg").unlink()
    dm = Cholec80Data(root=str(root), num_frames=2, image_size=12, train_videos=["video01"], val_videos=["video02"])
    assert dm.videos["video01"].labels.tolist() == [0, 1, 2] and "50.jpg" in dm.skipped[0]
    with pytest.raises(DataError, match=r"without an image.*on_corrupt=skip"):
        Cholec80Data(root=str(root), on_corrupt="error", train_videos=["video01"], val_videos=["video02"])
    (root / "phase_annotations" / "video02-phase.txt").write_text("Frame\tPhase\n0\tSuturing\n")
    with pytest.raises(DataError, match=r"video02-phase\.txt: unknown phase\(s\) \['Suturing'\]"):
        Cholec80Data(root=str(root))
    with pytest.raises(DataError, match="does not exist"):
        Cholec80Data(root=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="must divide annotation_fps"):
        Cholec80Data(root=str(root), fps=2.0, annotation_fps=25.0)


def test_cholec80_from_video_files(tmp_path):
    """source=videos: the annotations' frame index is the video's frame index (here a 5-fps video)."""
    per_second = [0, 0, 1, 1, 1, 3]
    root = tmp_path / "c80v"
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], np.uint8)
    frames = np.stack([np.full((16, 16, 3), colours[p], np.uint8) for p in per_second for _ in range(5)])
    write_video(root / "videos" / "video07.mkv", frames, fps=5, codec="ffv1")
    write_cholec80_phases(root / "phase_annotations" / "video07-phase.txt",
                          [CHOLEC80_PHASES[p] for p in per_second for _ in range(5)])
    dm = Cholec80Data(root=str(root), source="videos", annotation_fps=5, num_frames=1, image_size=16,
                      train_videos=["video07"], val_videos=[], test_videos=[])
    assert dm.videos["video07"].labels.tolist() == per_second
    clip = dm.dataset("train")[5]["video"]
    assert np.allclose(clip[0, :, 0, 0].numpy() * 255, colours[3], atol=1)


# ---- HeiCo-style video files -----------------------------------------------------------------------
def _blocks(ids: list[int], fps: int, palette: np.ndarray, h: int = 24, w: int = 32) -> np.ndarray:
    return np.stack([np.full((h, w, 3), palette[i % len(palette)], np.uint8) for i in ids for _ in range(fps)])


def test_heico_frame_wise_csv_round_trip_with_exception_ignored(tmp_path):
    per_second = [0, 0, 1, 13, 4, 4, 12]  # 13 = Exception
    fps = 5
    palette = np.random.default_rng(0).integers(30, 220, (14, 3)).astype(np.uint8)
    video = write_video(tmp_path / "heico" / "Sigmoid" / "3" / "3.avi", _blocks(per_second, fps, palette), fps=fps)
    csv = write_heico_phase_csv(tmp_path / "heico" / "Sigmoid" / "3" / "3_Phase.csv",
                                [p for p in per_second for _ in range(fps)])
    frames, ids = read_heico_phase_csv(csv)
    assert frames.tolist() == list(range(35)) and ids.tolist()[::5] == per_second
    dm = HeiCoData(str(tmp_path / "heico"), num_frames=2, image_size=16, train_videos=["Sigmoid/3/3"],
                   val_videos=[], test_videos=[])
    assert dm.class_names == HEICO_PHASES[:13] and "Exception" not in dm.class_names
    assert dm.videos["Sigmoid/3/3"].labels.tolist() == [0, 0, 1, -1, 4, 4, 12]
    decoded = dm.videos["Sigmoid/3/3"].frames.read(range(7))
    for k, p in enumerate(per_second):  # mpeg4 is lossy: colours within a few levels
        assert np.abs(decoded[k].astype(int) - palette[p]).mean() < 8
    assert len(dm.dataset("train")) == 6  # the Exception second is not a training target
    assert video.suffix == ".avi"


def test_heico_style_json_phase_ranges_round_trip(tmp_path):
    names = ["idle", "dissect", "suture"]
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    ranges = labels_to_ranges(labels, fps=1.0, class_names=names)
    assert ranges[1] == {"start": 3.0, "end": 5.0, "phase": "dissect"}
    palette = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], np.uint8)
    write_video(tmp_path / "v" / "case1.mp4", _blocks(labels.tolist(), 2, palette), fps=2, codec="mpeg4")
    write_phase_json(tmp_path / "v" / "case1.json", ranges, classes=names)
    write_video(tmp_path / "v" / "case2.mp4", _blocks([2, 2, 1], 2, palette), fps=2, codec="libx264")
    write_phase_json(tmp_path / "v" / "case2.json", [(0.0, 2.0, "suture")], classes=names)  # last second unlabelled
    back, classes = read_phase_json(tmp_path / "v" / "case1.json")
    assert classes == names and back[0] == (0.0, 3.0, "idle")
    dm = HeiCoData(str(tmp_path / "v"), num_frames=3, image_size=16, train_videos=["case1"], val_videos=["case2"],
                   test_videos=[])
    assert dm.class_names == names
    assert dm.videos["case1"].labels.tolist() == labels.tolist()
    assert dm.videos["case2"].labels.tolist() == [2, 2, -1]
    times = np.arange(10.0)
    assert ranges_to_labels(back, times, {n: i for i, n in enumerate(names)}).tolist() == labels.tolist()


def test_heico_errors_name_the_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.json").write_text(json.dumps({"phases": [{"start": 0, "end": 5, "phase": "p"},
                                                                 {"start": 4, "end": 6, "phase": "q"}]}))
    with pytest.raises(DataError, match=r"x\.json: phase ranges overlap"):
        read_phase_json(tmp_path / "a" / "x.json")
    write_video(tmp_path / "b" / "lonely.mp4", np.zeros((4, 16, 16, 3), np.uint8), fps=2)
    with pytest.raises(DataError, match="no annotated video files"):
        HeiCoData(str(tmp_path / "b"))
    with pytest.raises(DataError, match=r"lonely\.mp4: no annotation"):
        HeiCoData(str(tmp_path / "b"), on_corrupt="error")
    write_phase_json(tmp_path / "b" / "lonely.json", [(0, 2, "unknown")], classes=["p"])
    with pytest.raises(DataError, match=r"lonely\.json: unknown phase 'unknown'"):
        HeiCoData(str(tmp_path / "b"))


# ---- splits ------------------------------------------------------------------------------------------
def test_overlapping_splits_are_refused_and_sample_splits_are_disjoint(tmp_path):
    root = _cholec80(tmp_path / "c", {"video01": [0, 1], "video02": [2, 3], "video03": [4, 5]})
    with pytest.raises(ConfigError, match=r"video02 \(train and test\)"):
        Cholec80Data(root=str(root), train_videos=["video01", "video02"], test_videos=["video02"])
    check_disjoint(SAMPLE_SPLITS)
    assert sorted(sum(SAMPLE_SPLITS.values(), [])) == [f"video{i:02d}" for i in range(1, 11)]


# ---- transforms and metrics ----------------------------------------------------------------------
def test_crop_black_margin():
    frame = np.zeros((20, 30, 3), np.uint8)
    frame[2:18, 5:25] = 120
    assert crop_black_margin(frame).shape == (16, 20, 3)
    assert crop_black_margin(np.zeros((20, 30, 3), np.uint8)).shape == (20, 30, 3)  # black frame: kept whole
    tiny = np.zeros((20, 30, 3), np.uint8)
    tiny[9:11, 14:16] = 200  # a speck, not a picture: not cropped to it
    assert crop_black_margin(tiny).shape == (20, 30, 3)


def test_phase_metrics_use_seconds_and_the_cholec80_rule():
    target = [3] * 12 + [4] * 12
    pred = [3] * 10 + [5, 5] + [4] * 12  # the last 2 s of dissection predicted as cleaning (+2 phases)
    strict = phase_metrics(target, pred)
    assert strict["accuracy"] == pytest.approx(22 / 24)
    assert phase_metrics(target, pred, fps=1.0, relaxed_s=10)["accuracy"] == 1.0  # Cholec80 rule: forgiven
    assert phase_metrics(target, pred, fps=1.0, relaxed_s=1)["accuracy"] == pytest.approx(23 / 24)
    assert phase_metrics(target, pred, relaxed_s=10, rule="general")["accuracy"] == pytest.approx(22 / 24)


def test_evaluate_phase_files_matches_direct_computation(tmp_path):
    gt = {"video41": [0, 0, 1, 1, 1, 2, 2], "video42": [0, 1, 1, 3, 3, 3]}
    pred = {"video41": [0, 1, 1, 1, 2, 2, 2], "video42": [0, 0, 1, 3, 3, 4]}
    for vid in gt:
        write_cholec80_phases(tmp_path / "gt" / f"{vid}-phase.txt", [CHOLEC80_PHASES[p] for p in gt[vid] for _ in range(25)])
        write_cholec80_phases(tmp_path / "pred" / f"{vid}-phase.txt", [CHOLEC80_PHASES[p] for p in pred[vid]])
    results = evaluate_phase_files(tmp_path / "gt", tmp_path / "pred", relaxed_s=1)
    direct = [phase_metrics(gt[v], pred[v]) for v in gt]
    assert results["strict"]["video_acc"] == pytest.approx(np.mean([d["accuracy"] for d in direct]))
    assert np.allclose(results["per_video"]["video42"]["jaccard"], direct[1]["jaccard"], equal_nan=True)
    assert results["relaxed"]["video_acc"] >= results["strict"]["video_acc"]
    report = format_report(results)
    assert "GallbladderDissection" in report and "video accuracy" in report
    write_cholec80_phases(tmp_path / "pred" / "video42-phase.txt", ["Preparation"] * 3)
    with pytest.raises(DataError, match="3 predicted frames for 6"):
        evaluate_phase_files(tmp_path / "gt", tmp_path / "pred")


# ---- the synthetic sample ----------------------------------------------------------------------------
def test_sample_is_deterministic_ordered_and_in_the_cholec80_layout(tmp_path):
    a = write_sample(tmp_path / "a", n_videos=2, min_seconds=21, max_seconds=24, size=32)
    b = write_sample(tmp_path / "b", n_videos=2, min_seconds=21, max_seconds=24, size=32)
    c = write_sample(tmp_path / "c", n_videos=2, min_seconds=21, max_seconds=24, size=32, seed=1)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "frames/video01/0.jpg").read_bytes() != (c / "frames/video01/0.jpg").read_bytes()
    assert json.loads((a / MARKER).read_text())["synthetic"] is True
    frames, phases = read_cholec80_phases(a / "phase_annotations" / "video01-phase.txt")
    n = len(list((a / "frames" / "video01").glob("*.jpg")))
    assert len(frames) == 25 * n and 21 <= n <= 24  # one annotation row per 25-fps frame
    per_second = phases[::25]
    order = [CHOLEC80_PHASES.index(p) for p in dict.fromkeys(per_second)]
    assert order == list(range(7))  # all seven phases, in surgical order
    assert min(per_second.count(p) for p in CHOLEC80_PHASES) >= 3
    with Image.open(a / "frames/video01/25.jpg") as img:
        assert img.size == (48, 32)  # black side margins of 8 px
    assert write_sample(tmp_path / "a", n_videos=2, min_seconds=21, max_seconds=24, size=32) == a  # reused
    lengths = phase_lengths(np.random.default_rng(0), 50)
    assert sum(lengths) == 50 and min(lengths) >= 3


def test_sample_phases_are_visibly_different(tmp_path):
    """A nearest-centroid classifier on 4×4 colour thumbnails, fitted on 2 videos, labels a third."""
    root = write_sample(tmp_path / "s", n_videos=3, min_seconds=40, max_seconds=45, size=32)

    def video(v):
        _, phases = read_cholec80_phases(root / "phase_annotations" / f"video{v:02d}-phase.txt")
        labels = [CHOLEC80_PHASES.index(p) for p in phases[::25]]
        feats = [np.asarray(Image.open(root / f"frames/video{v:02d}/{25 * k}.jpg").crop((8, 0, 40, 32))
                            .resize((4, 4)), dtype=np.float32).ravel() / 255 for k in range(len(labels))]
        return np.stack(feats), np.array(labels)

    (x1, y1), (x2, y2), (x3, y3) = video(1), video(2), video(3)
    x, y = np.concatenate([x1, x2]), np.concatenate([y1, y2])
    centroids = np.stack([x[y == c].mean(0) for c in range(7)])
    pred = ((x3[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == y3).mean() > 0.6  # chance is 1/7; the biggest phase alone is well under this


# ---- the pack's main command, offline --------------------------------------------------------------
def test_pack_config_fits_end_to_end_and_writes_metrics_plots_and_adapter(tmp_path, capsys):
    from vision_ft.cli import main

    args = ["fit", "--config", str(pack.CONFIG), "--config", TINY,
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--data.init_args.sample_dir={tmp_path / 's'}",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--data.init_args.batch_size=8",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--model.init_args.temporal=gru"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "random init" in out and "run summary" in out
    run = sorted((tmp_path / "runs" / "surgery_video").glob("version_*"))[-1]
    for name in ("adapter.safetensors", "adapter.json", "curves.png", "ribbon_video09.png", "ribbon_video10.png",
                 "test_per_video.csv", "video_splits.json", "predictions/video09-phase.txt"):
        assert (run / name).is_file(), name
    assert json.loads((run / "video_splits.json").read_text()) == SAMPLE_SPLITS
    meta = json.loads((run / "adapter.json").read_text())
    assert meta["task"] == "vision_ft.tasks.video.VideoPhaseTask" and meta["class_names"] == CHOLEC80_PHASES
    shipped = yaml.safe_load(pack.CONFIG.read_text())["data"]["init_args"]
    assert meta["temporal"] == "gru" and meta["clip"]["num_frames"] == shipped["num_frames"]
    metrics = meta["metrics"]
    assert {"val/video_acc", "test/video_acc", "test/video_acc_relaxed", "test/jaccard", "test/f1", "test/precision",
            "test/recall", "test/frame_acc"} <= set(metrics)
    assert any(k.startswith("test/phase_f1_") for k in metrics)
    # the predictions written in the Cholec80 format re-evaluate to the logged numbers
    results = evaluate_phase_files(tmp_path / "s" / "phase_annotations", run / "predictions", relaxed_s=10)
    assert set(results["per_video"]) == {"video09", "video10"}
    assert results["strict"]["video_acc"] == pytest.approx(metrics["test/video_acc"], abs=1e-5)
    assert results["relaxed"]["video_acc"] == pytest.approx(metrics["test/video_acc_relaxed"], abs=1e-5)
    assert results["strict"]["jaccard"] == pytest.approx(metrics["test/jaccard"], abs=1e-5)
    # the adapter reloads for inference and predicts every frame of a video
    import torch

    import vision_ft

    model = vision_ft.load_adapter(run)
    frames = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "s" / f"frames/video09/{25 * k}.jpg")
                                                      .crop((8, 0, 72, 64)))).permute(2, 0, 1).float() / 255
                          for k in range(6)])
    assert model.predict_frames(frames).shape == (6,)


@pytest.mark.slow
def test_default_pack_run_learns_well_above_chance(tmp_path):
    """The shipped config as is (vit_tiny at 64 px, 8 epochs): minutes on CPU."""
    from vision_ft.cli import main

    assert main(["fit", "--config", str(pack.CONFIG), f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                 f"--data.init_args.sample_dir={tmp_path / 's'}", "--trainer.enable_progress_bar=false"]) == 0
    run = sorted((tmp_path / "runs" / "surgery_video").glob("version_*"))[-1]
    metrics = json.loads((run / "adapter.json").read_text())["metrics"]
    assert metrics["test/video_acc"] > 0.6  # chance 1/7; the largest phase covers about a quarter of the frames
