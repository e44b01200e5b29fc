"""The starter pack runs end to end on its embedded sample and learns it."""

import json
from pathlib import Path

from vision_ft.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "domains" / "starter.yaml"


def test_starter_pack_fits_offline_and_beats_chance(tmp_path):
    code = main(["fit", "--config", str(CONFIG), "--trainer.max_epochs=3", "--trainer.enable_progress_bar=false",
                 f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                 f"--data.init_args.sample_dir={tmp_path / 'sample'}"])
    assert code == 0
    run = sorted((tmp_path / "runs" / "starter").glob("version_*"))[-1]
    metrics = json.loads((run / "adapter.json").read_text())["metrics"]
    assert metrics["test/acc"] > 0.5  # two balanced classes: chance is 0.5


def test_starter_pack_imports():
    import domains.starter as pack

    assert Path(pack.CONFIG).is_file()
    assert len(pack.CLASS_NAMES) >= 2
