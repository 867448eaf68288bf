"""The interface every serving strategy implements (see :mod:`coformer.runtime.strategies`).

The central node (:class:`coformer.runtime.central.CentralNode`) owns the sockets, the queue,
the deadlines and the bookkeeping; a strategy owns what a request's rounds are. It reaches the
workers through two of the node's methods:

* ``node.exchange(requests, batch, acct, own=None, partial=False)``: one round. Each worker in
  ``requests`` gets ``(model name or None, tensor or None, extra header fields)``; ``own()`` runs
  on this device meanwhile; returns ``(own()'s result, {worker: its output})``. With ``partial``
  a worker that is gone or late is left out instead of failing the request.
* ``node.run_own(model name, x, acct, run=None)``: one of this device's models, held to its
  compute share (``run(engine)`` in place of a plain inference where the model needs more).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Optional

import numpy as np

from coformer.runtime.schema import BASELINE_SCHEMA_VERSION
from coformer.runtime.text import model_feeds


class Strategy:
    """One strategy's serving. Subclasses set the facts and implement :meth:`run`."""

    name: ClassVar[str] = ""
    # the least schema version its bundles carry (older runtimes must refuse them)
    schema_version: ClassVar[int] = BASELINE_SCHEMA_VERSION
    # queued requests may be stacked on the batch axis and served in one round
    batches: ClassVar[bool] = False
    # a request may send an input_index (the devices hold the inputs) in place of its tensor
    takes_index: ClassVar[bool] = False
    # workers send pooled features that an aggregator fuses: the manifest's feature dtype on the
    # wire, a recorded feature range to check them against, fallback aggregators when some are
    # missing, and encoded image files forwarded as they came
    fuses: ClassVar[bool] = False

    def __init__(self, node) -> None:
        self.node = node

    def open(self) -> None:
        """Open what the strategy needs beyond the device's own models (called by the node's ``open``)."""

    def can_degrade(self, missing) -> bool:
        """Whether an answer can still be given without the workers ``missing``."""
        return False

    def run(self, x: np.ndarray, index, acct) -> np.ndarray:
        """The answer to the admitted batch ``x`` (``index``: its input_index, where the devices hold
        the inputs); ``acct`` collects what it cost (the node's ``_Account``)."""
        raise NotImplementedError

    @classmethod
    def worker_compute(cls, manifest, models):
        """What a worker runs per message: ``compute(engine, model name, header, x) -> output``.
        The default is one inference; a strategy whose workers keep state overrides it."""
        preprocessing: Mapping[str, Any] = manifest.input.preprocessing

        def compute(engine, name: str, header: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
            return next(iter(engine.infer(model_feeds(engine, x, preprocessing)).values()))

        return compute

    @classmethod
    def worker_takes_tokens(cls, manifest, model: Optional[str], has_models: bool) -> bool:
        """Whether a worker's input for ``model`` is the bundle's token tensor (checked as tokens): a
        device with one unnamed model takes the bundle input; a baseline's named models take the
        hidden states of the one before."""
        return manifest.input.is_text and not has_models
