"""Engine timing, the way trtexec does it, without torch.

``benchmark_engine`` warms up for ``warmup_ms``, then runs at least
``iterations`` inferences *and* for at least ``duration_s`` seconds, and
reports latency statistics (median, mean, p90, p99, min, max), throughput, the
engine's own compute time separately from host-side time (input and output
handling outside the engine's run: the H2D/D2H of a GPU backend), peak memory
and an environment record. Defaults and words follow trtexec (``--warmUp=200``
ms, ``--iterations=10``, ``--duration=3`` s, ``--idleTime=0`` ms) so TensorRT
users read it as they read trtexec.

``time_samples`` runs given samples one by one (batch 1), e.g. a test split,
and returns every output with its latency.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from coformer.runtime.engines import open_engine
from coformer.runtime.errors import CoFormerError
from coformer.runtime.limits import DeviceLimits, apply_limits
from coformer.runtime.stats import lone_shape, summarise  # noqa: F401  (re-exported: this module's API)


@dataclass(frozen=True)
class Timing:
    """One benchmark: all times in milliseconds."""

    latency_ms: Mapping[str, float]
    compute_ms: Mapping[str, float]
    host_ms: Mapping[str, float]
    throughput_qps: float
    iterations: int
    total_s: float
    warmup_ms: float
    batch: int
    peak_rss_bytes: int
    environment: Mapping[str, Any] = field(default_factory=dict)
    compute_samples_ms: tuple[float, ...] = ()  # every iteration's compute time, if asked for
    # every measured iteration as trtexec's --exportTimes record (ms since the first), if asked for
    trace: tuple[Mapping[str, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def trtexec(self) -> dict[str, Any]:
        """The run's trtexec "Performance summary" (:func:`coformer.runtime.trtexec.trace_summary`),
        from ``trace``; benchmark with ``keep_trace=True``."""
        from coformer.runtime.trtexec import trace_summary

        if not self.trace:
            raise CoFormerError("this timing kept no trace: benchmark with keep_trace=True")
        return trace_summary(self.trace, self.batch)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(backend: str, threads: int, throttle_desc: str, precision: str = "fp32") -> dict[str, Any]:
    version = "unknown"
    if backend.startswith("onnxruntime"):
        import onnxruntime

        version = onnxruntime.__version__
    elif backend == "tensorrt":
        from coformer.runtime.tensorrt_backend import import_tensorrt

        version = str(import_tensorrt().__version__)
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "threads": threads,
        "backend": backend,
        "backend_version": version,
        "precision": precision,
        "limits": throttle_desc,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def random_inputs(engine, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs matching the model's declared inputs, dynamic axes filled by :func:`lone_shape`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, dims, dtype in engine.input_specs():
        shape = lone_shape(dims, batch)
        feeds[name] = (rng.standard_normal(shape).astype(dtype) if np.dtype(dtype).kind == "f"
                       else rng.integers(0, 2, size=shape).astype(dtype))
    return feeds


def trace_record(engine, start_ms: float, end_ms: float) -> dict[str, float]:
    """One iteration in trtexec's ``--exportTimes`` fields, ms since the run's start.

    On the CPU backend an inference is synchronous and moves nothing between host and
    device: H2D and D2H are empty and compute spans the run. A GPU backend reports the
    phases (``last_h2d_ms``, ``last_compute_ms``, ``last_d2h_ms``, ``last_enqueue_ms``):
    they are laid end to end from the iteration's start, which is where trtexec's CUDA
    events put them on one stream (choice written down: the host's start stands for the
    first event, a few microseconds early)."""
    h2d, d2h = float(getattr(engine, "last_h2d_ms", 0.0)), float(getattr(engine, "last_d2h_ms", 0.0))
    if not h2d and not d2h:
        return {"startEnqMs": start_ms, "endEnqMs": end_ms, "startH2dMs": start_ms, "endH2dMs": start_ms,
                "startComputeMs": start_ms, "endComputeMs": end_ms, "startD2hMs": end_ms, "endD2hMs": end_ms}
    compute = float(engine.last_compute_ms)
    enqueue = float(getattr(engine, "last_enqueue_ms", compute))
    a, b = start_ms + h2d, start_ms + h2d + compute
    return {"startEnqMs": a, "endEnqMs": a + enqueue, "startH2dMs": start_ms, "endH2dMs": a,
            "startComputeMs": a, "endComputeMs": b, "startD2hMs": b, "endD2hMs": b + d2h}


def _warm_up(engine, feeds: Mapping[str, np.ndarray], throttle, warmup_ms: float, duty_pauses: bool) -> None:
    """Run ``engine`` for ``warmup_ms`` (at least once), held to the device's limits, untimed."""
    end_warmup = time.perf_counter() + warmup_ms / 1e3
    while True:
        engine.infer(feeds)
        throttle.after_compute(engine.last_compute_ms / 1e3, engine.last_cpu_ms / 1e3, duty_pauses)
        if time.perf_counter() >= end_warmup:
            break


