"""vision_ft: a domain application kit for vision and multimodal fine-tuning."""

__version__ = "0.1.0"

from .errors import AdapterError, BackboneError, ConfigError, DataError, VisionFTError  # noqa: E402
from .export import load_adapter  # noqa: E402

__all__ = ["load_adapter", "VisionFTError", "ConfigError", "DataError", "BackboneError", "AdapterError"]
