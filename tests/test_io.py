"""Atomic writes (vision_ft.io): normal permissions, no partial files, round trips."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from vision_ft import io
from vision_ft.errors import WriteError


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_written_files_are_0644_under_umask_022(tmp_path, umask_022):
    import numpy as np
    import torch

    paths = [
        io.atomic_write_text(tmp_path / "a.txt", "hello\n"),
        io.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01"),
        io.atomic_write_json(tmp_path / "sub" / "c.json", {"x": 1}),
        io.atomic_save_safetensors({"w": torch.ones(2)}, tmp_path / "d.safetensors"),
        io.atomic_save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "e.png"),
    ]
    for path in paths:
        assert _mode(path) == 0o644, path
    assert _mode(tmp_path / "sub") == 0o755


def test_permissions_follow_the_umask_like_open(tmp_path):
    old = os.umask(0o027)
    try:
        path = io.atomic_write_text(tmp_path / "a.txt", "x")
        with io.atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "f.txt").write_text("x")
    finally:
        os.umask(old)
    assert _mode(path) == 0o640
    assert _mode(tmp_path / "folder") == 0o750


def test_overwrite_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    io.atomic_write_text(path, "x" * 1000)
    io.atomic_write_text(path, "short")
    assert path.read_text() == "short"
    assert _leftovers(tmp_path) == []


def test_error_while_writing_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = io.atomic_write_text(tmp_path / "a.json", '{"old": true}\n')

    def fail(f):
        f.write(b'{"new": ')  # half written, then the writer dies
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        io.atomic_write(path, fail)
    assert json.loads(path.read_text()) == {"old": True}
    assert _leftovers(tmp_path) == []


def test_os_error_becomes_write_error_naming_the_file(tmp_path):
    path = tmp_path / "a.bin"

    def fail(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match="a.bin.*No space left"):
        io.atomic_write(path, fail)
    assert not path.exists()
    assert _leftovers(tmp_path) == []


def test_unserialisable_json_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        io.atomic_write_json(tmp_path / "a.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []
    assert json.loads(io.atomic_write_json(tmp_path / "b.json", {"x": object()}, default=str).read_text())


def test_json_round_trip(tmp_path):
    obj = {"name": "ünïcode", "values": [1, 2.5, None], "nested": {"ok": True}}
    path = io.atomic_write_json(tmp_path / "a.json", obj, indent=1)
    assert json.loads(path.read_text(encoding="utf-8")) == obj
    assert path.read_text().endswith("}\n")


def test_safetensors_round_trip_with_metadata(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = {"a": torch.arange(6.0).reshape(2, 3).t(), "b": torch.ones(3, dtype=torch.int64)}  # a: not contiguous
    path = io.atomic_save_safetensors(tensors, tmp_path / "w.safetensors", metadata={"method": "ssf"})
    loaded = load_file(str(path))
    assert set(loaded) == {"a", "b"}
    for k in tensors:
        assert torch.equal(loaded[k], tensors[k])
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"method": "ssf"}
    assert _leftovers(tmp_path) == []


def test_png_from_array_pil_and_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = io.atomic_save_png(pixels, tmp_path / "a.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and np.array_equal(np.asarray(im), pixels)
    io.atomic_save_png(Image.fromarray(pixels), tmp_path / "b.png")
    fig = plt.figure(figsize=(1, 1))
    try:
        io.atomic_save_png(fig, tmp_path / "c.png", dpi=20)
    finally:
        plt.close(fig)
    for name in ("b.png", "c.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_publishes_only_a_complete_folder(tmp_path, umask_022):
    target = tmp_path / "sample"
    with pytest.raises(RuntimeError):
        with io.atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("x")
            assert not target.exists()
            raise RuntimeError("generator died")
    assert list(tmp_path.iterdir()) == []
    with io.atomic_dir(target) as tmp:
        (tmp / "part").mkdir()
        (tmp / "part" / "f.txt").write_text("x")
    assert (target / "part" / "f.txt").read_text() == "x"
    assert _mode(target) == 0o755 and _mode(target / "part" / "f.txt") == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]


def test_atomic_dir_keeps_a_complete_target_written_meanwhile(tmp_path):
    target = tmp_path / "sample"
    with io.atomic_dir(target, complete=lambda d: (d / "done").is_file()) as tmp:
        (tmp / "mine").write_text("late")
        target.mkdir()  # another process finished first
        (target / "done").write_text("first")
    assert sorted(p.name for p in target.iterdir()) == ["done"]
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]


def test_atomic_dir_replaces_or_refuses_an_incomplete_target(tmp_path):
    target = tmp_path / "sample"
    target.mkdir()
    (target / "old").write_text("stale")
    with pytest.raises(OSError):
        with io.atomic_dir(target, complete=lambda d: (d / "done").is_file()) as tmp:
            (tmp / "done").write_text("new")
    assert (target / "old").is_file()
    with io.atomic_dir(target, complete=lambda d: (d / "done").is_file(), replace_incomplete=True) as tmp:
        (tmp / "done").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["done"]
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]


@pytest.mark.subprocess
@pytest.mark.timeout(300)
def test_concurrent_writers_of_one_sample_agree(tmp_path):
    """Two processes writing the same generated file at once: both succeed, the result is whole."""
    import subprocess
    import sys

    code = ("import sys; from domains.medical.sample import write_sample; "
            "write_sample(sys.argv[1], n_train=40, n_val=8, n_test=8, size=16)")
    out = tmp_path / "sample.npz"
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=root) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    import numpy as np

    with np.load(out) as data:
        assert data["train_images"].shape[0] == 40
    assert _leftovers(tmp_path) == []


def test_adapter_files_are_not_private(tmp_path, umask_022):
    from conftest import make_task

    from vision_ft.export import ADAPTER_META, ADAPTER_WEIGHTS, save_adapter

    save_adapter(make_task("ssf"), tmp_path / "run")
    for name in (ADAPTER_WEIGHTS, ADAPTER_META):
        assert _mode(tmp_path / "run" / name) == 0o644, name


@pytest.mark.subprocess
@pytest.mark.timeout(300)
def test_importing_the_package_io_and_errors_stays_light():
    """``import vision_ft`` and its stdlib-only modules must not pull torch & co. (a subprocess:
    this test session has them all loaded already)."""
    import subprocess
    import sys

    heavy = ["torch", "lightning", "timm", "transformers", "open_clip", "numpy", "PIL", "safetensors"]
    code = ("import sys, json; import vision_ft, vision_ft.io, vision_ft.errors; "
            f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_load_adapter_is_still_a_package_attribute():
    import vision_ft
    from vision_ft import load_adapter
    from vision_ft.export import load_adapter as from_export

    assert load_adapter is from_export and vision_ft.load_adapter is from_export
    assert "load_adapter" in vision_ft.__all__
    with pytest.raises(AttributeError):
        vision_ft.no_such_name  # noqa: B018
