"""Time an engine on given inputs, one sample at a time, under device limits.

The measurement follows trtexec's habits: warm-up runs first, then every
sample timed on its own; the summary gives the median and p90/p99.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from coformer.runtime.engines import open_engine
from coformer.runtime.limits import DeviceLimits, apply_limits


def summarise(latencies_ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(latencies_ms, dtype=np.float64)
    if a.size == 0:
        return {"count": 0}
    return {
        "count": int(a.size),
        "median": float(np.median(a)),
        "mean": float(a.mean()),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "min": float(a.min()),
        "max": float(a.max()),
    }


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
            name = engine.input_names[0]
            for i in range(warmup):
                engine.infer({name: inputs[i % len(inputs)][None]})
            outs, lat = [], []
            for x in inputs:
                out = next(iter(engine.infer({name: x[None]}).values()))
                idle = throttle.after_compute(engine.last_compute_ms / 1e3)
                outs.append(out[0])
                lat.append(engine.last_compute_ms + idle * 1e3)
    finally:
        throttle.release()
    return np.stack(outs), np.asarray(lat)
