"""Where a diffusers pipeline backbone (Stable Diffusion, Wan, CogVideoX) gets its parts: one rule for all.

In order: ``checkpoint`` (a local pipeline folder written by ``save_pretrained`` or ``export --merge``),
``name`` + ``pretrained: true`` (a hub id), a tiny random preset, or a family's own fallback (Stable
Diffusion's known architectures); anything else is an error naming the keys to set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import BackboneError, ConfigError, first_line

_CHECKPOINT, _PRETRAINED = "backbone.init_args.checkpoint", "backbone.init_args.pretrained"


def build_parts(backbone: Any, family: str, presets: Mapping[str, Any], load: Callable[[str, str], Any],
                tiny: Callable[[Any], Any], example: str, fallback: Callable[[], Any] | None = None,
                also: str = "") -> Any:
    """The parts of ``backbone`` (which has ``name``, ``pretrained``, ``checkpoint``; ``weights_source`` is set
    here): ``load(source, key)`` for a folder or hub id, ``tiny(preset)`` for a preset, ``fallback()`` (``None``:
    not applicable) before the error. ``example``: a hub id to name in the error; ``also``: what else the
    fallback accepts, for the error."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise BackboneError(f"{family} needs diffusers: pip install 'vision_ft[diffusion]'") from None
    if backbone.checkpoint:
        backbone.weights_source = f"pipeline folder {backbone.checkpoint}"
        return load(str(Path(backbone.checkpoint).expanduser()), _CHECKPOINT)
    if backbone.pretrained:
        if backbone.name in presets:
            raise ConfigError(f"{backbone.name!r} is a random tiny preset with no pretrained weights "
                              "(backbone.init_args.pretrained=false)")
        backbone.weights_source = f"pretrained {backbone.name} (hub)"
        return load(backbone.name, _PRETRAINED)
    if backbone.name in presets:
        backbone.weights_source = (f"randomly initialised tiny preset (no pretrained weights offline; set "
                                   f"{_CHECKPOINT}=<{family} pipeline folder> or {_PRETRAINED}=true with "
                                   "name=<hub id> and hub access)")
        return tiny(presets[backbone.name])
    if fallback is not None:
        parts = fallback()
        if parts is not None:
            return parts
    raise BackboneError(f"backbone.init_args.name={backbone.name!r} is not a tiny preset ({list(presets)}){also}; set "
                        f"{_CHECKPOINT}=<{family} pipeline folder> or {_PRETRAINED}=true with a hub id such as "
                        f"{example!r} (hub access)")


def check_pipeline_folder(source: str, key: str, pipeline: str) -> None:
    """A local ``checkpoint`` must be a diffusers pipeline folder (its ``model_index.json``)."""
    if key == _CHECKPOINT and not (Path(source) / "model_index.json").is_file():
        raise BackboneError(f"{key}={source!r} is not a diffusers pipeline folder (no model_index.json); "
                            f"write one with {pipeline}.save_pretrained or `export --merge`")


def load_error(family: str, source: str, error: Exception) -> BackboneError:
    """One clear error for a pipeline that cannot be loaded (offline, a missing part, a wrong id)."""
    return BackboneError(f"cannot load {family} from {source!r} ({first_line(error, root_cause=True)}). Offline, "
                         f"set {_CHECKPOINT}=<local pipeline folder>; or keep {_PRETRAINED}=true with hub access")


def frame_size(height: int, width: int, multiple: int, spatial_factor: int) -> tuple[int, int]:
    """A video backbone's frame size, each side a multiple of the VAE's spatial factor x the patch size."""
    for key, value in (("height", int(height)), ("width", int(width))):
        if value % multiple:
            raise ConfigError(f"backbone.init_args.{key}={value} must be a multiple of {multiple} (the VAE's "
                              f"spatial factor {spatial_factor} x the transformer's patch size)")
    return int(height), int(width)
