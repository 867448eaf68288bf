"""The baselines ``coformer bench`` compares CoFormer against, served by the same runtime: the
teacher alone, a layer pipeline (EdgeShard) and tensor parallelism (Galaxy). Their workers send
intermediate tensors (float32, held to being finite: no range is recorded for them), one
request at a time."""

from __future__ import annotations

import time

import numpy as np

from coformer.runtime.strategies.base import Strategy


class Teacher(Strategy):
    """The teacher alone on the central device (the strongest one)."""

    name = "teacher"

    def run(self, x: np.ndarray, index, acct) -> np.ndarray:
        return self.node.run_own("", x, acct)


class Pipeline(Strategy):
    """EdgeShard-style: stage 0 here, then each worker's layers in turn, the token tensor passed
    along. Devices reach each other through the central node's switch, so each hop crosses the
    sender's link and the receiver's link, as it is relayed here."""

    name = "pipeline"

    def run(self, x: np.ndarray, index, acct) -> np.ndarray:
        node = self.node
        h = node.run_own(next(iter(node.own_models)), x, acct)
        for w in node.manifest.workers:
            model = next(iter(w.models))
            _, out = node.exchange({w.device: (model, h, {})}, x.shape[0], acct)
            h = out[w.device]
        return h


class TensorParallel(Strategy):
    """Galaxy-style: every layer's heads and MLP neurons are split over the devices; after
    attention and after the MLP the partial outputs are summed here (the reduction of a star
    network) and the residual stream goes back out."""

    name = "tensor_parallel"

    def run(self, x: np.ndarray, index, acct) -> np.ndarray:
        node = self.node
        h = node.run_own("embed", x, acct)
        for layer in range(int(node.manifest.model["layers"])):
            for part in ("attn", "mlp"):
                name = f"{part}{layer}"
                reqs = {w.device: (name, h, {}) for w in node.manifest.workers if name in w.models}
                here = name in node.own_models
                own, outs = node.exchange(reqs, x.shape[0], acct,
                                          own=(lambda n=name: node.run_own(n, h, acct)) if here else None)
                t = time.perf_counter()
                h = h + sum(outs.values(), own if own is not None else 0.0)
                acct.aggregate_ms += (time.perf_counter() - t) * 1e3
        return node.run_own("head", h, acct)
