"""vision_ft: a domain application kit for vision and multimodal fine-tuning."""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any  # noqa: E402

from .errors import AdapterError, BackboneError, ConfigError, DataError, VisionFTError  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    from .export import load_adapter

__all__ = ["load_adapter", "VisionFTError", "ConfigError", "DataError", "BackboneError", "AdapterError"]


def __getattr__(name: str) -> Any:
    # load_adapter needs torch, Lightning and the backbone libraries: imported on first use, so
    # `import vision_ft` (and the stdlib-only vision_ft.errors / vision_ft.io) stays cheap
    if name == "load_adapter":
        from .export import load_adapter

        globals()["load_adapter"] = load_adapter
        return load_adapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
