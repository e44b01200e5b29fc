"""Registry of PEFT methods by short name."""

from __future__ import annotations

import difflib
import importlib
from typing import Any, TypeVar

from ..errors import ConfigError
from .base import Method

_REGISTRY: dict[str, type[Method]] = {}
M = TypeVar("M", bound=type[Method])


def register(cls: M) -> M:
    """Class decorator: make ``cls`` available by its ``name``; prefixes must be unique."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty `name`")
    for other in _REGISTRY.values():
        if other is not cls and other.name != cls.name and cls.prefix and other.prefix == cls.prefix:
            raise TypeError(f"prefix {cls.prefix!r} of {cls.__name__} is already used by {other.__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered() -> dict[str, type[Method]]:
    """Registered methods, sorted by name."""
    return dict(sorted(_REGISTRY.items()))


def get_method_class(name: str) -> type[Method]:
    key = name.strip().lower().replace("-", "_")
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"unknown method {name!r} (model.init_args.method). Registered methods: "
        f"{', '.join(sorted(_REGISTRY))}.{hint}"
    )


def build_method(spec: str | Method | dict[str, Any]) -> Method:
    """A method instance from a short name, a dotted class path, a ``class_path`` dict or an instance."""
    if isinstance(spec, Method):
        return spec
    if isinstance(spec, dict):
        cls = _class_from_path(spec.get("class_path", ""))
        return cls(**dict(spec.get("init_args") or {}))
    if isinstance(spec, str):
        if "." in spec:
            return _class_from_path(spec)()
        return get_method_class(spec)()
    raise ConfigError(f"model.init_args.method must be a method name or class_path, got {type(spec).__name__}")


def _class_from_path(path: str) -> type[Method]:
    if "." not in path:
        return get_method_class(path)
    module, _, cls_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError):
        for cls in _REGISTRY.values():
            if cls.__name__ == cls_name:
                return cls
        raise ConfigError(f"cannot import method class {path!r} (model.init_args.method)") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"{path!r} is not a vision_ft Method")
    return cls