def benchmark_engine(
    path: Path,
    backend: str = "onnxruntime",
    warmup_ms: float = 200.0,
    iterations: int = 10,
    duration_s: float = 3.0,
    threads: int = 1,
    batch: int = 1,
    inputs: Optional[Mapping[str, np.ndarray]] = None,
    limits: DeviceLimits = DeviceLimits(),
    idle_ms: float = 0.0,
    keep_samples: bool = False,
    duty_pauses: bool = True,
    keep_trace: bool = False,
    precision: str = "fp16",
) -> Timing:
    """Benchmark one model file (see the module doc); the process is held to ``limits``.

    ``idle_ms`` sleeps between iterations (trtexec ``--idleTime``): a served
    device idles between requests, and a CPU quota treats a burst after idle
    differently from back-to-back work. ``keep_samples`` returns every
    iteration's compute time in ``compute_samples_ms``. ``duty_pauses=False``
    runs a duty-cycled device back to back and charges each run its device time
    (CPU time / share) without pausing: the emulation's pauses between runs
    make the next run start cold, which is serving's condition, not a
    benchmark's (see ``coformer.runtime.profile``).

    ``keep_trace`` records every measured iteration in trtexec's ``--exportTimes`` fields
    (``Timing.trace``, summarised by ``Timing.trtexec``; :func:`trace_record`). "GPU Compute
    Time" is the engine's own run, without the emulated device's duty-cycle idle (which
    ``compute_ms`` adds).

    On ``tensorrt`` an ONNX ``path`` is built into an engine first (beside it, reused while it
    matches) at ``precision``, with its dynamic axes at the shapes of ``inputs`` or at ``batch``.
    """
    if iterations < 1 or duration_s < 0 or warmup_ms < 0:
        raise CoFormerError(f"iterations {iterations} must be >= 1, duration {duration_s} and warm-up "
                            f"{warmup_ms} must be >= 0")
    throttle = apply_limits(limits, "benchmark")
    try:
        shapes = {k: np.shape(v) for k, v in inputs.items()} if inputs is not None else None
        with open_engine(Path(path), backend, threads, precision=precision, shapes=shapes, batch=batch) as engine:
            feeds = dict(inputs) if inputs is not None else random_inputs(engine, batch)
            precision = getattr(engine, "precision", "fp32")
            _warm_up(engine, feeds, throttle, warmup_ms, duty_pauses)
            lat, comp, trace = [], [], []
            start = time.perf_counter()
            while len(lat) < iterations or time.perf_counter() - start < duration_s:
                if idle_ms:
                    time.sleep(idle_ms / 1e3)
                t0 = time.perf_counter()
                engine.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
                t1 = time.perf_counter()
                idle = throttle.after_compute(engine.last_compute_ms / 1e3, engine.last_cpu_ms / 1e3, duty_pauses)
                lat.append((time.perf_counter() - t0) * 1e3)
                comp.append(engine.last_compute_ms + idle * 1e3)
                if keep_trace:
                    trace.append(trace_record(engine, (t0 - start) * 1e3, (t1 - start) * 1e3))
            total = time.perf_counter() - start
    finally:
        throttle.release()
    host = np.maximum(np.asarray(lat) - np.asarray(comp), 0.0)
    return Timing(
        latency_ms=summarise(lat),
        compute_ms=summarise(comp),
        host_ms=summarise(host),
        throughput_qps=len(lat) * batch / (total - len(lat) * idle_ms / 1e3),
        iterations=len(lat),
        total_s=total,
        warmup_ms=warmup_ms,
        batch=batch,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        environment=environment(backend, threads, throttle.describe(), precision),
        compute_samples_ms=tuple(comp) if keep_samples else (),
        trace=tuple(trace),
    )


def time_samples(
    model: Path,
    inputs: np.ndarray,
    limits: DeviceLimits = DeviceLimits(),
    threads: int = 1,
    warmup: int = 10,
    backend: str = "onnxruntime",
) -> tuple[np.ndarray, np.ndarray]:
    """Run each sample of ``inputs`` (batch 1) and return (outputs, latencies in ms).

    Latency is the engine's compute time, stretched by the duty cycle when the
    limits use one, i.e. the time the emulated device would take.
    """
    throttle = apply_limits(limits, "timing")
    try:
        with open_engine(Path(model), backend, threads) as engine:
            names = engine.input_names

            def feeds(x: np.ndarray) -> dict[str, np.ndarray]:
                # a model with several inputs (a text model's ids, mask, ...) takes the rows of a packed sample
                b = x[None]
                return {names[0]: b} if len(names) == 1 else {n: np.ascontiguousarray(b[:, i]) for i, n in enumerate(names)}

            for i in range(warmup):
                engine.infer(feeds(inputs[i % len(inputs)]))
            outs, lat = [], []
            for x in inputs:
                out = next(iter(engine.infer(feeds(x)).values()))
                idle = throttle.after_compute(engine.last_compute_ms / 1e3, engine.last_cpu_ms / 1e3)
                outs.append(out[0])
                lat.append(engine.last_compute_ms + idle * 1e3)
    finally:
        throttle.release()
    return np.stack(outs), np.asarray(lat)
