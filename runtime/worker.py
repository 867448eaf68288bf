"""A worker: one device's process. It runs its sub-model on each input the
central node sends and answers with the pooled feature vector X_n."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import zmq

from coformer.runtime import protocol
from coformer.runtime.engines import open_device_engines
from coformer.runtime.errors import CoFormerError
from coformer.runtime.limits import DeviceLimits, apply_limits
from coformer.runtime.manifest import load_manifest, manifest_digest
from coformer.runtime.security import RoleKeys, check_local_signature, curve_client, require_security
from coformer.runtime.strategies import strategy_class
from coformer.runtime.text import check_tokens

log = logging.getLogger("coformer.worker")
HELLO_INTERVAL_S = 1.0  # until the central node welcomes us
WELCOME_TIMEOUT_S = 5.0  # unwelcomed this long: say so and reconnect
# Afterwards, a heartbeat: the central node counts a worker silent for 3 of these as gone (so a
# killed or hung device leaves the ready set within ~3 s), and a restarted central node learns
# who is there. One ~200-byte message a second per worker.
KEEPALIVE_S = 1.0
# ZeroMQ's own heartbeats (ZMTP PING/PONG) on every link, both ways: a connection whose peer
# stopped answering (a hung process, a cable pulled) is closed after this long, and reconnected.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000


def heartbeats(sock) -> None:
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
POLL_MS = 100


def input_limits(manifest) -> protocol.TensorLimits:
    spec = manifest.input
    return protocol.TensorLimits(spec.dtype, spec.shape, spec.max_batch, dynamic=spec.dynamic_axes)


def model_limits(manifest, art) -> dict[str, protocol.TensorLimits]:
    """What each of a device's models accepts; ``""`` is a CoFormer device's one model."""
    if not art.models:
        return {"": input_limits(manifest)}
    return {name: protocol.TensorLimits(m.dtype, m.input_shape, manifest.input.max_batch)
            for name, m in art.models.items()}


def header_limits(limits: dict[str, protocol.TensorLimits]):
    """``protocol.decode``'s limits for a request that names one of ``limits``' models."""
    default = next(iter(limits)) if len(limits) == 1 else None

    def pick(header) -> protocol.TensorLimits:
        name = header.get("model", default)
        if not isinstance(name, str) or name not in limits:
            raise protocol.ProtocolError("bad_model", f"model {name!r} is not one of this device's {sorted(limits)}")
        return limits[name]

    return pick


def load_local_inputs(path: Optional[Path], manifest) -> Optional[np.ndarray]:
    """The inputs this device captures itself (the paper's setting: every device sees the
    same frame), so the central node sends an index instead of the tensor."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise CoFormerError(f"local inputs {path} do not exist")
    x = np.load(path, mmap_mode="r")
    spec = manifest.input
    per_sample = tuple(x.shape[1:])
    fits = len(per_sample) == len(spec.shape) and all(
        (1 <= s <= m) if a in spec.dynamic_axes else s == m for a, (s, m) in enumerate(zip(per_sample, spec.shape)))
    if str(x.dtype) != spec.dtype or not fits:  # a dynamic axis (a text input's tokens) may be shorter
        want = ", ".join(f"1..{m}" if a in spec.dynamic_axes else str(m) for a, m in enumerate(spec.shape))
        raise CoFormerError(f"local inputs {path} are {x.dtype} {list(x.shape)}, the bundle takes "
                            f"{spec.dtype} [N, {want}]")
    return np.ascontiguousarray(x)


def local_input(local, header) -> np.ndarray:
    """The batch of local inputs a request names by ``input_index`` (a list of row numbers)."""
    if local is None:
        raise protocol.ProtocolError("no_local_inputs", "this worker holds no local inputs; send the tensor")
    idx = header.get("input_index")
    if (not isinstance(idx, list) or not idx
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(local) for i in idx)):
        raise protocol.ProtocolError("bad_index", f"input_index {idx!r} must be a non-empty list of row numbers "
                                                  f"in 0..{len(local) - 1}")
    return local[idx]


