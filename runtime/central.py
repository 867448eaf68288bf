"""The central node: one device that runs its own sub-model, gathers every
worker's pooled features X_n, applies the aggregator and the teacher's head
(paper eq. 2) and answers the client.

Sockets: a ROUTER ``front`` for clients and a ROUTER ``back`` that workers
connect to. One request is served at a time; others queue in ZeroMQ. The
input is forwarded to the workers first, then the central node computes its
own sub-model while they compute theirs, so all devices run in parallel.
"""

from __future__ import annotations

import json
import logging
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
from coformer.runtime.worker import KEEPALIVE_S, POLL_MS, _id_of, input_limits, install_stop_signals, max_message_bytes

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
            own = open_engine(self.bundle_dir / m.central.artifact, m.central.backend, self.threads or m.central.threads)
            agg = open_engine(self.bundle_dir / m.aggregator, "onnxruntime", 1)
            self._throttle, self._own, self._agg = throttle, own, agg
            if ready_stream is not None:
                ready_stream.write(json.dumps({"event": "ready", **self.endpoints}) + "\n")
                ready_stream.flush()
            log.info("central %s: %s, %s", m.central.device, m.central.artifact, throttle.describe())
            poller = zmq.Poller()
            poller.register(self.front, zmq.POLLIN)
            poller.register(self.back, zmq.POLLIN)
            while not stop.is_set():
                events = dict(poller.poll(POLL_MS))
                if self.back in events:
                    self._on_back(self.back.recv_multipart(), pending=None)
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
        t0 = time.perf_counter()
        rid = self._next_id
        self._next_id += 1
        x = msg.tensor
        fwd = protocol.encode("infer", rid, x)
        sent_to = [w.device for w in self.manifest.workers]
        for name in sent_to:
            self.back.send_multipart([self.workers[name]] + fwd)
        t_sent = time.perf_counter()
        out = self._own.infer({self.manifest.input.name: x})
        own_features = next(iter(out.values()))
        idle = self._throttle.after_compute(self._own.last_compute_ms / 1e3, self._own.last_cpu_ms / 1e3)
        central_ms = self._own.last_compute_ms + idle * 1e3
        t_own = time.perf_counter()
        gathered = self._gather(rid, batch=x.shape[0], expected=sent_to)
        t_gather = time.perf_counter()
        feeds = {}
        for i, dev in enumerate(self.manifest.devices):
            feeds[f"feature_{i}"] = own_features if dev.role == "central" else gathered["features"][dev.device]
        logits = next(iter(self._agg.infer(feeds).values()))
        t_end = time.perf_counter()
        return protocol.encode(
            "result",
            msg.id,
            np.ascontiguousarray(logits, dtype=np.float32),
            label_index=[int(i) for i in np.argmax(logits, axis=-1)],
            wire_bytes_from_workers=gathered["wire_bytes"],
            timing_ms={
                "central_compute": central_ms,
                "wait_for_workers": (t_gather - t_own) * 1e3,
                "aggregate": self._agg.last_compute_ms,
                "total": (t_end - t0) * 1e3,
                "workers_compute": gathered["compute_ms"],
                "workers_service": gathered["service_ms"],
                "dispatch": (t_sent - t0) * 1e3,
                "central_own": (t_own - t_sent) * 1e3,
            },
        )

    # -- workers ---------------------------------------------------------
    def _gather(self, rid: int, batch: int, expected: list[str]) -> dict:
        pending = {"id": rid, "batch": batch, "features": {}, "compute_ms": {}, "service_ms": {}, "wire_bytes": 0,
                   "error": None}
        deadline = time.monotonic() + self.timeout_s
        while len(pending["features"]) < len(expected) and pending["error"] is None:
            left_ms = int((deadline - time.monotonic()) * 1e3)
            if left_ms <= 0 or not self.back.poll(left_ms):
                late = sorted(set(expected) - set(pending["features"]))
                raise protocol.ProtocolError("timeout", f"workers {late} did not answer within {self.timeout_s:g} s")
            self._on_back(self.back.recv_multipart(), pending)
        if pending["error"] is not None:
            raise protocol.ProtocolError("worker_error", pending["error"])
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
            return
        dim = self.manifest.device(name).feature_dim
        t = msg.tensor
        if msg.op != "features" or t is None or t.dtype != np.float32 or t.shape != (pending["batch"], dim):
            got = None if t is None else (str(t.dtype), list(t.shape))
            pending["error"] = f"worker {name} sent {msg.op} {got}, expected float32 {[pending['batch'], dim]}"
            return
        pending["features"][name] = t
        pending["compute_ms"][name] = float(msg.header.get("compute_ms", 0.0))
        pending["service_ms"][name] = float(msg.header.get("service_ms", 0.0))
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


def run_central(bundle_dir: Path, front: str, back: str, **kwargs) -> None:
    node = CentralNode(bundle_dir, front, back, **kwargs)
    node.bind()
    node.serve(ready_stream=sys.stdout)
