"""Pure helpers of the timing code, in a module that imports nothing of the runtime's: the
benchmark (:mod:`coformer.runtime.timing`), trtexec's reader (:mod:`coformer.runtime.trtexec`)
and the TensorRT engine builder (:mod:`coformer.runtime.tensorrt_engines`) all use them, and
none of them may import another for it (an import cycle)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def summarise(latencies_ms: Sequence[float]) -> dict[str, float]:
    """median, mean, p90, p99, min, max (ms) and the count."""
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


def lone_shape(dims: Sequence[Optional[int]], batch: int) -> list[int]:
    """The shape a lone ONNX's input takes where nothing gives one (None: a dynamic axis): the
    first dynamic axis is the batch, any other (a text model's sequence) 1. One rule for what the
    benchmark feeds (:func:`coformer.runtime.timing.random_inputs`) and the profile a TensorRT engine of the same file is
    built for (``tensorrt_engines.build_engine``), so an engine is never fed outside its profile;
    a text model is timed at its length by giving shapes (``profile`` gives each kit entry's)."""
    return [int(batch) if d is None and axis == 0 else (1 if d is None else int(d)) for axis, d in enumerate(dims)]
