"""The medical task learns its sample, at a size the default suite affords (the full-size run is slow,
tests/test_main_job_slow.py)."""

import json

from test_cli import MEDICAL, TINY, _run_dir
from vision_ft.cli import main


def test_medical_task_beats_chance_by_a_margin_in_seconds(tmp_path):
    code = main(["fit", "--config", MEDICAL, "--config", TINY, "--trainer.max_epochs=3", "--data.init_args.batch_size=32",
                 f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                 f"--data.init_args.sample_dir={tmp_path / 'sample'}", "--trainer.enable_progress_bar=false",
                 "--trainer.enable_model_summary=false"])
    assert code == 0
    metrics = json.loads((_run_dir(tmp_path) / "adapter.json").read_text())["metrics"]
    # 4 balanced classes: chance is 0.25. SSF on the random-init 2-block ViT at 32 px, 3 epochs: 0.59 here
    assert metrics["test/acc"] > 0.25 + 0.15
    assert metrics["test/auroc"] > 0.5 + 0.15
