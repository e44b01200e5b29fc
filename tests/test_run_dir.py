"""Runs started at the same moment with the same config get their own run folder."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vision_ft.run_dir import reserve_logger_dirs, reserve_version

ROOT = Path(__file__).resolve().parents[1]
MEDICAL = str(ROOT / "domains" / "medical.yaml")
TINY = str(ROOT / "configs" / "backbones" / "vit_test_tiny.yaml")


def test_reserve_version_takes_the_next_free_number_and_skips_taken_ones(tmp_path):
    (tmp_path / "runs" / "version_0").mkdir(parents=True)
    (tmp_path / "runs" / "version_3").mkdir()
    (tmp_path / "runs" / "notes").mkdir()
    assert reserve_version(tmp_path / "runs") == 4
    assert reserve_version(tmp_path / "runs") == 5
    assert (tmp_path / "runs" / "version_5").is_dir()


def test_a_collision_moves_to_the_next_number(tmp_path, monkeypatch):
    """Another process creates version_0 between the listing and the mkdir: this one gets version_1."""
    import os

    real_mkdir = os.mkdir
    calls = []

    def racing_mkdir(path, *args, **kwargs):
        if not calls:  # the other process wins the first name
            real_mkdir(path, *args, **kwargs)
        calls.append(Path(path).name)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", racing_mkdir)
    assert reserve_version(tmp_path) == 1
    assert calls == ["version_0", "version_1"]


_RACER = """
import sys, time
from vision_ft.run_dir import reserve_version
start = float(sys.argv[2])
while time.time() < start:
    pass
print(reserve_version(sys.argv[1]))
"""


@pytest.mark.subprocess
@pytest.mark.timeout(300)
def test_processes_started_together_reserve_distinct_folders(tmp_path):
    n = 6
    start = time.time() + 2.0  # every process spins until the same instant, then reserves
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path / "runs"), str(start)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    versions = [int(p.communicate(timeout=240)[0].strip()) for p in procs]
    assert sorted(versions) == list(range(n)), versions
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(f"version_{v}" for v in range(n))


def test_the_cli_logger_config_gets_the_reserved_version(tmp_path, monkeypatch):
    from jsonargparse import Namespace

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    trainer = Namespace(fast_dev_run=False, logger=Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                                             init_args=Namespace(save_dir=str(tmp_path), name="m",
                                                                                 version=None)))
    assert reserve_logger_dirs(trainer) == [tmp_path / "m" / "version_0"]
    assert trainer.logger.init_args.version == 0
    # an explicit version is the user's choice; other ranks use rank 0's folder
    assert reserve_logger_dirs(trainer) == []
    trainer.logger.init_args.version = None
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert reserve_logger_dirs(trainer) == [] and trainer.logger.init_args.version is None


# Lightning's own choice of version (list the folder, take the next number) made slow, as on a busy
# or network file system: without the reservation both processes pick version_0.
_SLOW_LISTING = """
import sys, time
from lightning.pytorch.loggers import CSVLogger
listing = CSVLogger._get_next_version
def slow(self):
    version = listing(self)
    time.sleep(5)
    return version
CSVLogger._get_next_version = slow
from vision_ft.cli import main
sys.argv[0] = "vision_ft"
sys.exit(main())
"""


@pytest.mark.subprocess
@pytest.mark.timeout(600)
def test_two_fits_started_together_write_separate_runs(tmp_path):
    """Two `fit` processes with one config: two folders, each with one adapter and its own metrics.csv."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = [sys.executable, "-c", _SLOW_LISTING, "fit", "--config", MEDICAL, "--config", TINY,
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--data.init_args.sample_dir={tmp_path / 's'}",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            "--test_after_fit=false", "--trainer.enable_progress_bar=false"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=500) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    runs = sorted((tmp_path / "runs" / "medical").glob("version_*"))
    assert [r.name for r in runs] == ["version_0", "version_1"]
    for run in runs:
        assert (run / "adapter.safetensors").is_file() and json.loads((run / "adapter.json").read_text())
        assert sorted(p.name for p in (run / "checkpoints").iterdir() if "-v" in p.stem) == []
        rows = (run / "metrics.csv").read_text().splitlines()
        assert sum(1 for r in rows[1:] if r.split(",")[0]) >= 1