def encoded_input(images, manifest) -> np.ndarray:
    """The model input for a request's encoded images (:mod:`coformer.runtime.protocol`'s
    ``images``), decoded and preprocessed here as the manifest says; a bundle without an image
    record (text, or a teacher compiled without timm's data config) refuses them, by name."""
    from coformer.runtime.images import is_image_spec, request_input

    spec = manifest.input.preprocessing
    if not is_image_spec(spec):
        raise protocol.ProtocolError("bad_payload", "this bundle records no image preprocessing: send the model "
                                                    "input as a tensor, not encoded images")
    try:
        return request_input(images, spec)
    except protocol.ProtocolError:
        raise
    except CoFormerError as e:  # no Pillow on this device: the request fails here, by name, the worker serves on
        raise protocol.ProtocolError("unsupported", str(e)) from None


def max_message_bytes(limits: protocol.TensorLimits) -> int:
    """Frames above this are dropped by ZeroMQ itself; below it, bad sizes get an error reply."""
    return max(16 << 20, 2 * limits.max_payload_bytes + protocol.MAX_HEADER_BYTES)


def install_stop_signals(stop: threading.Event) -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())


class Worker:
    """One device's role of a served bundle: its sub-model(s), and the answer to each message
    the central node sends (:meth:`handle`, no socket involved, so a test drives it message by
    message), behind a DEALER socket that :meth:`serve` runs. :func:`run_worker` is both.

    The arguments are :func:`run_worker`'s; loading (the manifest, its signature, the device's
    engines and its limits) happens here, so a bad bundle or device fails before anything
    connects. ``context`` is the ZeroMQ context :meth:`serve` makes its socket in (default: a
    new one, ended with it; a test may give its own, for ``inproc://`` endpoints).
    """

    def __init__(self, bundle_dir: Path, device: str, central: str, limits: DeviceLimits = DeviceLimits(),
                 threads: Optional[int] = None, local_inputs: Optional[Path] = None,
                 keys: Optional[RoleKeys] = None, insecure: bool = False, backend: Optional[str] = None,
                 precision: str = "fp16", context: Optional[zmq.Context] = None) -> None:
        if backend is not None:
            from coformer.runtime.engines import check_backend

            check_backend(backend)
        self.bundle_dir, self.device, self.central, self.keys = Path(bundle_dir), device, central, keys
        self.context = context
        self.secure = require_security(keys, insecure, (central,), f"worker {device}")
        manifest = self.manifest = load_manifest(bundle_dir, trust=keys.operator if keys else None)
        if keys is None:  # keyless (loopback, or --insecure): this user's own signature, where one exists
            check_local_signature(bundle_dir)
        art = self.art = manifest.device(device)
        if art.role != "worker":
            raise CoFormerError(f"device {device!r} has role {art.role!r} in this bundle; run it as the central node")
        self.limits_by_model = model_limits(manifest, art)
        self.limits_in = header_limits(self.limits_by_model)
        self.local = load_local_inputs(local_inputs, manifest)
        strategy = self.strategy = strategy_class(manifest.strategy)
        self.compute = strategy.worker_compute(manifest, art.models)  # one message's output (a strategy's own)
        self.wire_dtype = None if not strategy.fuses or manifest.feature_dtype == "float32" \
            else np.dtype(manifest.feature_dtype)
        self.throttle = apply_limits(limits, f"worker-{device}")
        try:
            self.engines = open_device_engines(bundle_dir, device, art.model_files(), backend or art.backend,
                                               threads or art.threads, precision)
        except BaseException:
            self.throttle.release()
            raise
        self.welcomed = False
        self.waiting_since = time.monotonic()  # for a welcome

    def hello(self) -> list[bytes]:
        """The registration the central node welcomes (the manifest's digest, this device's name)."""
        return protocol.encode("hello", 0, device=self.device, digest=manifest_digest(self.bundle_dir),
                               feature_dim=self.art.feature_dim)

    def handle(self, frames: list[bytes]) -> Optional[list[bytes]]:
        """The reply to one message from the central node, or None where none is due (a welcome,
        an error it reports). An ``infer`` gets its ``features`` or an ``error`` naming what was
        wrong; a ``bad_hello`` error (the wrong bundle or device name) raises: serving on cannot help."""
        t_recv = time.perf_counter()
        try:
            msg = protocol.decode(frames, self.limits_in)
        except protocol.ProtocolError as e:
            return protocol.error_frames(id_of(frames), e.code, str(e))
        except Exception as e:  # a fault a peer can cause that decode did not foresee: answer, go on
            log.exception("worker %s: message not decoded", self.device)
            return protocol.error_frames(id_of(frames), "bad_header", f"{type(e).__name__}: {e}")
        if msg.op == "welcome":
            self.welcomed = True
            return None
        if msg.op == "error":
            code = msg.header.get("code")
            if code == "unknown_worker":
                self.welcomed, self.waiting_since = False, time.monotonic()  # the central node restarted: register again
            elif code == "bad_hello":  # the wrong bundle or device name: serving on cannot help
                raise CoFormerError(f"central node refused worker {self.device!r}: {msg.header.get('message')}")
            else:
                log.warning("worker %s: the central node sent error %r: %s", self.device, code,
                            str(msg.header.get("message"))[:200])
            return None
        if msg.op != "infer":
            return protocol.error_frames(msg.id, "bad_op", f"a worker does not serve op {msg.op!r}")
        return self._infer(msg, t_recv)

    def _infer(self, msg: protocol.Message, t_recv: float) -> list[bytes]:
        engines, manifest, throttle = self.engines, self.manifest, self.throttle
        name = msg.header.get("model", next(iter(engines)) if len(engines) == 1 else None)
        try:
            if not isinstance(name, str) or name not in engines:  # (with a tensor, decode refused it)
                raise protocol.ProtocolError("bad_model", f"model {name!r} is not one of this device's "
                                                          f"{sorted(engines)}")
            engine = engines[name]
            if msg.images is not None:  # encoded files, forwarded as the client sent them
                x = encoded_input(msg.images, manifest)
            else:
                x = msg.tensor if msg.tensor is not None else local_input(self.local, msg.header)
            if msg.tensor is not None and self.strategy.worker_takes_tokens(manifest, name, bool(self.art.models)):
                check_tokens(x, manifest.input.preprocessing)
        except protocol.ProtocolError as e:
            return protocol.error_frames(msg.id, e.code, str(e))
        queued = throttle.queued_s()
        try:
            features = self.compute(engine, name, msg.header, x)
        except protocol.ProtocolError as e:
            return protocol.error_frames(msg.id, e.code, str(e))
        except Exception as e:  # this request fails, named; the worker keeps serving
            log.exception("worker %s: request %d failed in the engine", self.device, msg.id)
            return protocol.error_frames(msg.id, "engine", f"{type(e).__name__}: {e}"[:500])
        if self.wire_dtype is not None:  # float16 features: half the bytes on the link
            features = features.astype(self.wire_dtype)
        idle = throttle.after_compute(engine.last_compute_ms / 1e3, engine.last_cpu_ms / 1e3, queued_s=queued)
        return protocol.encode(
            "features", msg.id, features, device=self.device,
            # the device's time: waiting for a core a real device would not share
            # (credited against the duty cycle's pause), the engine, the pause
            compute_ms=queued * 1e3 + engine.last_compute_ms + idle * 1e3,
            queued_ms=queued * 1e3,
            # received -> reply ready: decoding, the engine, the duty cycle's
            # actual (not requested) pause
            service_ms=(time.perf_counter() - t_recv) * 1e3,
        )

    def serve(self, stop: Optional[threading.Event] = None) -> None:
        """Connect to the central node and answer it until ``stop`` is set: a ``hello`` every
        second until welcomed (so start order does not matter), then every ``KEEPALIVE_S`` (so a
        restarted central node finds it again); no welcome for ``WELCOME_TIMEOUT_S`` reconnects.
        The limits are released when it returns."""
        stop = stop or threading.Event()
        own = self.context is None
        ctx = zmq.Context() if own else self.context
        sock = ctx.socket(zmq.DEALER)
        central, device = self.central, self.device
        try:
            # no identity of its own: the central node knows this connection by its registration,
            # checked against this device's key (a name anyone could claim would be a handle to take over)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, max(max_message_bytes(x) for x in self.limits_by_model.values()))
            heartbeats(sock)
            if self.secure:
                curve_client(sock, self.keys)
            sock.connect(central)
            hello = self.hello()
            last_hello = 0.0
            self.welcomed, self.waiting_since = False, time.monotonic()
            log.info("worker %s: %s, %s", device, self.art.artifact, self.throttle.describe())
            while not stop.is_set():
                if not self.welcomed and time.monotonic() - self.waiting_since >= WELCOME_TIMEOUT_S:
                    log.warning("worker %s: no welcome from %s for %.0f s (is the central node up, serving this "
                                "bundle?); reconnecting", device, central, time.monotonic() - self.waiting_since)
                    sock.disconnect(central)
                    sock.connect(central)
                    self.waiting_since, last_hello = time.monotonic(), 0.0
                if time.monotonic() - last_hello >= (KEEPALIVE_S if self.welcomed else HELLO_INTERVAL_S):
                    sock.send_multipart(hello)
                    last_hello = time.monotonic()
                self.throttle.waiting()
                if not sock.poll(POLL_MS):
                    continue
                reply = self.handle(sock.recv_multipart())
                if reply is not None:
                    sock.send_multipart(reply)
        finally:
            sock.close(0)
            if own:
                ctx.term()
            self.throttle.release()


