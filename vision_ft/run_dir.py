"""Reserve a run's directory atomically before anything is written into it.

Lightning's file loggers pick ``<save_dir>/<name>/version_<N>`` by listing the folder and taking the
next number, and create it later: two runs started at the same moment with the same config (a sweep,
a job array, two terminals) pick the same ``N`` and write into one folder. Here the first free
``version_<N>`` is created with ``os.mkdir`` (which fails if the folder exists, atomically, on every
local and network file system that honours POSIX ``mkdir``), retrying with the next number on a
collision, and the logger is told that version. Only the process that will write the run (global
rank 0) reserves; the other ranks of a multi-process run learn rank 0's folder from Lightning
(``trainer.log_dir`` is broadcast).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: logger classes whose ``save_dir/name/version_<N>`` layout this reserves
FILE_LOGGERS = ("CSVLogger", "TensorBoardLogger")
_VERSION = re.compile(r"^version_(\d+)$")
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK")


def is_rank_zero_process() -> bool:
    """Whether this process is (or will launch) global rank 0, from the launchers' environment variables."""
    for key in _RANK_VARIABLES:
        value = os.environ.get(key)
        if value not in (None, "", "0"):
            return False
    return True


def reserve_version(root: str | Path, attempts: int = 1000) -> int:
    """Create ``root/version_<N>`` for the smallest free ``N`` above the existing ones; return ``N``.

    ``os.mkdir`` either creates the folder or fails because another process did: the folder this
    returns belongs to this process alone.
    """
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run folder {root} ({e.strerror}): set "
                          "trainer.logger.init_args.save_dir to a writable folder") from None
    taken = [int(m.group(1)) for p in root.iterdir() if (m := _VERSION.match(p.name))]
    version = max(taken) + 1 if taken else 0
    for _ in range(attempts):
        try:
            os.mkdir(root / f"version_{version}")
            return version
        except FileExistsError:
            version += 1
    raise ConfigError(f"no free version_<N> folder under {root} after {attempts} attempts")


def reserve_logger_dirs(trainer_config: Any) -> list[Path]:
    """For each CSV / TensorBoard logger in a LightningCLI trainer config without an explicit
    ``version``, reserve its next ``version_<N>`` folder and set ``version: N``; returns the folders."""
    if not is_rank_zero_process() or _get(trainer_config, "fast_dev_run"):
        return []  # other ranks use rank 0's folder; fast_dev_run replaces the loggers (nothing written)
    loggers = _get(trainer_config, "logger")
    if loggers is None or isinstance(loggers, bool):
        return []
    reserved = []
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        class_path = str(_get(logger, "class_path") or "")
        args = _get(logger, "init_args")
        if class_path.rsplit(".", 1)[-1] not in FILE_LOGGERS or args is None:
            continue
        if _get(args, "version") is not None or _get(args, "save_dir") is None:
            continue
        name = _get(args, "name")
        root = Path(str(_get(args, "save_dir"))) / (str(name) if name else "")
        version = reserve_version(root)
        _set(args, "version", version)
        reserved.append(root / f"version_{version}")
    return reserved


def _get(obj: Any, key: str) -> Any:
    """``obj[key]`` for a dict or a jsonargparse Namespace (``None`` when absent)."""
    if obj is None or not hasattr(obj, "get"):
        return None
    return obj.get(key)


def _set(obj: Any, key: str, value: Any) -> None:
    obj[key] = value
