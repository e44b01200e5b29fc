"""Bad input, in one place: each case gives a clear message naming what to fix and loses nothing.

Every case runs the real command line (``vision_ft.cli.main``) on inputs a user could
plausibly have, and checks the exit status, the message and that no traceback is shown.
"""

from __future__ import annotations

import errno
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision_ft.cli import main

ROOT = Path(__file__).resolve().parents[1]
MEDICAL = str(ROOT / "domains" / "medical.yaml")
TINY = str(ROOT / "configs" / "backbones" / "vit_test_tiny.yaml")
FAST = ("--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false")


def _base(tmp: Path) -> list[str]:
    return ["--config", MEDICAL, "--config", TINY, f"--trainer.logger.init_args.save_dir={tmp / 'runs'}",
            f"--data.init_args.sample_dir={tmp / 'sample'}"]


def _folder(root: Path, classes=("cat", "dog"), n: int = 4, mode: str = "RGB") -> Path:
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new(mode, (12, 12), (i * 40) if mode in ("L", "I;16") else (i * 40, 0, 0)).save(
                    root / split / c / f"{i}.png")
    return root


def _folder_args(root: Path, *extra: str) -> list[str]:
    return ["--data=vision_ft.data.ImageFolderData", f"--data.init_args.root={root}",
            "--data.init_args.image_size=32", "--data.init_args.batch_size=4", *extra]


def _trained_run(tmp: Path) -> Path:
    """A finished 1-epoch run (adapter + last.ckpt) to misuse in later cases."""
    assert main(["fit", *_base(tmp), "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                 "--trainer.limit_val_batches=1", "--test_after_fit=false", "--trainer.enable_progress_bar=false"]) == 0
    return sorted((tmp / "runs" / "medical").glob("version_*"))[-1]


# --- cases: (args builder, expected substrings in stderr) --------------------------------------
def case_malformed_yaml(tmp):
    bad = tmp / "bad.yaml"
    bad.write_text("trainer:\n  max_epochs: [1,\n  devices: 1\n")
    return ["fit", *_base(tmp), "--config", str(bad), *FAST], ["bad.yaml", "line 4", "not valid YAML"]


def case_unknown_key(tmp):
    return ["fit", *_base(tmp), "--trainer.max_epochz=1", *FAST], ["max_epochz"]


def case_wrong_type(tmp):
    return ["fit", *_base(tmp), "--model.init_args.lr=fast", *FAST], ["lr", "fast"]


def case_missing_data_dir(tmp):
    return ["fit", *_base(tmp), *_folder_args(tmp / "no_such_dir"), *FAST], ["data.init_args.root", "no_such_dir"]


def case_empty_class_folder(tmp):
    root = _folder(tmp / "d")
    (root / "train" / "bird").mkdir()
    return ["fit", *_base(tmp), *_folder_args(root), *FAST], ["empty class folder", "bird"]


def case_corrupt_image_fatal_by_config(tmp):
    root = _folder(tmp / "d")
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    return (["fit", *_base(tmp), *_folder_args(root, "--data.init_args.on_corrupt=error"), *FAST],
            ["broken.png", "data.init_args.on_corrupt"])


def case_labels_out_of_range(tmp):
    npz = tmp / "bad.npz"
    imgs = np.zeros((8, 28, 28), np.uint8)
    np.savez(npz, train_images=imgs, train_labels=np.array([[0], [1], [2], [3]] * 2),
             val_images=imgs[:4], val_labels=np.array([[0], [1], [9], [3]]),
             test_images=imgs[:4], test_labels=np.array([[0], [1], [2], [3]]))
    return (["fit", *_base(tmp), f"--data.init_args.path={npz}", "--data.init_args.class_names=[a,b,c,d]", *FAST],
            ["bad.npz", "val_labels", "outside [0, 4)"])


def case_checkpoint_for_another_backbone(tmp):
    run = _trained_run(tmp)
    small = str(ROOT / "configs" / "backbones" / "vit_test_small.yaml")
    return (["test", "--config", MEDICAL, "--config", small if Path(small).is_file() else TINY,
             "--model.init_args.backbone.init_args.name=vit_test_small", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
             f"--data.init_args.sample_dir={tmp / 'sample'}", f"--trainer.logger.init_args.save_dir={tmp / 't'}"],
            ["other base weights", "model.init_args.backbone"])


def case_checkpoint_of_another_method_version(tmp):
    run = _trained_run(tmp)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["vision_ft"]["method_version"] = 99
    torch.save(ckpt, tmp / "v99.ckpt")
    return (["test", *_base(tmp), f"--ckpt_path={tmp / 'v99.ckpt'}"], ["v99", "'ssf'"])


class _Evil:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def case_malicious_pickle_checkpoint(tmp):
    evil = tmp / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _Evil(str(tmp / "PWNED"))}, f)
    return ["test", *_base(tmp), f"--ckpt_path={evil}"], ["refused to load", "weights_only"]


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_a_clear_error(case, tmp_path, capsys):
    args, expected = CASES[case](tmp_path)
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as e:  # jsonargparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code not in (0, None), f"{case}: accepted"
    assert "Traceback" not in err, f"{case}: traceback shown\n{err[-1500:]}"
    for text in expected:
        assert text in err, f"{case}: {text!r} not in the message:\n{err[-1500:]}"
    assert not (tmp_path / "PWNED").exists(), "a checkpoint ran code while loading"


def test_mixed_image_modes_are_accepted(tmp_path):
    """Grayscale, RGBA and 16-bit PNGs mixed in one folder train like RGB ones."""
    root = _folder(tmp_path / "d")
    Image.new("L", (12, 12), 90).save(root / "train" / "cat" / "gray.png")
    Image.new("RGBA", (12, 12), (9, 9, 9, 100)).save(root / "train" / "dog" / "rgba.png")
    Image.fromarray(np.full((12, 12), 40000, np.uint16)).save(root / "train" / "dog" / "deep.png")
    assert main(["fit", *_base(tmp_path), *_folder_args(root), *FAST]) == 0


def test_disk_full_while_exporting_keeps_the_previous_files(tmp_path, monkeypatch, capsys):
    run = _trained_run(tmp_path)
    out = tmp_path / "exported"
    assert main(["export", str(run), "--merge", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)  # vision_ft.io imports it at call time
    capsys.readouterr()
    assert main(["export", str(run), "--merge", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "model.safetensors" in err and "unchanged" in err
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before, "a failed export changed or left files behind"
    assert json.loads((run / "adapter.json").read_text())["method"] == "ssf"
