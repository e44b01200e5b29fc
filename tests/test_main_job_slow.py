"""The shipped main job as a user runs it (default settings). Slow: about 2 minutes on 2 cores."""

import json

import pytest

from test_cli import MEDICAL, _run_dir
from vision_ft.cli import main


@pytest.mark.slow
def test_medical_main_job_with_defaults_learns_the_sample(tmp_path):
    code = main(["fit", "--config", MEDICAL, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                 f"--data.init_args.sample_dir={tmp_path / 'sample'}", "--trainer.enable_progress_bar=false"])
    assert code == 0
    meta = json.loads((_run_dir(tmp_path) / "adapter.json").read_text())
    # 4 balanced classes: chance is 0.25; SSF on the random-init ViT-Ti reaches > 0.9 here
    assert meta["metrics"]["test/acc"] > 0.9


@pytest.mark.slow
def test_telecom_main_job_with_defaults_trains_and_scores(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = main(["fit", "--config", str(root / "domains" / "telecom.yaml"),
                 f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                 f"--data.init_args.sample_dir={tmp_path / 'sample'}", "--trainer.enable_progress_bar=false"])
    assert code == 0
    run = next((tmp_path / "runs").glob("*/version_*"))
    meta = json.loads((run / "adapter.json").read_text())
    assert meta["metrics"]["test/mcq_count"] == 48 and meta["metrics"]["test/mcq_unparsed"] == 0
    assert len((run / "mcq_predictions.jsonl").read_text().splitlines()) == 48
    rows = [r for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    losses = [float(r.split(",")[header.index("val/loss")]) for r in rows if r.split(",")[header.index("val/loss")]]
    assert losses[-1] < losses[0] - 0.2  # the replies' loss falls while training (random-init tiny model)
