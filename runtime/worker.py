"""A worker: one device's process. It runs its sub-model on each input the
central node sends and answers with the pooled feature vector X_n."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import zmq

from coformer.runtime import protocol
from coformer.runtime.engines import open_engine
from coformer.runtime.errors import CoFormerError
from coformer.runtime.limits import DeviceLimits, apply_limits
from coformer.runtime.manifest import load_manifest, manifest_digest

log = logging.getLogger("coformer.worker")
HELLO_INTERVAL_S = 1.0  # until the central node welcomes us
KEEPALIVE_S = 5.0  # afterwards: lets a restarted central node learn who is there
POLL_MS = 100


def input_limits(manifest) -> protocol.TensorLimits:
    spec = manifest.input
    return protocol.TensorLimits(spec.dtype, spec.shape, spec.max_batch)


def max_message_bytes(limits: protocol.TensorLimits) -> int:
    """Frames above this are dropped by ZeroMQ itself; below it, bad sizes get an error reply."""
    return max(16 << 20, 2 * limits.max_payload_bytes + protocol.MAX_HEADER_BYTES)


def install_stop_signals(stop: threading.Event) -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())


def run_worker(
    bundle_dir: Path,
    device: str,
    central: str,
    limits: DeviceLimits = DeviceLimits(),
    threads: Optional[int] = None,
    stop: Optional[threading.Event] = None,
) -> None:
    """Serve ``device``'s sub-model of the bundle to the central node at ``central``.

    Registers with a ``hello`` carrying the manifest digest (resent every
    second until welcomed, so start order does not matter, then every
    ``KEEPALIVE_S`` so a restarted central node finds it again), then answers each
    ``infer`` with ``features``. A bad message gets an ``error`` reply; the
    worker keeps serving. Returns when ``stop`` is set or on SIGTERM/SIGINT.
    """
    stop = stop or threading.Event()
    install_stop_signals(stop)
    manifest = load_manifest(bundle_dir)
    art = manifest.device(device)
    if art.role != "worker":
        raise CoFormerError(f"device {device!r} has role {art.role!r} in this bundle; run it as the central node")
    limits_in = input_limits(manifest)
    throttle = apply_limits(limits, f"worker-{device}")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        engine = open_engine(Path(bundle_dir) / art.artifact, art.backend, threads or art.threads)
        input_name = manifest.input.name
        sock.setsockopt(zmq.IDENTITY, device.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes(limits_in))
        sock.connect(central)
        digest = manifest_digest(bundle_dir)
        hello = protocol.encode("hello", 0, device=device, digest=digest, feature_dim=art.feature_dim)
        welcomed, last_hello = False, 0.0
        log.info("worker %s: %s, %s", device, art.artifact, throttle.describe())
        while not stop.is_set():
            if time.monotonic() - last_hello >= (KEEPALIVE_S if welcomed else HELLO_INTERVAL_S):
                sock.send_multipart(hello)
                last_hello = time.monotonic()
            if not sock.poll(POLL_MS):
                continue
            frames = sock.recv_multipart()
            t_recv = time.perf_counter()
            try:
                msg = protocol.decode(frames, limits_in)
            except protocol.ProtocolError as e:
                sock.send_multipart(protocol.error_frames(_id_of(frames), e.code, str(e)))
                continue
            if msg.op == "welcome":
                welcomed = True
            elif msg.op == "error":
                if msg.header.get("code") == "unknown_worker":
                    welcomed = False  # the central node restarted: register again
                else:
                    raise CoFormerError(f"central node refused worker {device!r}: {msg.header.get('message')}")
            elif msg.op == "infer":
                out = engine.infer({input_name: msg.tensor})
                features = next(iter(out.values()))
                idle = throttle.after_compute(engine.last_compute_ms / 1e3, engine.last_cpu_ms / 1e3)
                sock.send_multipart(
                    protocol.encode(
                        "features", msg.id, features, device=device,
                        compute_ms=engine.last_compute_ms + idle * 1e3,
                        # received -> reply ready: decoding, the engine, the duty cycle's
                        # actual (not requested) pause
                        service_ms=(time.perf_counter() - t_recv) * 1e3,
                    )
                )
            else:
                sock.send_multipart(protocol.error_frames(msg.id, "bad_op", f"a worker does not serve op {msg.op!r}"))
    finally:
        sock.close(0)
        ctx.term()
        throttle.release()


def _id_of(frames) -> int:
    """Best-effort request id of a message that failed to parse (0 when unknown)."""
    try:
        import json

        rid = json.loads(frames[0]).get("id", 0)
        return rid if isinstance(rid, int) and rid >= 0 else 0
    except Exception:
        return 0
