"""CoFormer's round (paper eq. 2): every device runs its sub-model on the input at once, each
worker sends one pooled feature vector X_n, and the aggregator fuses them into the answer. A
worker that is gone or late is left out, and the bundle's fallback aggregator without it
answers, flagged ``degraded``."""

from __future__ import annotations

import time

import numpy as np

from coformer.runtime import protocol
from coformer.runtime.engines import open_engine
from coformer.runtime.schema import SCHEMA_VERSION
from coformer.runtime.strategies.base import Strategy


class CoFormer(Strategy):
    name = "coformer"
    schema_version = SCHEMA_VERSION
    batches = True
    takes_index = True
    fuses = True

    def open(self) -> None:
        m, where = self.node.manifest, self.node.bundle_dir
        self.aggregator = open_engine(where / m.aggregator, "onnxruntime", 1)
        self.fallbacks = {frozenset(fb["missing"]): open_engine(where / fb["aggregator"], "onnxruntime", 1)
                          for fb in m.fallbacks}

    def can_degrade(self, missing) -> bool:
        return self.node.manifest.fallback(missing) is not None

    def run(self, x: np.ndarray, index, acct) -> np.ndarray:
        """With ``index`` the workers hold the input themselves (``--local-inputs``), so only the
        index goes on the wire; with the request's image files, the files go (each device decodes
        them), not their float32 pixels."""
        node, m = self.node, self.node.manifest
        extra = {} if index is None else {"input_index": index}
        if acct.images is not None:  # the files the client sent, not their 602 KB of float32 pixels each
            extra = {"images": acct.images}
        alive = set(node.alive())
        workers = {w.device: (None, None if extra else x, extra) for w in m.workers
                   if w.device in alive or not self.fallbacks}
        own, gathered = node.exchange(workers, x.shape[0], acct, own=lambda: node.run_own("", x, acct),
                                      partial=bool(self.fallbacks))
        missing = sorted(w.device for w in m.workers if w.device not in gathered)
        agg = self.aggregator
        if missing:
            agg = self.fallbacks.get(frozenset(missing))
            if agg is None:  # (only past the fallbacks this bundle has, e.g. two of five workers down)
                raise protocol.ProtocolError("timeout", f"workers {missing} did not answer within the deadline, "
                                                        "and this bundle has no fallback without them")
            acct.degraded = missing
        t = time.perf_counter()
        feeds = {f"feature_{i}": own if dev.role == "central" else gathered[dev.device]
                 for i, dev in enumerate(m.devices) if dev.device not in missing}
        out = next(iter(agg.infer(feeds).values()))
        acct.aggregate_ms += (time.perf_counter() - t) * 1e3
        return out
