"""CoFormer's device runtime: bundle manifests, engines, the wire protocol,
worker, central node and client. Needs numpy and pyzmq only; never torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from coformer.runtime.errors import CoFormerError

__all__ = ["CoFormerError", "benchmark_engine"]


def benchmark_engine(path: Path, backend: str = "onnxruntime", warmup_ms: float = 200.0, duration_s: float = 3.0,
                     iterations: int = 10, threads: int = 1, batch: int = 1,
                     inputs: Optional[Mapping[str, Any]] = None, export_times: Optional[Path] = None,
                     precision: str = "fp16") -> dict[str, Any]:
    """Time one model as trtexec does and return its "Performance summary", in trtexec's words
    and statistics (:func:`coformer.runtime.trtexec.trace_summary`): ``Throughput`` (qps),
    ``Latency``, ``End-to-End Host Latency``, ``Enqueue Time``, ``H2D Latency``, ``GPU Compute
    Time``, ``D2H Latency`` (each min, max, mean, median and the 90/95/99th percentiles, ms),
    ``Total Host Walltime`` and ``Total GPU Compute Time`` (s), with ``backend``,
    ``environment`` and ``iterations``.

    Warms up for ``warmup_ms``, then runs at least ``iterations`` times and ``duration_s``
    seconds (trtexec's ``--warmUp``, ``--iterations``, ``--duration``); ``inputs`` by name,
    or random ones of the model's shapes; ``export_times`` also writes every run in
    trtexec's ``--exportTimes`` JSON. ``backend``: see :mod:`coformer.runtime.engines`; on
    ``tensorrt`` ``path`` is an engine, or an ONNX file whose engine is built at ``precision``
    beside it first (and reused).
    """
    from coformer.runtime.timing import benchmark_engine as _benchmark
    from coformer.runtime.trtexec import write_export_times

    t = _benchmark(Path(path), backend, warmup_ms, iterations, duration_s, threads, batch, inputs=inputs,
                   keep_trace=True, precision=precision)
    if export_times is not None:
        write_export_times(t.trace, Path(export_times))
    return {**t.trtexec, "backend": backend, "environment": dict(t.environment), "iterations": t.iterations}
