"""How a bundle is served, one plug-in per strategy (issue 40).

A bundle's manifest names its ``strategy``; the runtime looks that name up here and nothing
else in it branches on the name. A strategy is a subclass of
:class:`coformer.runtime.strategies.base.Strategy`: what the central node does in one request's
rounds (:meth:`~base.Strategy.run`), what its workers compute per message
(:meth:`~base.Strategy.worker_compute`), and a few facts the node and the manifest read (does
it batch requests, take an ``input_index``, fuse pooled features, keep state on the workers).

Adding a strategy: its module here, a line in :data:`STRATEGIES`, its compiler side
(:mod:`coformer.compiler.strategies`), and its tests.

The table names each strategy's module instead of importing it: the manifest reads the names
and a strategy's facts, and a strategy module may import what the node needs (the protocol,
PRISM's sessions) without that import reaching back into the manifest.
"""

from __future__ import annotations

import importlib

from coformer.runtime.errors import CoFormerError

# name -> "module:Class"
STRATEGIES = {
    "coformer": "coformer.runtime.strategies.coformer:CoFormer",
    "prism": "coformer.runtime.strategies.prism:Prism",
    "teacher": "coformer.runtime.strategies.baselines:Teacher",
    "pipeline": "coformer.runtime.strategies.baselines:Pipeline",
    "tensor_parallel": "coformer.runtime.strategies.baselines:TensorParallel",
}


def strategy_class(name: str):
    """The :class:`~coformer.runtime.strategies.base.Strategy` subclass serving strategy ``name``."""
    return lookup(STRATEGIES, name)


def lookup(table, name: str):
    """What ``table`` (strategy name -> ``"module:attribute"``) lists for strategy ``name``,
    imported; a name it does not list is refused with the ones it does. The compiler's table of
    builders (:mod:`coformer.compiler.strategies`) is read the same way."""
    where = table.get(name)
    if where is None:
        raise CoFormerError(f"strategy {name!r} is not one of {tuple(table)}")
    module, attribute = where.split(":")
    return getattr(importlib.import_module(module), attribute)
