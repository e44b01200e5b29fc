"""``python -m vision_ft predict RUN --images PATH``: class probabilities for a folder or CSV of images.

    python -m vision_ft predict runs/medical/version_0 --images scans/            # -> RUN/predictions.csv
    python -m vision_ft predict --ckpt_path runs/medical/version_0/checkpoints/last.ckpt --images list.csv
    python -m vision_ft predict RUN --images a.png b.png --out preds.csv

The model is rebuilt from the run's adapter (``adapter.json`` + ``adapter.safetensors``) or from a
checkpoint (read with ``torch.load(weights_only=True)``), and images pass through the run's recorded
preprocessing (``input_transform``) exactly as :meth:`~vision_ft.tasks.ImageClassificationTask.predict_images`
does. ``predictions.csv`` has one row per image: ``path``, ``label`` (the top class, or the positive
labels joined by ``;`` for a multi-label run) and one ``prob_<class>`` column per class.

Without ``--images`` the ``predict`` subcommand is Lightning's (a config, ``--ckpt_path``, the
datamodule's test split).
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path
from typing import Any

from .errors import AdapterError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
PREDICTIONS = "predictions.csv"


def wants_kit_predict(argv: list[str]) -> bool:
    """``predict`` with ``--images``: this command; otherwise LightningCLI's ``predict``."""
    return bool(argv) and argv[0] == "predict" and any(a == "--images" or a.startswith("--images=") for a in argv)


def cmd_predict(argv: list[str]) -> int:
    """Classify a folder, CSV or list of images with a trained run and write predictions.csv."""
    p = argparse.ArgumentParser(prog="vision_ft predict", description=cmd_predict.__doc__)
    p.add_argument("run", nargs="?", default=None, help="run directory (adapter.json + adapter.safetensors)")
    p.add_argument("--ckpt_path", default=None, help="a checkpoint written by fit (instead of a run directory)")
    p.add_argument("--images", nargs="+", required=True,
                   help="a folder (searched recursively), a CSV with a 'path' column, or image files")
    p.add_argument("--out", default=None, help=f"output CSV (default: RUN/{PREDICTIONS}, or beside the checkpoint's run)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--checkpoint", default=None, help="local base weights, when the run used hub weights")
    a = p.parse_args(argv)
    if (a.run is None) == (a.ckpt_path is None):
        p.error("give a run directory or --ckpt_path (one of them)")
    overrides = {"checkpoint": a.checkpoint} if a.checkpoint else None
    if a.run is not None:
        from .export import load_adapter

        task, home = load_adapter(a.run, backbone=overrides), Path(a.run)
    else:
        task, home = load_checkpoint_task(a.ckpt_path, backbone=overrides)
    if not hasattr(task, "predict_images"):
        raise AdapterError(f"{type(task).__name__} runs do not classify images; `predict --images` is for "
                           "image classification runs")
    paths = collect_images(a.images, extra_suffixes=tuple(getattr(task, "input_readers", dict)()))
    rows = task.predict_images(paths, batch_size=a.batch_size)
    out = Path(a.out) if a.out else home / PREDICTIONS
    write_predictions(out, paths, rows, task.class_names)
    print(f"{len(rows)} predictions written to {out}")
    return 0


def collect_images(items: list[str], extra_suffixes: tuple[str, ...] = ()) -> list[Path]:
    """Image files from folders (recursively, sorted; the usual image suffixes plus ``extra_suffixes``, those
    the run's data decodes itself such as FITS), CSV manifests (``path`` column, relative to the CSV's
    folder) and file names, in the order given."""
    out: list[Path] = []
    suffixes = IMAGE_SUFFIXES + tuple(s.lower() for s in extra_suffixes)
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
            if not found:
                raise DataError(f"--images {item}: no image files ({', '.join(suffixes)}) in the folder")
            out += found
        elif path.suffix.lower() == ".csv":
            out += _csv_paths(path)
        elif path.is_file():
            out.append(path)
        else:
            raise DataError(f"--images {item}: no such file or folder")
    return out


def _csv_paths(path: Path) -> list[Path]:
    if not path.is_file():
        raise DataError(f"--images {path}: no such file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if "path" not in (reader.fieldnames or []):
            raise DataError(f"--images {path}: the CSV needs a 'path' column (found {reader.fieldnames})")
        paths = [(path.parent / row["path"]).resolve() if not Path(row["path"]).is_absolute() else Path(row["path"])
                 for row in reader if row.get("path")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"--images {path}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}")
    return paths


def write_predictions(out: Path, paths: list[Path], rows: list[dict[str, Any]], class_names: list[str]) -> Path:
    """``path,label,prob_<class>...`` rows, written atomically."""
    from .io import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label", *[f"prob_{name}" for name in class_names]])
    for path, row in zip(paths, rows):
        label = ";".join(row["label"]) if isinstance(row["label"], list) else row["label"]
        writer.writerow([str(path), label, *[f"{row['probs'][name]:.6f}" for name in class_names]])
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, buffer.getvalue())
    return out


def load_checkpoint_task(ckpt_path: str | Path, backbone: dict[str, Any] | None = None) -> tuple[Any, Path]:
    """The task a ``fit`` checkpoint holds, in eval mode, and the folder predictions go to (its run).

    The checkpoint is read with ``weights_only=True``; the task, its arguments and the backbone come from
    its ``vision_ft`` section (or, for checkpoints older than that, the run's ``adapter.json``)."""
    import torch

    from .export import import_class, read_metadata

    path = Path(ckpt_path)
    if not path.is_file():
        raise AdapterError(f"--ckpt_path {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code, a truncated file
        raise AdapterError(f"--ckpt_path {path} cannot be read as a checkpoint with weights_only=True "
                           f"({str(e).splitlines()[0][:200]}); vision_ft never unpickles arbitrary code") from None
    info = ckpt.get("vision_ft") if isinstance(ckpt, dict) else None
    if info is None:
        raise AdapterError(f"--ckpt_path {path} was not written by vision_ft (no 'vision_ft' section)")
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    meta = dict(info)
    if "task" not in meta:  # written before checkpoints named their task
        meta = {**read_metadata(run), **info}
    task = import_class(meta["task"]).from_metadata(meta, backbone_overrides=backbone)
    task.on_load_checkpoint(ckpt)
    task.load_state_dict(ckpt["state_dict"], strict=False)
    return task.eval(), run
