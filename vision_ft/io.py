"""Atomic writes for every file the kit produces (adapters, exports, split files, samples, plots).

A reader (another rank, a concurrent run, the next run after a crash) never sees half a file:
the bytes go to a temporary file in the target's own folder, are flushed to disk (``fsync``)
and then renamed over the target with ``os.replace``, which is atomic within one filesystem.
On any error the temporary file is removed and the previous target (if any) is unchanged.

Permissions are those of a plain ``open(path, "w")``: ``0o666`` minus the umask (``0o644``
under the usual ``022``). The temporary file is created with ``os.open(..., 0o666)`` so the
kernel applies the umask; ``tempfile.mkstemp`` would make it ``0o600`` for good. Folders
published with :func:`atomic_dir` get ``0o755`` minus the umask.

Stdlib only at import time: torch, numpy, PIL and safetensors are imported inside the
functions that need them, so ``import vision_ft.io`` stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator, Mapping

from .errors import WriteError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "atomic_dir",
    "atomic_save_png",
    "atomic_save_safetensors",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "default_mode",
    "publish_files",
]

FILE_MODE = 0o666  # minus the umask, as open() does
DIR_MODE = 0o755  # minus the umask


# --- files ---------------------------------------------------------------------------------------
def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a binary file that becomes ``path`` only once it is complete and on disk."""
    return _publish(Path(path), lambda tmp, fd: _write_fd(fd, write))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2, default: Callable | None = None,
                      sort_keys: bool = False) -> Path:
    """``json.dumps(obj, ...)`` plus a final newline."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=default, sort_keys=sort_keys) + "\n")


def atomic_save_safetensors(tensors: Mapping[str, "torch.Tensor"], path: str | Path,
                            metadata: dict[str, str] | None = None) -> Path:
    """Tensors (detached, made contiguous, moved to CPU) as a safetensors file."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def save(tmp: Path, fd: int) -> None:
        os.close(fd)
        save_file(state, str(tmp), metadata=metadata)  # safetensors replaces tmp by its own file, mode 0o600
        os.chmod(tmp, default_mode())
        _fsync_path(tmp)

    return _publish(Path(path), save)


def atomic_save_png(image: Any, path: str | Path, **kwargs: Any) -> Path:
    """A matplotlib figure (``savefig``), a PIL image or an ``(H, W[, C])`` uint8 array as PNG.

    ``kwargs`` go to ``Figure.savefig`` (e.g. ``dpi``) or ``PIL.Image.save``. A figure is not closed.
    """
    if hasattr(image, "savefig"):
        def write(f: IO[bytes]) -> None:
            image.savefig(f, format="png", **kwargs)
    else:
        from PIL import Image

        if not isinstance(image, Image.Image):
            import numpy as np

            image = Image.fromarray(np.asarray(image))

        def write(f: IO[bytes]) -> None:
            image.save(f, format="PNG", **kwargs)
    return atomic_write(path, write)


# --- folders -------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_dir(target: str | Path, *, complete: Callable[[Path], bool] | None = None,
               replace_incomplete: bool = False) -> Iterator[Path]:
    """Build a folder in a temporary folder beside ``target``, then publish it with one rename.

    Fill the yielded folder inside the ``with`` block. On a clean exit it is renamed to
    ``target`` (atomic while ``target`` does not exist or is empty); on an exception it is
    removed and ``target`` is untouched. If ``target`` is already there when publishing (a
    concurrent writer finished first, or an old copy): when ``complete(target)`` holds the new
    copy is dropped and ``target`` kept; otherwise ``replace_incomplete`` removes the old one and
    publishes, or the ``OSError`` propagates. Files are not fsynced one by one: use this for data
    that can be regenerated (samples), :func:`atomic_write` for results.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp(target, lambda p: os.mkdir(p, DIR_MODE))
    try:
        yield tmp
        try:
            os.replace(tmp, target)
        except OSError:
            if complete is not None and complete(target):
                return
            if not (replace_incomplete and target.exists()):
                raise
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_files(src_dir: str | Path, dst_dir: str | Path) -> list[Path]:
    """Move every entry of ``src_dir`` into ``dst_dir`` (one ``os.replace`` each, so each file appears
    whole), files given :func:`default_mode` first: libraries that write through their own temporary
    files (safetensors, hence ``save_pretrained``) leave them ``0o600``."""
    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    moved = []
    for entry in sorted(Path(src_dir).iterdir()):
        if entry.is_file():
            os.chmod(entry, default_mode())
        os.replace(entry, dst_dir / entry.name)
        moved.append(dst_dir / entry.name)
    return moved


def default_mode(folder: bool = False) -> int:
    """The mode ``open()`` (``0o666``) or a shared folder (``0o755``) gets under the process umask."""
    return (DIR_MODE if folder else FILE_MODE) & ~_umask()


# --- internals -----------------------------------------------------------------------------------
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


def _make_temp(target: Path, create: Callable[[Path], Any]) -> Path:
    """A new hidden name beside ``target`` (``.NAME.<random>.tmp``), created by ``create``."""
    stem = target.name[:200]  # leave room for the suffix within NAME_MAX
    for _ in range(100):
        tmp = target.with_name(f".{stem}.{secrets.token_hex(4)}.tmp")
        try:
            create(tmp)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


def _publish(path: Path, fill: Callable[[Path, int], None]) -> Path:
    """Create a temporary file beside ``path``, ``fill(tmp, fd)`` it (fill owns ``fd``), rename it."""
    fds: list[int] = []
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_temp(path, lambda p: fds.append(os.open(p, _TEMP_FLAGS, FILE_MODE)))
        fill(tmp, fds[0])
        os.replace(tmp, path)
    except WriteError:
        _discard(tmp)
        raise
    except OSError as e:
        _discard(tmp)
        raise _write_error(path, e) from e
    except BaseException:
        _discard(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _write_fd(fd: int, write: Callable[[IO[bytes]], Any]) -> None:
    with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only be read by setting it, racing other threads)
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; best effort (not possible on every OS / filesystem)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _discard(tmp: Path | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _write_error(path: Path, e: OSError) -> WriteError:
    return WriteError(e.errno, f"could not write {path}: {e.strerror or e}; the previous {path.name} "
                               "(if any) is unchanged and no partial file was left")
