"""The kit's own guard against pickled code in checkpoints, tested with the other guards taken away.

Two layers would refuse a malicious ``--ckpt_path`` even without the kit's guard: torch 2.14 loads with
``weights_only=True`` by default, and LightningCLI 2.6 first reads the checkpoint's hyper-parameters with
``weights_only=True``. Here ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns torch's default back to unpickling
everything (it leaves explicit ``weights_only=True`` calls alone) and LightningCLI's hyper-parameter read is
skipped: what still refuses the checkpoint is the kit passing ``weights_only=True`` to fit, validate, test
and predict. A control shows the payload does run under that setting when nothing guards the load.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vision_ft.cli import main

ROOT = Path(__file__).resolve().parents[1]
MEDICAL = str(ROOT / "domains" / "medical.yaml")
TINY = str(ROOT / "configs" / "backbones" / "vit_test_tiny.yaml")


class _Evil:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _evil_checkpoint(tmp: Path) -> tuple[Path, Path]:
    evil, marker = tmp / "evil.ckpt", tmp / "PWNED"
    torch.save({"state_dict": {}, "payload": _Evil(str(marker))}, evil)  # a torch zip, as Lightning writes
    return evil, marker


@pytest.fixture
def unsafe_torch_default(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


@pytest.fixture
def no_lightning_precheck(monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(LightningCLI, "_parse_ckpt_path", lambda self: None)


def test_control_the_payload_runs_when_nothing_guards_the_load(tmp_path, unsafe_torch_default):
    evil, marker = _evil_checkpoint(tmp_path)
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        torch.load(evil)  # torch's default, flipped back: unpickles the payload
    assert marker.exists()


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_ckpt_path_is_loaded_with_weights_only_by_the_kit(subcommand, tmp_path, unsafe_torch_default,
                                                          no_lightning_precheck, capsys):
    evil, marker = _evil_checkpoint(tmp_path)
    args = [subcommand, "--config", MEDICAL, "--config", TINY, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            f"--data.init_args.sample_dir={tmp_path / 'sample'}", f"--ckpt_path={evil}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    if subcommand == "fit":
        args += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"]
    else:
        args += [f"--trainer.limit_{'val' if subcommand == 'validate' else subcommand}_batches=1"]
    code = main(args)
    err = capsys.readouterr().err
    assert not marker.exists(), f"{subcommand} --ckpt_path unpickled code from the checkpoint"
    assert code == 2 and "refused to load" in err and "Traceback" not in err, err[-1500:]