def run_worker(
    bundle_dir: Path,
    device: str,
    central: str,
    limits: DeviceLimits = DeviceLimits(),
    threads: Optional[int] = None,
    stop: Optional[threading.Event] = None,
    local_inputs: Optional[Path] = None,
    keys: Optional[RoleKeys] = None,
    insecure: bool = False,
    backend: Optional[str] = None,
    precision: str = "fp16",
) -> None:
    """Serve ``device``'s sub-model of the bundle to the central node at ``central``
    (:class:`Worker`, then :meth:`Worker.serve`).

    Registers with a ``hello`` carrying the manifest digest (resent every
    second until welcomed, so start order does not matter, then every
    ``KEEPALIVE_S`` so a restarted central node finds it again), then answers each
    ``infer`` with ``features``. A bad message gets an ``error`` reply; the
    worker keeps serving. Returns when ``stop`` is set or on SIGTERM/SIGINT.

    A baseline bundle's device may hold several models: each ``infer`` names
    one in ``model``. A PRISM bundle's device runs its models in turn, one per round of a
    request, keeping the request's state under the ``session`` the header names
    (:class:`coformer.runtime.prism.Sessions`; a round out of order gets ``bad_session``). With ``local_inputs`` (a .npy of model inputs), an
    ``infer`` may carry ``input_index`` instead of a tensor.

    With ``keys`` (this device's folder from ``coformer-runtime keys``) the link runs
    CURVE, pinned to the central node's key, and the bundle's signature is checked
    against the operator key in the folder. A non-loopback ``central`` without keys
    needs ``insecure``.

    ``backend`` (:data:`coformer.runtime.engines.BACKENDS`) overrides the bundle's; one this
    device cannot run is refused before anything connects. On ``tensorrt`` the device's
    engines are built at ``precision`` on first start (or whenever none matches), then loaded.
    """
    stop = stop or threading.Event()
    install_stop_signals(stop)
    Worker(bundle_dir, device, central, limits, threads, local_inputs, keys, insecure, backend, precision).serve(stop)


def id_of(frames) -> int:
    """Best-effort request id of a message that failed to parse (0 when unknown)."""
    try:
        if len(frames[0]) > protocol.MAX_HEADER_BYTES or protocol.nesting(frames[0]) > protocol.MAX_HEADER_DEPTH:
            return 0
        import json

        rid = json.loads(frames[0]).get("id", 0)
        return rid if isinstance(rid, int) and not isinstance(rid, bool) and rid >= 0 else 0
    except Exception:
        return 0
