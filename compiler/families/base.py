"""The family registry itself, in a module that imports no family: each family module
registers its adapter here (:func:`register`) and :mod:`coformer.compiler.families` looks
them up, loading every family first. A family module never imports the package's lookups
(an import cycle); a teacher built by an adapter finds it again with :func:`registered`.
"""

from __future__ import annotations

from typing import Any, Callable

ADAPTERS: dict[str, Any] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: an instance of the adapter class is the family ``name``'s."""
    def wrap(cls: type) -> type:
        ADAPTERS[name] = cls()
        return cls

    return wrap


def registered(name: str):
    """The adapter registered as ``name`` (its module has been imported: the teacher asking was
    built by it); KeyError otherwise."""
    return ADAPTERS[name]
