"""Adapters on disk: save, load for inference, merge and export to the library's native form.

A run directory holds ``adapter.safetensors`` (only what the method adds plus the
task head, as safetensors) and ``adapter.json`` (task, method and its config,
backbone spec and weight fingerprint, class names, final metrics). That pair is
enough to rebuild the model: the frozen base comes from the backbone spec.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .errors import AdapterError
from .io import atomic_save_safetensors, atomic_write_text  # noqa: F401  (re-exported for tasks/, bench/)

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"
FORMAT_VERSION = 1


# --- save / load -----------------------------------------------------------------------
def import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise AdapterError(f"cannot import {path!r} named in {ADAPTER_META}") from None


def save_adapter(task: Any, run_dir: str | Path, metrics: dict[str, float] | None = None,
                 tensors: dict[str, Any] | None = None) -> Path:
    """Write ``adapter.safetensors`` + ``adapter.json`` for ``task`` into ``run_dir``.

    ``tensors`` (default ``task.adapter_tensors()``) lets a sharded run pass gathered ones.
    """
    run_dir = Path(run_dir)
    meta = task.adapter_metadata()
    meta.update(format_version=FORMAT_VERSION,
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                metrics=dict(metrics or {}))
    atomic_save_safetensors(task.adapter_tensors() if tensors is None else tensors, run_dir / ADAPTER_WEIGHTS,
                            metadata={"method": meta["method"], "format_version": str(FORMAT_VERSION)})
    atomic_write_text(run_dir / ADAPTER_META, json.dumps(meta, indent=2, default=str) + "\n")
    return run_dir


def update_metrics(run_dir: str | Path, metrics: dict[str, float]) -> None:
    path = Path(run_dir) / ADAPTER_META
    meta = json.loads(path.read_text())
    meta.setdefault("metrics", {}).update(metrics)
    atomic_write_text(path, json.dumps(meta, indent=2, default=str) + "\n")


def read_metadata(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    path = run_dir / ADAPTER_META
    if not path.is_file():
        raise AdapterError(f"{path} not found: is {str(run_dir)!r} a run directory written by `fit`?")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path} is not valid JSON ({e})") from None
    for key in ("task", "method", "method_spec", "backbone"):
        if key not in meta:
            raise AdapterError(f"{path} lacks the key {key!r}; it was not written by vision_ft")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterError(f"{path} has format_version {meta['format_version']}; upgrade vision_ft")
    return meta


def load_adapter(run_dir: str | Path, backbone: dict[str, Any] | None = None,
                 device: str | torch.device = "cpu") -> Any:
    """Rebuild the trained model of a run for inference (eval mode).

    Args:
        run_dir: folder with ``adapter.json`` and ``adapter.safetensors``.
        backbone: overrides for the backbone's init args, e.g.
            ``{"checkpoint": "/weights/vit.safetensors"}`` when the run used hub weights.
    """
    run_dir = Path(run_dir)
    meta = read_metadata(run_dir)
    weights = run_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{weights} not found")
    task_cls = import_class(meta["task"])
    task = task_cls.from_metadata(meta, backbone_overrides=backbone)
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # truncated or not safetensors
        raise AdapterError(f"{weights} cannot be read as safetensors ({e})") from None
    task.load_adapter_tensors(tensors)
    return task.eval().to(device)


# --- merge + native export -------------------------------------------------------------
def export_merged(run_dir: str | Path, out_dir: str | Path,
                  backbone: dict[str, Any] | None = None) -> Path:
    """Merge the run's method into the base weights and write the library's native model.

    For timm that is ``model.safetensors`` + ``config.json`` (timm's hub layout), loadable by
    ``timm.create_model("local-dir:OUT")`` or ``timm.create_model(arch, num_classes=K, **model_args)``
    followed by ``load_state_dict``.
    """
    meta = read_metadata(run_dir)
    overrides = {**import_class(meta["task"]).merge_overrides(meta), **(backbone or {})}
    task = load_adapter(run_dir, backbone=overrides or None)
    method = task.method
    if not method.mergeable:
        raise AdapterError(
            f"method {method.name!r} cannot be merged into the base weights; "
            "use the adapter as is (vision_ft.load_adapter) instead of `export --merge`"
        )
    method.merge(task.backbone)
    out = task.export_native(out_dir)
    meta.update(merged=True, exported_from=str(Path(run_dir).resolve()))
    atomic_write_text(Path(out) / "vision_ft.json", json.dumps(meta, indent=2, default=str) + "\n")
    return Path(out)


def export_peft(run_dir: str | Path, out_dir: str | Path, backbone: dict[str, Any] | None = None) -> Path:
    """Write the run's adapter in HF peft's format (``adapter_config.json`` + ``adapter_model.safetensors``),
    for ``peft.PeftModel.from_pretrained(base_model, out_dir)``; methods that are not peft tuners refuse."""
    task = load_adapter(run_dir, backbone=backbone)
    out = Path(task.export_peft(out_dir))
    meta = read_metadata(run_dir)
    meta.update(format="peft", exported_from=str(Path(run_dir).resolve()))
    atomic_write_text(out / "vision_ft.json", json.dumps(meta, indent=2, default=str) + "\n")
    return out
