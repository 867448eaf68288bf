"""The central node: one device that runs its own sub-model, gathers every
worker's pooled features X_n, applies the aggregator and the teacher's head
(paper eq. 2) and answers the client.

What one request's rounds are is the bundle's strategy's (the manifest's ``strategy``, a
plug-in of :mod:`coformer.runtime.strategies`): CoFormer's one round of pooled features,
PRISM's round of K/V Segment Means per layer, and the baselines ``coformer bench`` compares
against (the teacher alone, a layer pipeline, tensor parallelism), so every strategy is
measured through one runtime. This node owns the rest: sockets, queue, batching, deadlines,
workers' registration and faults, and the accounts of what a request cost.

Sockets: a ROUTER ``front`` for clients and a ROUTER ``back`` that workers
connect to. Requests wait in a bounded queue (``busy`` past it); the oldest is
served together with the compatible ones behind it, stacked on the batch axis
(micro-batching), so throughput under concurrent clients grows with the batch
rather than being one request per end-to-end latency. The input is forwarded
to the workers first, then the central node computes its own sub-model while
they compute theirs, so all devices run in parallel.

A worker that is down (its connection gone, or silent for three heartbeats)
or late at the request's deadline is left out: the answer then comes from the
bundle's fallback aggregator without it and says ``degraded: [names]``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

import numpy as np
import zmq

from coformer.runtime import protocol
from coformer.runtime.clock import SystemClock
from coformer.runtime.engines import open_device_engines
from coformer.runtime.errors import CoFormerError
from coformer.runtime.limits import DeviceLimits, apply_limits
from coformer.runtime.manifest import load_manifest, manifest_digest
from coformer.runtime.security import (RoleKeys, check_local_signature, curve_server, require_security,
                                       start_authenticator)
from coformer.runtime.strategies import strategy_class
from coformer.runtime.text import check_tokens, model_feeds
from coformer.runtime.worker import (KEEPALIVE_S, POLL_MS, encoded_input, id_of, heartbeats, input_limits,
                                     install_stop_signals, max_message_bytes)

# After a connection on the worker socket closes, every worker is probed (a no-op send, refused
# at once for a connection that is gone) every PROBE_MS for PROBE_S: the disconnect event can
# come before the socket drops the connection's route.
PROBE_MS, PROBE_S = 20, 1.0
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
        keys: this node's key folder (:func:`coformer.runtime.security.load_keys`): both
            sockets then run CURVE, the worker socket admits only ``devices/`` keys (each
            under its own device name) and the client socket only ``clients/`` keys; with
            the folder's operator key the bundle's signature is checked on load.
        insecure: serve plain TCP on a non-loopback endpoint (refused otherwise).
        batch_requests: at most this many queued requests are served in one round, their
            inputs stacked on the batch axis (1: one request at a time).
        queue_limit: requests waiting beyond this are answered ``busy``; so are one client's
            (one connection's) beyond half of it, so that a flood leaves the others room.
        backend: overrides the bundle's engine backend for the central node's own models
            (the aggregators stay on ONNX Runtime's CPU: they are one small layer).
        precision: on ``tensorrt``, the precision its engines are built at on first start.
        context: the ZeroMQ context its sockets are made in (default: its own, ended with it);
            a test gives one to serve on ``inproc://`` endpoints.
        clock: what deadlines, keep-alives and faults are read from, and how the node waits
            for its sockets (:mod:`coformer.runtime.clock`; default wall time). A test gives a
            ``ManualClock`` to step through deadlines in simulated time.

    :meth:`serve` runs it; a test may instead :meth:`open` it and drive it with
    :meth:`step`, one turn of the loop at a time, then :meth:`close` it.
    """

    def __init__(
        self,
        bundle_dir: Path,
        front: str,
        back: str,
        limits: DeviceLimits = DeviceLimits(),
        threads: Optional[int] = None,
        timeout_s: float = 10.0,
        keys: Optional[RoleKeys] = None,
        insecure: bool = False,
        batch_requests: int = 8,
        queue_limit: int = 256,
        backend: Optional[str] = None,
        precision: str = "fp16",
        context: Optional[zmq.Context] = None,
        clock=None,
    ) -> None:
        self.clock = clock if clock is not None else SystemClock()
        if backend is not None:  # refused before anything binds (coformer.runtime.engines)
            from coformer.runtime.engines import check_backend

            check_backend(backend)
        self.backend, self.precision = backend, precision
        self.bundle_dir = Path(bundle_dir)
        self.secure = require_security(keys, insecure, (front, back), "central node")
        self.keys = keys
        self.manifest = load_manifest(self.bundle_dir, trust=keys.operator if keys else None)
        if keys is None:  # keyless (loopback, or --insecure): this user's own signature, where one exists
            check_local_signature(self.bundle_dir)
        self.digest = manifest_digest(self.bundle_dir)
        self.front_addr, self.back_addr = front, back
        self.limits = limits
        self.threads = threads
        self.timeout_s = timeout_s
        self.in_limits = input_limits(self.manifest)
        self.strategy = strategy_class(self.manifest.strategy)(self)
        # what workers send: pooled features as the manifest says (float16 halves the bytes), a
        # baseline's or PRISM's intermediate tensors always float32
        self.wire_dtype = np.dtype(self.manifest.feature_dtype if self.strategy.fuses else "float32")
        if batch_requests < 1 or queue_limit < 1:
            raise CoFormerError(f"batch_requests {batch_requests} and queue_limit {queue_limit} must be >= 1")
        self.batch_requests, self.queue_limit = batch_requests, queue_limit
        self._queue: deque = deque()  # (reply envelope, admitted infer message, deadline)
        self._waiting: dict[bytes, int] = {}  # client connection -> its requests in the queue
        # what one client may have waiting: half the queue, so another always finds room
        self.client_limit = max(1, queue_limit // 2)
        self._late_since: dict[str, float] = {}  # worker -> when it last missed a request's deadline
        self.workers: dict[str, bytes] = {}  # device -> the connection it registered from
        self._names: dict[bytes, str] = {}  # connection -> device
        self.last_seen: dict[str, float] = {}
        self.next_id = 1  # the id the next round to the workers takes
        self._own_context = context is None
        self.ctx = zmq.Context() if context is None else context
        self._auth = None
        self._make_sockets(keys)
        self._refused: dict[bytes, float] = {}  # connection -> when its refused hello was last logged
        self._faults: dict[str, tuple[float, str]] = {}  # worker -> (when, why) its last answer was left out
        self._monitor = None  # the worker socket's disconnect events (serve)
        self._throttle = None  # the device's limits, applied by open()
        self._probe_until: Optional[float] = None  # workers are probed until then, after a disconnect
        self._probed_at = float("-inf")
        self.endpoints: dict[str, str] = {}

    def _make_sockets(self, keys: Optional[RoleKeys]) -> None:
        """The client and worker sockets, bounded as the manifest's inputs are; under CURVE each
        admits only its own side's keys."""
        self.front = self.ctx.socket(zmq.ROUTER)
        self.back = self.ctx.socket(zmq.ROUTER)
        for s in (self.front, self.back):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, max_message_bytes(self.in_limits))
        self.front.setsockopt(zmq.RCVHWM, self.queue_limit)
        # Workers connect without an identity of their own: the ROUTER gives each connection a
        # fresh one, and a worker is whichever connection registered under its name with that
        # device's key (_register). A name is never a connection's identity, so a peer cannot take
        # over another device's connection (ROUTER handover handed it clients' inputs), and a
        # restarted worker is a new connection that registers again.
        # A request to a worker whose connection is gone fails at once (EHOSTUNREACH) instead of
        # vanishing, and the worker leaves the ready set; sends never block on a full queue.
        self.back.setsockopt(zmq.ROUTER_MANDATORY, 1)
        heartbeats(self.back)
        if self.secure:
            self._auth = start_authenticator(self.ctx, keys)
            curve_server(self.front, keys, "front")
            curve_server(self.back, keys, "back")
            unknown = sorted(set(keys.devices) - {w.device for w in self.manifest.workers})
            missing = sorted({w.device for w in self.manifest.workers} - set(keys.devices))
            if missing:
                log.warning("central: no key in %s for workers %s: they cannot join", keys.devices_dir, missing)
            if unknown:
                log.info("central: keys for %s in %s are not workers of this bundle", unknown, keys.devices_dir)

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
        try:
            self.open()
            if ready_stream is not None:
                ready_stream.write(json.dumps({"event": "ready", **self.endpoints}) + "\n")
                ready_stream.flush()
            while not stop.is_set():
                self.step()
        finally:
            self.close()

    def open(self) -> None:
        """Bind (unless bound), apply the device's limits, open the engines and start watching
        the worker socket's disconnects: what :meth:`step` needs."""
        m = self.manifest
        if not self.endpoints:
            self.bind()
        self._throttle = apply_limits(self.limits, f"central-{m.central.device}")
        c = m.central
        self.own_models = open_device_engines(self.bundle_dir, c.device, c.model_files(), self.backend or c.backend,
                                              self.threads or c.threads, self.precision)
        self.strategy.open()
        log.info("central %s: %s, %s", m.central.device, m.central.artifact, self._throttle.describe())
        poller = self._poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        # a connection closing on the worker socket: which worker it was is found out at once
        # (_on_disconnect), so status stops saying ready the moment a worker's connection is gone
        self._monitor = self.back.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        poller.register(self._monitor, zmq.POLLIN)

    def step(self, timeout_ms: Optional[int] = None) -> None:
        """One turn of the serving loop: wait up to ``timeout_ms`` (default ``POLL_MS``, or
        ``PROBE_MS`` while probing workers) for a message, handle what arrived on either socket,
        then serve the queued requests' next round (which waits for its workers' answers)."""
        self._throttle.waiting()
        if timeout_ms is None:
            timeout_ms = POLL_MS if self._probe_until is None else PROBE_MS
        events = self.clock.poll(self._poller, timeout_ms)
        if self._monitor in events:
            self._on_disconnect(None)
        elif self._probe_until is not None:
            self._probe(None)
        if self.back in events:
            received = self._recv_back()
            try:
                self._on_back(received, pending=None)
            except Exception:  # nothing a peer sends may end the service
                log.exception("message from worker socket peer %r not handled", received[0][0][:64])
        if self.front in events:
            self._drain_front()
        if self._queue:
            self._serve_queued()

    def close(self) -> None:
        """Close the sockets (and the context, where it is this node's own) and release the limits."""
        if self._monitor is not None:
            self.back.disable_monitor()
            self._monitor.close(0)
            self._monitor = None
        self.front.close(0)
        self.back.close(0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_context:
            self.ctx.term()
        if self._throttle is not None:
            self._throttle.release()
            self._throttle = None

    # -- clients ---------------------------------------------------------
    def _drain_front(self) -> None:
        """Read what clients have sent, up to the queue's bound: status and bad requests are
        answered at once, good ``infer`` requests queued; past ``queue_limit`` waiting, a
        request is answered ``busy`` (the client may retry) rather than left in ZeroMQ's
        buffers, whose receive high-water mark is the same bound."""
        for _ in range(self.queue_limit):
            try:
                frames = self.front.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            client, rest = frames[0], frames[1:]
            envelope = [client]
            if rest and rest[0] == b"":  # a REQ client puts an empty delimiter first
                envelope, rest = [client, b""], rest[1:]
            try:
                msg = protocol.decode(rest, self.in_limits)
                if msg.op == "status":
                    reply = protocol.encode("status_reply", msg.id, **self.status())
                elif msg.op == "infer":
                    deadline = self.clock.now() + self._deadline_s(msg.header)
                    msg = self._admit(msg)
                    if len(self._queue) >= self.queue_limit:
                        raise protocol.ProtocolError("busy", f"{len(self._queue)} requests are waiting; try again")
                    if self._waiting.get(client, 0) >= self.client_limit:
                        # one client's flood leaves room for the others: it is answered busy, not them
                        raise protocol.ProtocolError("busy", f"this client has {self._waiting[client]} requests "
                                                             f"waiting, its most ({self.client_limit}); try again")
                    self._queue.append((envelope, msg, deadline))
                    self._waiting[client] = self._waiting.get(client, 0) + 1
                    continue
                else:
                    raise protocol.ProtocolError("bad_op", f"the central node does not serve op {msg.op!r}")
            except protocol.ProtocolError as e:
                reply = protocol.error_frames(id_of(rest) if rest else 0, e.code, str(e))
            except Exception as e:  # a fault this node did not foresee: answer it, log it, keep serving
                log.exception("request not served")
                reply = protocol.error_frames(id_of(rest) if rest else 0, "internal", f"{type(e).__name__}: {e}")
            self._reply(envelope, reply)

    def _pop(self) -> tuple:
        """The oldest queued request, no longer counted against its client."""
        item = self._queue.popleft()
        client = item[0][0]
        left = self._waiting.get(client, 1) - 1
        if left > 0:
            self._waiting[client] = left
        else:
            self._waiting.pop(client, None)
        return item

    def _reply(self, envelope: list[bytes], frames: list[bytes]) -> None:
        try:
            self.front.send_multipart(envelope + frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # the client is gone, or not reading: its answer is dropped, not waited on
            log.debug("reply to client %r dropped", envelope[0][:32])

    def _serve_queued(self) -> None:
        """Serve the oldest queued request, batched with the compatible ones queued behind it
        (micro-batching: one round for up to ``batch_requests`` requests and ``max_batch``
        samples, since every model takes a batch axis), and answer each with its rows."""
        now = self.clock.now()
        while self._queue and self._queue[0][2] <= now:  # waited in the queue past its deadline
            envelope, msg, _ = self._pop()
            self._reply(envelope, protocol.error_frames(msg.id, "timeout", "the request's deadline passed while "
                                                                            "it waited in the queue"))
        if not self._queue:
            return
        head = self._pop()
        group = [head]
        t = head[1].tensor
        rows = t.shape[0]
        indexed = head[1].header.get("input_index") is not None
        encoded = head[1].images is not None  # files forwarded as they came: a batch is all files or none
        index_bytes = _index_bytes(head[1].header["input_index"]) if indexed else 0
        while self._queue and len(group) < self.batch_requests and self.strategy.batches:
            nxt = self._queue[0][1]
            nt = nxt.tensor
            more = _index_bytes(nxt.header["input_index"]) if indexed and "input_index" in nxt.header else 0
            if (nt.dtype != t.dtype or nt.shape[1:] != t.shape[1:] or rows + nt.shape[0] > self.in_limits.max_batch
                    or (nxt.header.get("input_index") is not None) != indexed
                    or (nxt.images is not None) != encoded
                    # the joined index must fit one header the workers accept (it never waits 10 s for a refusal)
                    or index_bytes + more > MAX_INDEX_BYTES
                    # a batch waits for its earliest deadline: one client's short deadline must not cut
                    # another's wait (a request joins only a batch whose deadline is about its own)
                    or not _deadlines_close(head[2], self._queue[0][2], now)):
                break
            group.append(self._pop())
            rows += nt.shape[0]
            index_bytes += more
        try:
            if len(group) == 1:
                x, index, images = t, head[1].header.get("input_index"), head[1].images
            else:
                x = np.concatenate([g[1].tensor for g in group])
                index = [i for g in group for i in g[1].header["input_index"]] if indexed else None
                images = tuple(f for g in group for f in g[1].images) if encoded else None
            out, fields = self._infer(x, index, min(g[2] for g in group), images)
        except protocol.ProtocolError as e:
            for envelope, msg, _ in group:
                self._reply(envelope, protocol.error_frames(msg.id, e.code, str(e)))
            return
        except Exception as e:  # a fault this node did not foresee: answer it, log it, keep serving
            log.exception("request not served")
            for envelope, msg, _ in group:
                self._reply(envelope, protocol.error_frames(msg.id, "internal", f"{type(e).__name__}: {e}"))
            return
        lo = 0
        for envelope, msg, _ in group:
            n = msg.tensor.shape[0]
            part = out[lo: lo + n]
            lo += n
            label = [] if self.manifest.task_kind == "embedding" else [int(i) for i in np.argmax(part, axis=-1)]
            self._reply(envelope, protocol.encode("result", msg.id, np.ascontiguousarray(part, dtype=np.float32),
                                                  label_index=label, batched_requests=len(group), **fields))

    def alive(self) -> list[str]:
        """Workers heard from within three keep-alive periods (a killed worker drops out), and
        heard from since they last missed a deadline (a hung one is not waited for again, round
        after round; its next heartbeat brings it back)."""
        horizon = self.clock.now() - 3 * KEEPALIVE_S
        return sorted(n for n in self.workers if self.last_seen.get(n, 0.0) >= horizon
                      and self.last_seen.get(n, 0.0) > self._late_since.get(n, float("-inf")))

    def status(self) -> dict:
        now = self.clock.now()
        expected = [w.device for w in self.manifest.workers]
        alive = self.alive()
        missing = [d for d in expected if d not in alive]
        return {
            "ready": not missing,
            # answers still come, flagged degraded, from the fallback aggregator without the missing
            "degraded": bool(missing) and self.manifest.fallback(missing) is not None,
            "central": self.manifest.central.device,
            "workers": alive,
            "missing": missing,
            # workers whose answers were left out in the last minute (NaN features, a wrong shape, an error)
            "faults": {n: why for n, (when, why) in sorted(self._faults.items()) if now - when <= 60.0},
            "model": self.manifest.model.get("name"),
        }

    def _deadline_s(self, header) -> float:
        """Seconds this request may wait for workers: its budget, the client's ``deadline_ms``
        (the time left when it sent the request, at most this node's ``timeout_s``, its
        default), less a reserve for what follows the wait.

        The deadline is the client's: by then its reply must be on the wire. After the last
        feature arrives, this node still aggregates, serialises and sends, and a request is
        stamped on arrival only when this node next reads its socket (it may be aggregating
        another round). So the wait ends ``min(10% of the budget, 25 ms)`` early; without that,
        replies under load came a few ms late (docs/benchmarks.md, "A worker killed under
        four clients")."""
        if "deadline_ms" not in header:
            budget = self.timeout_s
        else:
            ms = protocol.number(header, "deadline_ms")
            if not 1.0 <= ms <= 3.6e6:
                raise protocol.ProtocolError("bad_header", f"deadline_ms {ms!r} must be between 1 and 3600000")
            budget = min(self.timeout_s, ms / 1e3)
        return budget - min(REPLY_RESERVE_FRACTION * budget, REPLY_RESERVE_S)

    def _admit(self, msg: protocol.Message) -> protocol.Message:
        """Refuse, by name, an ``infer`` that cannot be served, before it is queued; returns the
        message to queue. Encoded images are decoded and preprocessed here, once: the message
        then holds the model input as its tensor (this node's own models run on it) and the
        files as they came (a CoFormer bundle's workers are sent those, not the tensor)."""
        if msg.images is not None:
            if msg.header.get("input_index") is not None:
                raise protocol.ProtocolError("bad_header", "a request sends images or an input_index, not both")
            msg = dataclasses.replace(msg, tensor=encoded_input(msg.images, self.manifest))
        if msg.tensor is None:
            raise protocol.ProtocolError("bad_payload", "infer needs the model input as its tensor")
        index = msg.header.get("input_index")
        if index is not None and not self.strategy.takes_index:
            raise protocol.ProtocolError("bad_header", f"input_index is not for a bundle of strategy "
                                                       f"{self.manifest.strategy!r}: send the input")
        if index is not None and (not isinstance(index, list) or len(index) != msg.tensor.shape[0]):
            raise protocol.ProtocolError("bad_index", f"input_index {str(index)[:80]} must list one row per sample "
                                                      f"of the batch of {msg.tensor.shape[0]}")
        if index is not None and _index_bytes(index) > MAX_INDEX_BYTES:  # it must fit the workers' header
            raise protocol.ProtocolError("bad_index", f"input_index takes {_index_bytes(index)} bytes as JSON; "
                                                      f"at most {MAX_INDEX_BYTES} are forwarded to the workers")
        if msg.tensor.dtype.kind == "f" and not np.isfinite(msg.tensor).all():
            raise protocol.ProtocolError("bad_payload", f"the input holds {int((~np.isfinite(msg.tensor)).sum())} "
                                                        "NaN or infinite values")
        if self.manifest.input.is_text:
            check_tokens(msg.tensor, self.manifest.input.preprocessing)
        return msg

    def _infer(self, x: np.ndarray, index, deadline: float, images=None) -> tuple[np.ndarray, dict]:
        """The bundle's answer for the (admitted) batch ``x``, and the reply's header fields.
        ``images``: the encoded files ``x`` was decoded from, which CoFormer's workers are sent
        in its place (each decodes them itself); the other strategies send what they always do."""
        status = self.status()
        fallback_ok = self.strategy.can_degrade(status["missing"])
        if not status["ready"] and not fallback_ok:
            raise protocol.ProtocolError("not_ready", f"waiting for workers {status['missing']} to register")
        t0 = time.perf_counter()
        acct = _Account()
        acct.deadline, acct.images = deadline, images
        out = self.strategy.run(x, index, acct)
        t_end = time.perf_counter()
        return out, dict(
            task=self.manifest.task_kind,
            # the devices whose features this answer lacks (answered by their fallback aggregator)
            degraded=acct.degraded,
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

    # -- what a strategy drives (coformer.runtime.strategies) ----------------
    def run_own(self, name: str, x: np.ndarray, acct: "_Account", run=None):
        """One of the central node's models on ``x`` (or ``run(engine)``'s result), held to its
        device's share."""
        engine = self.own_models[name]
        queued = self._throttle.queued_s()
        if run is not None:
            out = run(engine)
        else:
            out = next(iter(engine.infer(model_feeds(engine, x, self.manifest.input.preprocessing)).values()))
        idle = self._throttle.after_compute(engine.last_compute_ms / 1e3, engine.last_cpu_ms / 1e3, queued_s=queued)
        self._throttle.waiting()  # a baseline's next model on this device starts its own clock
        acct.central_ms += queued * 1e3 + engine.last_compute_ms + idle * 1e3  # device time, as workers report it
        return out

    def exchange(self, requests: dict, batch: int, acct: "_Account", own=None, partial: bool = False):
        """Send each worker its request ``(model, tensor or None, header fields)``, run ``own()``
        here meanwhile, then gather every answer; returns ``(own's result, {worker: output})``.
        With ``partial``, a worker that cannot be reached or is late at the request's
        deadline is left out of the outputs instead of failing the request."""
        rid = self.next_id
        self.next_id += 1
        t0 = time.perf_counter()
        expected = {}
        for name, (model, tensor, extra) in requests.items():
            fields = dict(extra) if model is None else {"model": model, **extra}
            frames = protocol.encode("infer", rid, tensor, **fields)
            acct.bytes_to += sum(len(f) for f in frames)
            ident = self.workers.get(name)
            if ident is None or not self._send_back(ident, frames):
                self._names.pop(self.workers.pop(name, b""), None)
                if partial:
                    continue
                raise protocol.ProtocolError("not_ready", f"worker {name}'s connection is gone; waiting for it to "
                                                          "register again")
            art = self.manifest.device(name)
            expected[name] = (batch, *(art.models[model].output_shape if model is not None else (art.feature_dim,)))
        if expected:
            # Let ZeroMQ's I/O thread put the requests on the wire before this thread computes:
            # where both share a core (an emulated device, a single-core board) the scheduler
            # otherwise lets the compute run on, and the workers get their requests only after
            # it (docs/benchmarks.md has the dispatch delays with and without the yield).
            # Costs nothing where a core is free.
            _yield_cpu()
        t_sent = time.perf_counter()
        own_before = acct.central_ms
        result = own() if own is not None else None
        t_own = time.perf_counter()
        own_ms = acct.central_ms - own_before
        gathered = self._gather(rid, expected, acct.deadline, partial) if expected else {"features": {}, "compute_ms": {},
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
        last = max(gathered["arrival"], key=gathered["arrival"].get) if gathered["arrival"] else None
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
    def _gather(self, rid: int, expected: dict, deadline: Optional[float] = None, partial: bool = False) -> dict:
        pending = {"id": rid, "expected": expected, "features": {}, "compute_ms": {}, "service_ms": {},
                   "queued_ms": {}, "arrival": {}, "wire_bytes": 0, "failed": {}}
        deadline = deadline if deadline is not None else self.clock.now() + self.timeout_s
        # A worker that misses a round it had a fair chance at is not waited for again until it is
        # heard from; a round that starts with its deadline nearly spent (it waited in the queue)
        # says nothing about the workers.
        fair = deadline - self.clock.now() >= LATE_AFTER_S
        while len(pending["features"]) + len(pending["failed"]) < len(expected):
            left_ms = int((deadline - self.clock.now()) * 1e3)
            wait_ms = left_ms if self._probe_until is None else min(left_ms, PROBE_MS)
            events = self.clock.poll(self._poller, wait_ms) if left_ms > 0 else {}
            if self._monitor in events:  # a worker whose connection closed is not waited for
                self._on_disconnect(pending)
            elif self._probe_until is not None:
                self._probe(pending)
            if self.front in events:  # requests arriving meanwhile are queued now: their deadlines run from here
                self._drain_front()
            if self.back not in events and left_ms > 0 and self.clock.now() < deadline:
                continue
            if self.back not in events:
                if partial:
                    now = self.clock.now()
                    for name in set(expected) - set(pending["features"]) if fair else ():
                        self._late_since[name] = now  # not waited for again until it is heard from
                    return pending  # the caller answers from what arrived, flagged degraded
                late = sorted(set(expected) - set(pending["features"]))
                raise protocol.ProtocolError("timeout", f"workers {late} did not answer within the deadline "
                                                        f"({self.timeout_s:g} s at most)")
            self._on_back(self._recv_back(), pending)
        failed = pending["failed"]
        if failed:
            # A fault in the client's request (a bad input_index) keeps its code when every worker
            # asked says so: one worker's say-so (a forged error) does not make it the client's.
            codes = {code for code, _ in failed.values()}
            if len(failed) == len(expected) and len(codes) == 1 and next(iter(codes)) in _CLIENT_FAULTS:
                raise protocol.ProtocolError(next(iter(codes)), "; ".join(m for _, m in failed.values()))
            if not partial:  # a baseline's or PRISM's round needs every worker
                raise protocol.ProtocolError("worker_error", "; ".join(m for _, m in failed.values()))
            # a misbehaving worker is left out of this answer like a dead one (the caller flags it degraded)
        return pending

    def _fail(self, pending: dict, name: str, code: str, message: str) -> None:
        """Worker ``name``'s part of this round failed (its error, or an answer that cannot be
        used): it is not waited for, and is remembered in the status's ``faults``."""
        pending["failed"][name] = (code, f"worker {name}: {message}"[:500])
        self._faults[name] = (self.clock.now(), f"{code}: {message}"[:300])
        log.warning("worker %s left out of request %d: %s: %s", name, pending["id"], code, message[:200])

    def _on_disconnect(self, pending: Optional[dict]) -> None:
        """A connection on the worker socket closed: each registered worker is sent a no-op
        (``welcome``, which a worker takes as it takes any); ZeroMQ refuses it at once for a
        connection that is gone (ROUTER_MANDATORY), and that worker leaves the ready set, and
        this round if it was waited on."""
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor.poll(0):
            recv_monitor_message(self._monitor)
        # The event can come before the socket has dropped the connection's route, and then the
        # probe still goes through: it is repeated every PROBE_MS for PROBE_S (a closed worker was
        # sometimes counted ready for an hour of silence in tests/tools/test_key_holders.py).
        self._probe_until = self.clock.now() + PROBE_S
        self._probed_at = float("-inf")  # now, whatever the last probe was
        self._probe(pending)

    def _probe(self, pending: Optional[dict]) -> None:
        """Each registered worker sent a no-op (see :meth:`_on_disconnect`); one whose connection
        is gone is dropped. Stops repeating once ``PROBE_S`` after the last disconnect."""
        now = self.clock.now()
        if self._probe_until is not None and now > self._probe_until:
            self._probe_until = None
        if now - self._probed_at < PROBE_MS / 1e3:  # at most once a PROBE_MS
            return
        self._probed_at = now
        for name, ident in list(self.workers.items()):
            try:
                self.back.send_multipart([ident] + protocol.encode("welcome", 0), flags=zmq.NOBLOCK)
                continue
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    continue  # there but busy (a full queue): not gone
            self._names.pop(self.workers.pop(name), None)
            log.info("worker %s: its connection closed", name)
            if (pending is not None and name in pending["expected"] and name not in pending["features"]
                    and name not in pending["failed"]):
                pending["failed"][name] = ("not_ready", f"worker {name}: its connection closed")

    def _recv_back(self) -> tuple[list[bytes], Optional[str]]:
        """One message from the worker socket, and under CURVE the z85 public key its connection
        was authenticated with (ZAP's User-Id; None on plain TCP)."""
        if not self.secure:
            return self.back.recv_multipart(), None
        parts = self.back.recv_multipart(copy=False)
        user = parts[-1].get("User-Id") if len(parts) > 1 else None
        return [p.bytes for p in parts], user

    def _on_back(self, received: tuple[list[bytes], Optional[str]], pending: Optional[dict]) -> None:
        frames, user = received
        if not frames:
            return
        ident, rest = frames[0], frames[1:]
        name = self._names.get(ident, "")  # the device this connection registered as
        if name:
            self.last_seen[name] = self.clock.now()
        try:
            msg = protocol.decode(rest)
        except protocol.ProtocolError as e:
            log.warning("bad message from worker %s: %s", name, e)  # its answer may still come
            return
        if msg.op == "hello":
            self._register(ident, msg, user)
            return
        if not name:
            self._send_back(ident, protocol.error_frames(msg.id, "unknown_worker", "send hello first"))
            return
        if pending is None:
            return  # a late answer to a request that already timed out
        want = pending["expected"].get(name)
        waiting = want is not None and name not in pending["features"] and name not in pending["failed"]
        if msg.op == "error" and msg.id == 0 and waiting:
            # a worker that could not read a request's header cannot name it: it is this round's
            # (the only request it has been sent), and it ends this worker's part of the wait
            self._fail(pending, name, str(msg.header.get("code")), str(msg.header.get("message")))
            return
        if msg.id != pending["id"] or not waiting:
            return  # a late answer to a request that already timed out, or one not asked for
        if msg.op == "error":
            self._fail(pending, name, str(msg.header.get("code")), str(msg.header.get("message")))
            return
        t = msg.tensor
        dtype = self.wire_dtype
        if msg.op != "features" or t is None or t.dtype != dtype or t.shape != tuple(want):
            got = None if t is None else (str(t.dtype), list(t.shape))
            self._fail(pending, name, "bad_answer", f"sent {msg.op} {got}, expected {dtype} {list(want)}")
            return
        try:
            timings = {k: protocol.number(msg.header, k) for k in ("compute_ms", "service_ms", "queued_ms")}
        except protocol.ProtocolError as e:
            self._fail(pending, name, "bad_answer", str(e))
            return
        bogus = [k for k, v in timings.items() if not 0.0 <= v <= MAX_REPORTED_MS]
        if bogus:  # echoed into clients' timings: a peer's number is checked like its tensor
            self._fail(pending, name, "bad_answer", f"{bogus[0]} {timings[bogus[0]]!r} is not in 0..{MAX_REPORTED_MS:g}")
            return
        bad = self._implausible(name, t)
        if bad:  # NaN, inf or 1e30 features would make the answer garbage, unflagged
            self._fail(pending, name, "bad_features", bad)
            return
        pending["features"][name] = t if t.dtype == np.float32 else t.astype(np.float32)  # the aggregator's input
        pending["arrival"][name] = time.perf_counter()
        for k, v in timings.items():
            pending[k][name] = v
        pending["wire_bytes"] += msg.wire_bytes

    def _implausible(self, name: str, t: np.ndarray) -> Optional[str]:
        """Why worker ``name``'s features cannot be used (None: they can): a value that is not
        finite, or one far beyond any the compile saw that device send (``FEATURE_MARGIN`` times
        its largest on the calibration data, the manifest's ``expected.feature_abs_max``; a
        bundle from before that was recorded is held to ``FEATURE_ABS_LIMIT``). The intermediate
        tensors of the baselines and PRISM are held to being finite only."""
        if not np.isfinite(t).all():
            return f"features hold {int((~np.isfinite(t)).sum())} NaN or infinite values"
        if not self.strategy.fuses:  # a baseline's hidden states or PRISM's means: no range recorded
            return None
        seen = (self.manifest.expected.get("feature_abs_max") or {}).get(name)
        limit = FEATURE_MARGIN * float(seen) if seen else FEATURE_ABS_LIMIT
        biggest = float(np.abs(t).max()) if t.size else 0.0
        if biggest > limit:
            return f"a feature of {biggest:.3g} is beyond the {limit:.3g} this device's features stay within"
        return None

    def _register(self, ident: bytes, msg: protocol.Message, user: Optional[str]) -> None:
        """A ``hello``: connection ``ident`` becomes worker ``device``, if it is one of the bundle's,
        serves this bundle, and (under CURVE) authenticated with that device's own key ``user``,
        so that one device's key can only ever be that device. A device registered again from
        another connection (a restarted worker) is that connection from now on."""
        name = str(msg.header.get("device", ""))[:64]
        worker_names = [w.device for w in self.manifest.workers]
        if name not in worker_names:
            reply = protocol.error_frames(0, "bad_hello", f"device {name!r} is not a worker of this bundle ({worker_names})")
        elif self.secure and (user is None or self.keys.devices.get(name) != user.encode()):
            self._refuse(ident, name, user)
            reply = protocol.error_frames(0, "bad_hello", f"this connection's key is not device {name!r}'s")
        elif msg.header.get("digest") != self.digest:
            reply = protocol.error_frames(0, "bad_hello", f"worker {name!r} serves a different bundle (manifest digest differs)")
        else:
            other = self._names.get(ident)
            if other is not None and other != name:  # (plain TCP) this connection was another device
                self.workers.pop(other, None)
            old = self.workers.get(name)
            if old is not None and old != ident:  # a restarted worker: its old connection is not it
                self._names.pop(old, None)
            self.workers[name] = ident
            self._names[ident] = name
            self.last_seen[name] = self.clock.now()
            reply = protocol.encode("welcome", 0)
            log.debug("worker %s registered", name)
        self._send_back(ident, reply)

    def _refuse(self, ident: bytes, name: str, user: Optional[str]) -> None:
        now = self.clock.now()
        if now - self._refused.get(ident, -60.0) >= 60.0:  # logged at most once a minute per connection
            self._refused[ident] = now
            if len(self._refused) > 1024:
                self._refused.clear()
            log.warning("worker socket: a connection with key %s said it is %r, whose key it is not", user, name)

    def _send_back(self, ident: bytes, frames: list[bytes]) -> bool:
        """Send to a worker socket peer; False when its connection is gone or its queue is full."""
        try:
            self.back.send_multipart([ident] + frames, flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            return False


_CLIENT_FAULTS = ("bad_index", "no_local_inputs")
# What a request's input_index may take as JSON, and a batch's joined index: the rest of the
# workers' header (op, id, model, session) fits in what protocol.MAX_HEADER_BYTES leaves.
MAX_INDEX_BYTES = protocol.MAX_HEADER_BYTES - 512
# Requests are batched only with deadlines within this fraction of the head's time left, or within
# DEADLINE_SLACK_S of it: the batch is then served to a deadline each of its requests nearly had.
DEADLINE_RATIO = 0.8
DEADLINE_SLACK_S = 0.002


def _index_bytes(index) -> int:
    return len(json.dumps(index, separators=(",", ":")))


def _deadlines_close(head: float, other: float, now: float) -> bool:
    """Whether a request with deadline ``other`` may be served in a batch that waits until
    ``head``'s (both readings of the node's clock): a batch ends at its earliest deadline, so a request
    whose own is much later would be cut short (degraded) by another client's short one."""
    a, b = head - now, other - now
    return abs(a - b) <= DEADLINE_SLACK_S or min(a, b) >= DEADLINE_RATIO * max(a, b)
MAX_REPORTED_MS = 3.6e6  # a worker's compute, service or queueing time beyond an hour is not a measurement
# Features are checked against what the compile saw each device send (expected.feature_abs_max):
# a margin for inputs unlike the calibration data, far below what turns an answer into garbage.
FEATURE_MARGIN = 100.0
FEATURE_ABS_LIMIT = 1e4  # a bundle that records no feature range (compiled before it was recorded)
LATE_AFTER_S = 0.05  # a worker silent this long past dispatch, at a request's deadline, counts as late
# The end of a request's wait for workers comes this much before its reply deadline (see _deadline_s).
REPLY_RESERVE_FRACTION = 0.1
REPLY_RESERVE_S = 0.025


class _Account:
    """What one request cost, summed over its rounds (a baseline makes many)."""

    def __init__(self) -> None:
        self.central_ms = self.wait_ms = self.aggregate_ms = self.dispatch_ms = self.own_ms = 0.0
        self.bytes_to = self.bytes_from = self.rounds = 0
        self.own_in_rounds = self.round_compute = self.round_transfer = 0.0
        self.workers_compute: dict[str, float] = {}
        self.workers_service: dict[str, float] = {}
        self.workers_queued: dict[str, float] = {}  # waiting for a core shared with another emulated device
        self.degraded: list[str] = []
        self.deadline: Optional[float] = None  # the node's clock reading by which workers must have answered
        self.images = None  # the request's encoded files, which CoFormer's workers are sent in place of x


def run_central(bundle_dir: Path, front: str, back: str, **kwargs) -> None:
    """Serve until SIGTERM/SIGINT; ``kwargs`` are :class:`CentralNode`'s."""
    node = CentralNode(bundle_dir, front, back, **kwargs)
    node.bind()
    node.serve(ready_stream=sys.stdout)
