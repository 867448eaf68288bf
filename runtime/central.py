"""The central node: one device that runs its own sub-model, gathers every
worker's pooled features X_n, applies the aggregator and the teacher's head
(paper eq. 2) and answers the client.

The same node drives the baselines ``coformer bench`` compares against (the
manifest's ``strategy``): the teacher alone, a layer pipeline and tensor
parallelism, so every strategy is measured through one runtime.

Sockets: a ROUTER ``front`` for clients and a ROUTER ``back`` that workers
connect to. One request is served at a time; others queue in ZeroMQ. The
input is forwarded to the workers first, then the central node computes its
own sub-model while they compute theirs, so all devices run in parallel.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import zmq

from coformer.runtime import protocol
from coformer.runtime.engines import open_engine
from coformer.runtime.errors import CoFormerError
from coformer.runtime.limits import DeviceLimits, apply_limits
from coformer.runtime.manifest import load_manifest, manifest_digest
from coformer.runtime.text import check_tokens, model_feeds
from coformer.runtime.worker import KEEPALIVE_S, POLL_MS, _id_of, input_limits, install_stop_signals, max_message_bytes

_yield_cpu = getattr(os, "sched_yield", lambda: time.sleep(0))  # (Unix; elsewhere a no-op-ish sleep)
log = logging.getLogger("coformer.central")


class CentralNode:
    """Serve a bundle's central role.

    Args:
        bundle_dir: the bundle folder (verified on load).
        front: endpoint clients connect to, e.g. ``tcp://127.0.0.1:5555``
            (``:*`` picks a free port; see :attr:`endpoints` after :meth:`bind`).
        back: endpoint workers connect to.
        limits: compute limits of the central device.
        timeout_s: how long to wait for the slowest worker before answering
            the client with a ``timeout`` error that names it.
    """

    def __init__(
        self,
        bundle_dir: Path,
        front: str,
        back: str,
        limits: DeviceLimits = DeviceLimits(),
        threads: Optional[int] = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest = load_manifest(self.bundle_dir)
        self.digest = manifest_digest(self.bundle_dir)
        self.front_addr, self.back_addr = front, back
        self.limits = limits
        self.threads = threads
        self.timeout_s = timeout_s
        self.in_limits = input_limits(self.manifest)
        self.workers: dict[str, bytes] = {}
        self.last_seen: dict[str, float] = {}
        self._next_id = 1
        self.ctx = zmq.Context()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.back = self.ctx.socket(zmq.ROUTER)
        for s in (self.front, self.back):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, max_message_bytes(self.in_limits))
        # A worker restarted (or replacing a hung one) connects under the same identity: without
        # handover ROUTER silently drops the new connection while the old one lives, and the
        # replacement is locked out for as long as its predecessor hangs.
        self.back.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.endpoints: dict[str, str] = {}

    def bind(self) -> dict[str, str]:
        for name, sock, addr in (("front", self.front, self.front_addr), ("back", self.back, self.back_addr)):
            try:
                sock.bind(addr)
            except zmq.ZMQError as e:
                raise CoFormerError(f"central node cannot bind {name} endpoint {addr}: {e}") from None
            self.endpoints[name] = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        return self.endpoints

    def serve(self, stop: Optional[threading.Event] = None, ready_stream=None) -> None:
        """Serve until ``stop`` is set (or SIGTERM/SIGINT in the main thread).

        Prints one JSON line ``{"event": "ready", "front": ..., "back": ...}``
        to ``ready_stream`` once bound and loaded, so a launcher knows where
        to point workers and clients.
        """
        stop = stop or threading.Event()
        install_stop_signals(stop)
        m = self.manifest
        if not self.endpoints:
            self.bind()
        throttle = apply_limits(self.limits, f"central-{m.central.device}")
        try:
            c = m.central
            self._own = {name: open_engine(self.bundle_dir / f, c.backend, self.threads or c.threads)
                         for name, f in c.model_files().items()}
            self._agg = open_engine(self.bundle_dir / m.aggregator, "onnxruntime", 1) if m.strategy == "coformer" else None
            self._throttle = throttle
            if ready_stream is not None:
                ready_stream.write(json.dumps({"event": "ready", **self.endpoints}) + "\n")
                ready_stream.flush()
            log.info("central %s: %s, %s", m.central.device, m.central.artifact, throttle.describe())
            poller = zmq.Poller()
            poller.register(self.front, zmq.POLLIN)
            poller.register(self.back, zmq.POLLIN)
            while not stop.is_set():
                throttle.waiting()
                events = dict(poller.poll(POLL_MS))
                if self.back in events:
                    frames = self.back.recv_multipart()
                    try:
                        self._on_back(frames, pending=None)
                    except Exception:  # nothing a peer sends may end the service
                        log.exception("message from worker socket peer %r not handled", frames[0][:64])
                if self.front in events:
                    self._on_front(self.front.recv_multipart())
        finally:
            self.front.close(0)
            self.back.close(0)
            self.ctx.term()
            throttle.release()

    # -- clients ---------------------------------------------------------
    def _on_front(self, frames: list[bytes]) -> None:
        client, rest = frames[0], frames[1:]
        envelope = [client]
        if rest and rest[0] == b"":  # a REQ client puts an empty delimiter first
            envelope, rest = [client, b""], rest[1:]
        try:
            msg = protocol.decode(rest, self.in_limits)
            if msg.op == "status":
                reply = protocol.encode("status_reply", msg.id, **self.status())
            elif msg.op == "infer":
                reply = self._infer(msg)
            else:
                raise protocol.ProtocolError("bad_op", f"the central node does not serve op {msg.op!r}")
        except protocol.ProtocolError as e:
            reply = protocol.error_frames(_id_of(rest) if rest else 0, e.code, str(e))
        except Exception as e:  # a fault this node did not foresee: answer it, log it, keep serving
            log.exception("request not served")
            reply = protocol.error_frames(_id_of(rest) if rest else 0, "internal", f"{type(e).__name__}: {e}")
        self.front.send_multipart(envelope + reply)

    def _alive(self) -> list[str]:
        """Workers heard from within three keep-alive periods (a killed worker drops out)."""
        horizon = time.monotonic() - 3 * KEEPALIVE_S
        return sorted(n for n in self.workers if self.last_seen.get(n, 0.0) >= horizon)

    def status(self) -> dict:
        expected = [w.device for w in self.manifest.workers]
        alive = self._alive()
        missing = [d for d in expected if d not in alive]
        return {
            "ready": not missing,
            "central": self.manifest.central.device,
            "workers": alive,
            "missing": missing,
            "model": self.manifest.model.get("name"),
        }

    def _infer(self, msg: protocol.Message) -> list[bytes]:
        status = self.status()
        if not status["ready"]:
            raise protocol.ProtocolError("not_ready", f"waiting for workers {status['missing']} to register")
        if msg.tensor is None:
            raise protocol.ProtocolError("bad_payload", "infer needs the model input as its tensor")
        t0 = time.perf_counter()
        acct = _Account()
        index = msg.header.get("input_index")
        if index is not None and self.manifest.strategy != "coformer":
            raise protocol.ProtocolError("bad_header", f"input_index is only for CoFormer bundles, this one is "
                                                       f"{self.manifest.strategy!r}")
        if index is not None and (not isinstance(index, list) or len(index) != msg.tensor.shape[0]):
            raise protocol.ProtocolError("bad_index", f"input_index {index!r} must list one row per sample of the "
                                                      f"batch of {msg.tensor.shape[0]}")
        if self.manifest.input.is_text:
            check_tokens(msg.tensor, self.manifest.input.preprocessing)
        run = {"coformer": self._run_coformer, "teacher": self._run_teacher, "pipeline": self._run_pipeline,
               "tensor_parallel": self._run_tensor_parallel}[self.manifest.strategy]
        out = run(msg.tensor, index, acct)
        t_end = time.perf_counter()
        embedding = self.manifest.task_kind == "embedding"  # the fused vector itself: no labels to pick
        return protocol.encode(
            "result",
            msg.id,
            np.ascontiguousarray(out, dtype=np.float32),
            task=self.manifest.task_kind,
            label_index=[] if embedding else [int(i) for i in np.argmax(out, axis=-1)],
            wire_bytes_from_workers=acct.bytes_from,
            wire_bytes_to_workers=acct.bytes_to,
            rounds=acct.rounds,
            timing_ms={
                "central_compute": acct.central_ms,
                "wait_for_workers": acct.wait_ms,
                "aggregate": acct.aggregate_ms,
                "total": (t_end - t0) * 1e3,
                "workers_compute": acct.workers_compute,
                "workers_service": acct.workers_service,
                "workers_queued": acct.workers_queued,
                "dispatch": acct.dispatch_ms,
                "central_own": acct.own_ms,
                # the critical path, in the terms of the paper's Fig. 3/4
                "critical_compute": acct.central_ms - acct.own_in_rounds + acct.round_compute,
                "critical_transfer": acct.round_transfer,
            },
        )

    # -- strategies ------------------------------------------------------
    def _run_own(self, name: str, x: np.ndarray, acct: "_Account") -> np.ndarray:
        """One of the central node's models on ``x``, held to its device's share."""
        engine = self._own[name]
        queued = self._throttle.queued_s()
        out = next(iter(engine.infer(model_feeds(engine, x, self.manifest.input.preprocessing)).values()))
        idle = self._throttle.after_compute(engine.last_compute_ms / 1e3, engine.last_cpu_ms / 1e3, queued_s=queued)
        self._throttle.waiting()  # a baseline's next model on this device starts its own clock
        acct.central_ms += queued * 1e3 + engine.last_compute_ms + idle * 1e3  # device time, as workers report it
        return out

    def _run_coformer(self, x: np.ndarray, index, acct: "_Account") -> np.ndarray:
        """Paper eq. 2: every device runs its sub-model on the input; the aggregator fuses the X_n.

        With ``index`` the workers hold the input themselves (``--local-inputs``),
        so only the index goes on the wire.
        """
        extra = {} if index is None else {"input_index": index}
        workers = {w.device: (None, None if index is not None else x, extra) for w in self.manifest.workers}
        own, gathered = self._round(workers, x.shape[0], acct, own=lambda: self._run_own("", x, acct))
        t = time.perf_counter()
        feeds = {f"feature_{i}": own if dev.role == "central" else gathered[dev.device]
                 for i, dev in enumerate(self.manifest.devices)}
        logits = next(iter(self._agg.infer(feeds).values()))
        acct.aggregate_ms += (time.perf_counter() - t) * 1e3
        return logits

    def _run_teacher(self, x: np.ndarray, index, acct: "_Account") -> np.ndarray:
        """The teacher alone on the central device (the strongest one)."""
        return self._run_own("", x, acct)

    def _run_pipeline(self, x: np.ndarray, index, acct: "_Account") -> np.ndarray:
        """EdgeShard-style: stage 0 here, then each worker's layers in turn, the token tensor
        passed along. Devices reach each other through the central node's switch, so each hop
        crosses the sender's link and the receiver's link, as it is relayed here."""
        h = self._run_own(next(iter(self._own)), x, acct)
        for w in self.manifest.workers:
            model = next(iter(w.models))
            _, out = self._round({w.device: (model, h, {})}, x.shape[0], acct)
            h = out[w.device]
        return h

    def _run_tensor_parallel(self, x: np.ndarray, index, acct: "_Account") -> np.ndarray:
        """Galaxy-style: every layer's heads and MLP neurons are split over the devices; after
        attention and after the MLP the partial outputs are summed here (the reduction of a
        star network) and the residual stream goes back out."""
        h = self._run_own("embed", x, acct)
        for layer in range(int(self.manifest.model["layers"])):
            for part in ("attn", "mlp"):
                name = f"{part}{layer}"
                reqs = {w.device: (name, h, {}) for w in self.manifest.workers if name in w.models}
                own, outs = self._round(reqs, x.shape[0], acct,
                                        own=(lambda n=name: self._run_own(n, h, acct)) if name in self._own else None)
                t = time.perf_counter()
                h = h + sum(outs.values(), own if own is not None else 0.0)
                acct.aggregate_ms += (time.perf_counter() - t) * 1e3
        return self._run_own("head", h, acct)

    def _round(self, requests: dict, batch: int, acct: "_Account", own=None):
        """Send each worker its request ``(model, tensor or None, header fields)``, run ``own()``
        here meanwhile, then gather every answer; returns ``(own's result, {worker: output})``."""
        rid = self._next_id
        self._next_id += 1
        t0 = time.perf_counter()
        expected = {}
        for name, (model, tensor, extra) in requests.items():
            fields = dict(extra) if model is None else {"model": model, **extra}
            frames = protocol.encode("infer", rid, tensor, **fields)
            acct.bytes_to += sum(len(f) for f in frames)
            self.back.send_multipart([self.workers[name]] + frames)
            art = self.manifest.device(name)
            expected[name] = (batch, *(art.models[model].output_shape if model is not None else (art.feature_dim,)))
        if expected:
            # Let ZeroMQ's I/O thread put the requests on the wire before this thread computes:
            # where both share a core (an emulated device, a single-core board) the scheduler
            # otherwise lets the compute run on, and the workers got their requests 1.3 ms
            # (median) and 3.2-3.6 ms (p90) after dispatch, against 0.2-0.3 ms with the yield
            # (a quickstart bundle whose central sub-model takes 3 ms). Costs nothing where a
            # core is free.
            _yield_cpu()
        t_sent = time.perf_counter()
        own_before = acct.central_ms
        result = own() if own is not None else None
        t_own = time.perf_counter()
        own_ms = acct.central_ms - own_before
        gathered = self._gather(rid, expected) if expected else {"features": {}, "compute_ms": {},
                                                                 "service_ms": {}, "queued_ms": {}, "arrival": {},
                                                                 "wire_bytes": 0}
        acct.dispatch_ms += (t_sent - t0) * 1e3
        acct.own_ms += (t_own - t_sent) * 1e3
        acct.wait_ms += (time.perf_counter() - t_own) * 1e3
        acct.bytes_from += gathered["wire_bytes"]
        acct.rounds += 1 if expected else 0
        # The round's critical path: the central node's own part, or the worker that answered last
        # (its compute, and the rest of its dispatch-to-arrival time: the links and message handling).
        acct.own_in_rounds += own_ms
        last = max(gathered["arrival"], key=gathered["arrival"].get) if expected else None
        if last is None or t_own >= gathered["arrival"][last]:
            acct.round_compute += own_ms
        else:
            acct.round_compute += gathered["compute_ms"][last]
            acct.round_transfer += max(0.0, (gathered["arrival"][last] - t0) * 1e3 - gathered["service_ms"][last])
        for k, v in gathered["compute_ms"].items():
            acct.workers_compute[k] = acct.workers_compute.get(k, 0.0) + v
        for k, v in gathered["service_ms"].items():
            acct.workers_service[k] = acct.workers_service.get(k, 0.0) + v
        for k, v in gathered["queued_ms"].items():
            acct.workers_queued[k] = acct.workers_queued.get(k, 0.0) + v
        return result, gathered["features"]

    # -- workers ---------------------------------------------------------
    def _gather(self, rid: int, expected: dict) -> dict:
        pending = {"id": rid, "expected": expected, "features": {}, "compute_ms": {}, "service_ms": {},
                   "queued_ms": {}, "arrival": {}, "wire_bytes": 0, "error": None}
        deadline = time.monotonic() + self.timeout_s
        while len(pending["features"]) < len(expected) and pending["error"] is None:
            left_ms = int((deadline - time.monotonic()) * 1e3)
            if left_ms <= 0 or not self.back.poll(left_ms):
                late = sorted(set(expected) - set(pending["features"]))
                raise protocol.ProtocolError("timeout", f"workers {late} did not answer within {self.timeout_s:g} s")
            self._on_back(self.back.recv_multipart(), pending)
        if pending["error"] is not None:
            # a fault in the client's request (a bad input_index) keeps its code; anything else is the worker's
            code = pending.get("code") if pending.get("code") in _CLIENT_FAULTS else "worker_error"
            raise protocol.ProtocolError(code, pending["error"])
        return pending

    def _on_back(self, frames: list[bytes], pending: Optional[dict]) -> None:
        ident, rest = frames[0], frames[1:]
        name = ident.decode(errors="replace")
        if self.workers.get(name) == ident:
            self.last_seen[name] = time.monotonic()
        try:
            msg = protocol.decode(rest)
        except protocol.ProtocolError as e:
            log.warning("bad message from worker %s: %s", name, e)
            return
        if msg.op == "hello":
            self._register(ident, msg)
            return
        if self.workers.get(name) != ident:
            self.back.send_multipart([ident] + protocol.error_frames(msg.id, "unknown_worker", "send hello first"))
            return
        if pending is None or msg.id != pending["id"]:
            return  # a late answer to a request that already timed out
        if msg.op == "error":
            pending["error"] = f"worker {name}: {msg.header.get('message')}"
            pending["code"] = msg.header.get("code")
            return
        want = pending["expected"].get(name)
        if want is None:
            return  # not asked in this round
        t = msg.tensor
        if msg.op != "features" or t is None or t.dtype != np.float32 or t.shape != tuple(want):
            got = None if t is None else (str(t.dtype), list(t.shape))
            pending["error"] = f"worker {name} sent {msg.op} {got}, expected float32 {list(want)}"
            return
        try:
            timings = {k: protocol.number(msg.header, k) for k in ("compute_ms", "service_ms", "queued_ms")}
        except protocol.ProtocolError as e:
            pending["error"] = f"worker {name}: {e}"
            return
        pending["features"][name] = t
        pending["arrival"][name] = time.perf_counter()
        for k, v in timings.items():
            pending[k][name] = v
        pending["wire_bytes"] += msg.wire_bytes

    def _register(self, ident: bytes, msg: protocol.Message) -> None:
        name = str(msg.header.get("device", ""))
        worker_names = [w.device for w in self.manifest.workers]
        if name not in worker_names or ident != name.encode():
            reply = protocol.error_frames(0, "bad_hello", f"device {name!r} is not a worker of this bundle ({worker_names})")
        elif msg.header.get("digest") != self.digest:
            reply = protocol.error_frames(0, "bad_hello", f"worker {name!r} serves a different bundle (manifest digest differs)")
        else:
            self.workers[name] = ident
            self.last_seen[name] = time.monotonic()
            reply = protocol.encode("welcome", 0)
            log.debug("worker %s registered", name)
        self.back.send_multipart([ident] + reply)


_CLIENT_FAULTS = ("bad_index", "no_local_inputs")


class _Account:
    """What one request cost, summed over its rounds (a baseline makes many)."""

    def __init__(self) -> None:
        self.central_ms = self.wait_ms = self.aggregate_ms = self.dispatch_ms = self.own_ms = 0.0
        self.bytes_to = self.bytes_from = self.rounds = 0
        self.own_in_rounds = self.round_compute = self.round_transfer = 0.0
        self.workers_compute: dict[str, float] = {}
        self.workers_service: dict[str, float] = {}
        self.workers_queued: dict[str, float] = {}  # waiting for a core shared with another emulated device


def run_central(bundle_dir: Path, front: str, back: str, **kwargs) -> None:
    node = CentralNode(bundle_dir, front, back, **kwargs)
    node.bind()
    node.serve(ready_stream=sys.stdout)
