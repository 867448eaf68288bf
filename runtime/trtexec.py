"""Read NVIDIA trtexec's ``--exportTimes`` JSON: one record per inference.

Recent trtexec writes ``startEnqMs``/``endEnqMs``, ``startH2dMs``/``endH2dMs``,
``startComputeMs``/``endComputeMs``, ``startD2hMs``/``endD2hMs`` with the
intervals ``h2dMs``, ``computeMs``, ``d2hMs``, ``latencyMs``, ``endToEndMs``;
older releases say ``In``/``Out`` for H2D/D2H. Both are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from coformer.runtime.errors import CoFormerError
from coformer.runtime.timing import summarise


def _interval(rec: Mapping[str, Any], name: str, start: str, end: str) -> float:
    if name in rec:
        return float(rec[name])
    if start in rec and end in rec:
        return float(rec[end]) - float(rec[start])
    return 0.0


def load_trtexec_times(path: Path) -> dict[str, Any]:
    """Summarise a ``--exportTimes`` file like :func:`benchmark_engine` does a run."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CoFormerError(f"trtexec times {path} cannot be read: {e}") from None
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise CoFormerError(f"trtexec times {path}: expected a non-empty JSON list of records")
    compute = [_interval(r, "computeMs", "startComputeMs", "endComputeMs") for r in records]
    h2d = [_interval(r, "h2dMs", "startH2dMs", "endH2dMs") or _interval(r, "inMs", "startInMs", "endInMs")
           for r in records]
    d2h = [_interval(r, "d2hMs", "startD2hMs", "endD2hMs") or _interval(r, "outMs", "startOutMs", "endOutMs")
           for r in records]
    latency = [float(r["latencyMs"]) if "latencyMs" in r else c + i + o for r, c, i, o in zip(records, compute, h2d, d2h)]
    if not any(compute) and not any(latency):
        raise CoFormerError(f"trtexec times {path}: no compute or latency fields in its records")
    starts = [float(r.get("startEnqMs", r.get("startComputeMs", 0.0))) for r in records]
    ends = [float(r.get("endD2hMs", r.get("endOutMs", r.get("endComputeMs", 0.0)))) for r in records]
    span_s = max(ends) / 1e3 - min(starts) / 1e3
    return {
        "latency_ms": summarise(latency),
        "compute_ms": summarise(compute),
        "host_ms": summarise([i + o for i, o in zip(h2d, d2h)]),
        "throughput_qps": len(records) / span_s if span_s > 0 else 0.0,
        "iterations": len(records),
        "source": f"trtexec --exportTimes {path.name}",
    }
