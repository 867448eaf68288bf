"""PRISM on the devices (issue 23): how a PRISM bundle's models are chained, with no torch.

A PRISM device runs its models in order (``embed``, ``layer0``, ...; see
:mod:`coformer.compiler.prism_bundle`). Each model's ``send`` output goes to the central
node; every other output (``new_X``) is state that stays on the device and feeds input ``X``
of its next model; ``others`` (the other devices' K/V Segment Means of that layer, in device
order) is the one input that travels. :func:`drive` is the exchange, written once: the
central node runs it over the network (:class:`coformer.runtime.central.CentralNode`) and
the compiler in one process (:func:`chain_locally`, the bundle's parity check). A worker
keeps each request's state in :class:`Sessions` between its rounds.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from coformer.runtime.protocol import ProtocolError
from coformer.runtime.text import model_feeds

SEND, OTHERS = "send", "others"
NEW = "new_"  # a state output's prefix: ONNX names an input and an output apart
# A worker holds at most this many requests' state: the central node drives one round group
# at a time, so more is only a peer's (or a lost request's) leftover, evicted oldest first.
MAX_SESSIONS = 8


def pad_tokens(x: np.ndarray, length: int, pad_id: int) -> np.ndarray:
    """A packed token tensor ``[B, k, T]`` right-padded to ``length`` (ids ``pad_id``, mask and types 0):
    a PRISM bundle's positions are fixed, and padding is left out of its keys, means and pooling."""
    B, k, T = x.shape
    if T >= length:
        return x
    out = np.zeros((B, k, length), dtype=x.dtype)
    out[:, 0] = pad_id
    out[:, :, :T] = x
    return out


def step(engine, state: Optional[Mapping[str, np.ndarray]], x: np.ndarray,
         preprocessing: Mapping[str, Any]) -> tuple[Optional[np.ndarray], dict[str, np.ndarray]]:
    """Run one of a device's models: the first (``state`` None) on the bundle input ``x``, a later
    one on ``state`` and ``others = x``. Returns what it sends and the device's new state."""
    if state is None:
        feeds = model_feeds(engine, x, preprocessing)
    else:
        feeds = {n: state[n] for n in engine.input_names if n != OTHERS}
        feeds[OTHERS] = x
    out = dict(engine.infer(feeds))
    send = out.pop(SEND, None)
    return send, {**(state or {}), **{n[len(NEW):]: t for n, t in out.items()}}


def model_order(names) -> list[str]:
    """A device's models in the order it runs them: ``embed``, ``layer0``, ``layer1``, ..., ``head``
    (a manifest stores them by name, where ``layer10`` sorts before ``layer2``)."""
    names = list(names)
    unknown = [n for n in names if n not in ("embed", "head") and not (n.startswith("layer") and n[5:].isdigit())]
    if unknown or "embed" not in names:
        from coformer.runtime.errors import CoFormerError

        raise CoFormerError(f"PRISM models {names}: expected embed, layer0, layer1, ... and optionally head")
    return sorted(names, key=lambda n: (-1 if n == "embed" else 1 << 30 if n == "head" else int(n[5:])))


def others_for(sends: Sequence[Optional[np.ndarray]], p: int) -> np.ndarray:
    """Device ``p``'s ``others``: every other device's means, in device order, on the segment axis."""
    return np.ascontiguousarray(np.concatenate([s for j, s in enumerate(sends) if j != p], axis=2))


def drive(models: Sequence[Sequence[str]], x: np.ndarray,
          run_round: Callable[[str, dict[int, np.ndarray]], dict[int, Optional[np.ndarray]]]) -> np.ndarray:
    """One inference's exchange. ``models[p]`` names device ``p``'s models (the central node's
    first); ``run_round(name, {p: tensor})`` runs model ``name`` on each listed device, all in
    parallel, and returns what each sends. Returns the logits."""
    P = len(models)
    sends = run_round("embed", {p: x for p in range(P)})
    for name in [n for n in model_order(models[0]) if n.startswith("layer")]:
        sends = run_round(name, {p: others_for([sends[j] for j in range(P)], p) for p in range(P)
                                 if name in models[p]})
    if "head" in models[0]:  # mean pooling: the workers' sums, one row each
        return run_round("head", {0: np.ascontiguousarray(np.stack([sends[p] for p in range(1, P)], axis=1))})[0]
    return sends[0]


def chain_locally(engines: Sequence[Mapping[str, Any]], x: np.ndarray,
                  preprocessing: Mapping[str, Any]) -> np.ndarray:
    """:func:`drive` in one process over every device's engines (``engines[p]``: name -> engine)."""
    states: list[Optional[dict]] = [None] * len(engines)

    def run_round(name: str, inputs: dict[int, np.ndarray]) -> dict[int, Optional[np.ndarray]]:
        out = {}
        for p, t in inputs.items():
            out[p], states[p] = step(engines[p][name], None if name == "embed" else states[p], t, preprocessing)
        return out

    return drive([list(e) for e in engines], x, run_round)


class Sessions:
    """A worker's PRISM state between a request's rounds: ``session`` (an id the central node
    puts in every round's header) -> the state and the model that must come next. A round out
    of order, or for a session this worker does not hold, is refused by name; at most
    :data:`MAX_SESSIONS` are kept."""

    def __init__(self, order: Sequence[str], preprocessing: Mapping[str, Any], keep: int = MAX_SESSIONS) -> None:
        self.order, self.preprocessing, self.keep = model_order(order), preprocessing, keep
        self._held: "OrderedDict[int, tuple[int, dict]]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def run(self, engine, name: str, header: Mapping[str, Any], x: np.ndarray) -> Optional[np.ndarray]:
        """Run model ``name`` of the session ``header`` names on ``x``; return what to send."""
        sid = header.get("session")
        if not isinstance(sid, int) or isinstance(sid, bool) or sid < 0:
            raise ProtocolError("bad_session", f"a PRISM round needs a session number, got {sid!r}")
        at = self.order.index(name)
        if at == 0:
            state = None
        else:
            held = self._held.get(sid)
            if held is None or held[0] != at:
                want = "no round" if held is None else f"{self.order[held[0]]!r}"
                raise ProtocolError("bad_session", f"session {sid}: model {name!r} is out of order (this worker "
                                                   f"expects {want} of it next)")
            state = held[1]
        send, state = step(engine, state, x, self.preprocessing)
        self._held.pop(sid, None)
        if at + 1 < len(self.order):
            self._held[sid] = (at + 1, state)
            while len(self._held) > self.keep:
                self._held.popitem(last=False)
        return send
