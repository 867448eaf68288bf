"""Model-family adapters, found through a registry.

An adapter reads a teacher's shape, scores importance, slices a spec into a
standalone sub-model, and knows the family's head and example input. Adding a
family is one file registering itself here, plus its tests.
"""

from __future__ import annotations

from typing import Any

from coformer.compiler.families.base import ADAPTERS, register  # noqa: F401  (register: this package's API)
from coformer.runtime.errors import CoFormerError


def _load_all() -> None:
    from coformer.compiler.families import bert, gpt2, swin, t5, vit  # noqa: F401  (each registers itself)


def adapter_for(model: Any):
    """The adapter whose family ``model`` belongs to; a clear error listing the supported ones."""
    _load_all()
    for adapter in ADAPTERS.values():
        if adapter.matches(model):
            return adapter
    hint = ""
    if any(getattr(a, "matches_hf", None) and a.matches_hf(model) for a in ADAPTERS.values()):
        hint = " as it is: wrap a HuggingFace model with coformer.compiler.hf.wrap_hf (or load it with load_hf)"
    raise CoFormerError(
        f"model type {type(model).__name__} is not supported{hint}; supported families: {sorted(ADAPTERS)}"
    )


def get_adapter(name: str):
    _load_all()

    if name not in ADAPTERS:
        raise CoFormerError(f"model family {name!r} is not supported; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[name]


def supported_architectures() -> list[str]:
    """Every HuggingFace architecture a language-family adapter takes."""
    _load_all()
    return sorted(a for ad in ADAPTERS.values() for a in getattr(ad, "architectures", ()))


def hf_adapter_for(hf: Any):
    """The language-family adapter for a HuggingFace model, or an error listing the supported architectures."""
    _load_all()
    for adapter in ADAPTERS.values():
        if getattr(adapter, "matches_hf", None) and adapter.matches_hf(hf):
            return adapter
    raise CoFormerError(f"HF architecture {type(hf).__name__} is not supported; "
                        f"supported: {supported_architectures()}")
