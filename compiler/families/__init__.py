"""Model-family adapters, found through a registry.

An adapter reads a teacher's shape, scores importance, slices a spec into a
standalone sub-model, and knows the family's head and example input. Adding a
family is one file registering itself here, plus its tests.
"""

from __future__ import annotations

from typing import Any, Callable

from coformer.runtime.errors import CoFormerError

_REGISTRY: dict[str, Any] = {}


def register(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        _REGISTRY[name] = cls()
        return cls

    return wrap


def adapter_for(model: Any):
    """The adapter whose family ``model`` belongs to; a clear error listing the supported ones."""
    from coformer.compiler.families import vit  # noqa: F401  (registers itself)

    for adapter in _REGISTRY.values():
        if adapter.matches(model):
            return adapter
    raise CoFormerError(
        f"model type {type(model).__name__} is not supported; supported families: {sorted(_REGISTRY)}"
    )


def get_adapter(name: str):
    from coformer.compiler.families import vit  # noqa: F401

    if name not in _REGISTRY:
        raise CoFormerError(f"model family {name!r} is not supported; supported: {sorted(_REGISTRY)}")
    return _REGISTRY[name]
