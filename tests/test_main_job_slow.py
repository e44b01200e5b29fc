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
