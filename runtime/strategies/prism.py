"""PRISM's rounds (issue 23; :mod:`coformer.runtime.prism`): every device runs the whole model on
its share of the positions; each round sends each worker the other devices' K/V Segment Means
of a layer (the first round: the input, or its ``input_index``) while the central node runs its
own share, and gathers what each sends. One request is one session on every worker, whose
state stays there between rounds."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from coformer.runtime.errors import CoFormerError
from coformer.runtime.prism import Sessions, drive, pad_tokens, step
from coformer.runtime.schema import PRISM_SCHEMA_VERSION
from coformer.runtime.strategies.base import Strategy


class Prism(Strategy):
    name = "prism"
    schema_version = PRISM_SCHEMA_VERSION
    batches = True
    takes_index = True

    def run(self, x: np.ndarray, index, acct) -> np.ndarray:
        node, m = self.node, self.node.manifest
        if m.input.is_text:  # the bundle's positions are fixed (coformer.compiler.prism_bundle)
            x = pad_tokens(x, int(m.model["tokens"]), int(m.input.preprocessing["pad_id"]))
        devices = list(m.devices)
        if devices[0].role != "central":
            raise CoFormerError("a PRISM bundle lists its central node first")
        extra = {"session": node.next_id}  # the id of this request's first round names its session
        state: dict = {}

        def run_round(name: str, inputs: dict) -> dict:
            requests = {}
            for p, t in inputs.items():
                if p == 0:
                    continue
                first = name == "embed"
                fields = {**extra, "input_index": index} if first and index is not None else extra
                requests[devices[p].device] = (name, None if first and index is not None else t, fields)

            def own():
                if 0 not in inputs:
                    return None
                send, new = node.run_own(name, inputs[0], acct, run=lambda e: step(
                    e, None if name == "embed" else state, inputs[0], m.input.preprocessing))
                state.clear()
                state.update(new)
                return send

            mine, gathered = node.exchange(requests, x.shape[0], acct, own=own)
            out = {p: gathered[devices[p].device] for p in inputs if p != 0}
            out[0] = mine
            return out

        return drive([list(d.models) for d in devices], x, run_round)

    @classmethod
    def worker_compute(cls, manifest, models):
        """This round of the request's session (:class:`~coformer.runtime.prism.Sessions`): its state
        stays on the worker."""
        sessions = Sessions(list(models), manifest.input.preprocessing)

        def compute(engine, name: str, header: Mapping[str, Any], x: np.ndarray):
            return sessions.run(engine, name, header, x)

        return compute

    @classmethod
    def worker_takes_tokens(cls, manifest, model, has_models: bool) -> bool:
        return manifest.input.is_text and model == "embed"  # later rounds take state and means
