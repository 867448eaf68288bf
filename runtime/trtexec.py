"""Read NVIDIA trtexec's ``--exportTimes`` JSON: one record per inference.

Recent trtexec (8.6 to 11.x, ``samples/common/sampleReporting.cpp``) writes
``startEnqMs``/``endEnqMs``, ``startH2dMs``/``endH2dMs``, ``startComputeMs``/``endComputeMs``,
``startD2hMs``/``endD2hMs`` with the intervals ``h2dMs``, ``computeMs``, ``d2hMs`` and
``latencyMs`` (twelve fields; no end-to-end field: that is computed from the starts and
ends); older releases say ``In``/``Out`` for H2D/D2H. Both are read.

The other way round, :func:`trace_summary` reports a trace of records in
trtexec's vocabulary and statistics, and :func:`write_export_times` writes one in
the ``--exportTimes`` layout. Both follow trtexec's own definitions
(``samples/common/sampleReporting.cpp`` in NVIDIA/TensorRT): a percentile is
the nearest rank, ``sorted[max(n - 1 - int((1 - p / 100) * n), 0)]`` with the
arithmetic in float32 as trtexec does it (so p99 of 100 samples is the largest,
where numpy's interpolation gives between the two largest); the median of an
even count is the mean of the middle two; Latency is H2D + compute + D2H;
End-to-End Host Latency is the end of D2H minus the start of H2D; Throughput
is queries over the host walltime from the first H2D start to the last D2H end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from coformer.runtime.errors import CoFormerError
from coformer.runtime.files import atomic_write_bytes
from coformer.runtime.stats import summarise

TRTEXEC_PERCENTILES = (90.0, 95.0, 99.0)  # trtexec's --percentile default
EXPORT_FIELDS = ("startEnqMs", "endEnqMs", "startH2dMs", "endH2dMs", "startComputeMs", "endComputeMs",
                 "startD2hMs", "endD2hMs", "h2dMs", "computeMs", "d2hMs", "latencyMs")
_STARTS = ("startEnqMs", "endEnqMs", "startH2dMs", "endH2dMs", "startComputeMs", "endComputeMs", "startD2hMs",
           "endD2hMs")


def trtexec_percentile(values: Sequence[float], percentile: float) -> float:
    """trtexec's ``findPercentile``: the nearest rank, with its float32 arithmetic (module doc)."""
    if not 0.0 <= float(percentile) <= 100.0:
        raise CoFormerError(f"percentile {percentile} is not in [0, 100]")
    a = np.sort(np.asarray(values, dtype=np.float64))
    if a.size == 0:
        return float("inf")
    n = np.float32(a.size)
    exclude = int((np.float32(1) - np.float32(percentile) / np.float32(100)) * n)
    return float(a[max(a.size - 1 - exclude, 0)])


def trtexec_median(values: Sequence[float]) -> float:
    """trtexec's ``findMedian``: the middle value, or the mean of the middle two."""
    a = np.sort(np.asarray(values, dtype=np.float64))
    if a.size == 0:
        return float("inf")
    m = a.size // 2
    return float(a[m]) if a.size % 2 else float((a[m - 1] + a[m]) / 2)


def performance_result(values: Sequence[float], percentiles: Sequence[float] = TRTEXEC_PERCENTILES) -> dict[str, Any]:
    """min, max, mean, median and each percentile of ``values`` (ms), as trtexec prints them."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise CoFormerError("no timings to summarise")
    return {"min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()), "median": trtexec_median(a),
            "percentiles": {f"{p:g}": trtexec_percentile(a, p) for p in percentiles}}


def _intervals(rec: Mapping[str, Any]) -> dict[str, float]:
    missing = [k for k in _STARTS if k not in rec]
    if missing:
        raise CoFormerError(f"a trace record needs {list(_STARTS)}; this one lacks {missing}")
    r = {k: float(rec[k]) for k in _STARTS}
    h2d, compute, d2h = r["endH2dMs"] - r["startH2dMs"], r["endComputeMs"] - r["startComputeMs"], \
        r["endD2hMs"] - r["startD2hMs"]
    return {**r, "h2dMs": h2d, "computeMs": compute, "d2hMs": d2h, "latencyMs": h2d + compute + d2h,
            "endToEndMs": r["endD2hMs"] - r["startH2dMs"], "enqMs": r["endEnqMs"] - r["startEnqMs"]}


def trace_summary(records: Sequence[Mapping[str, Any]], batch: int = 1,
                  percentiles: Sequence[float] = TRTEXEC_PERCENTILES) -> dict[str, Any]:
    """trtexec's "Performance summary" of a trace (records with the ``--exportTimes`` start and
    end fields, in ms), in its words: Throughput (qps), Latency, End-to-End Host Latency,
    Enqueue Time, H2D Latency, GPU Compute Time, D2H Latency, Total Host Walltime and Total
    GPU Compute Time (s). Warm-up records are the caller's to leave out."""
    if not records:
        raise CoFormerError("no trace records to summarise")
    rows = [_intervals(r) for r in records]
    walltime_ms = max(r["endD2hMs"] for r in rows) - min(r["startH2dMs"] for r in rows)
    compute = performance_result([r["computeMs"] for r in rows], percentiles)
    return {
        "Throughput": max(1, int(batch)) * len(rows) / walltime_ms * 1000 if walltime_ms > 0 else float("inf"),
        "Latency": performance_result([r["latencyMs"] for r in rows], percentiles),
        "End-to-End Host Latency": performance_result([r["endToEndMs"] for r in rows], percentiles),
        "Enqueue Time": performance_result([r["enqMs"] for r in rows], percentiles),
        "H2D Latency": performance_result([r["h2dMs"] for r in rows], percentiles),
        "GPU Compute Time": compute,
        "D2H Latency": performance_result([r["d2hMs"] for r in rows], percentiles),
        "Total Host Walltime": walltime_ms / 1000,
        "Total GPU Compute Time": compute["mean"] * len(rows) / 1000,
        "queries": len(rows),
    }


def write_export_times(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Write ``records`` as trtexec's ``--exportTimes`` JSON (a list with one object per
    inference, its 12 fields in its order), atomically; :func:`load_trtexec_times` reads it back."""
    out = [{k: full[k] for k in EXPORT_FIELDS} for full in map(_intervals, records)]
    atomic_write_bytes(Path(path), (json.dumps(out, indent=1) + "\n").encode())
    return Path(path)


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


def format_summary(summary: Mapping[str, Any]) -> str:
    """:func:`trace_summary` as trtexec prints its "Performance summary"."""
    def perf(r: Mapping[str, Any]) -> str:
        pct = ", ".join(f"percentile({p}%) = {v:g} ms" for p, v in r["percentiles"].items())
        return f"min = {r['min']:g} ms, max = {r['max']:g} ms, mean = {r['mean']:g} ms, median = {r['median']:g} ms, {pct}"

    lines = ["=== Performance summary ===", f"Throughput: {summary['Throughput']:g} qps"]
    for name in ("Latency", "End-to-End Host Latency", "Enqueue Time", "H2D Latency", "GPU Compute Time", "D2H Latency"):
        lines.append(f"{name}: {perf(summary[name])}")
    lines += [f"Total Host Walltime: {summary['Total Host Walltime']:g} s",
              f"Total GPU Compute Time: {summary['Total GPU Compute Time']:g} s"]
    return "\n".join(lines)


def tensorrt_major(version: int) -> int:
    """The major release of trtexec's ``[TensorRT vN]`` number: NV_TENSORRT_VERSION is
    major*1000 + minor*100 + patch up to 8.x (8601 for 8.6.1) and major*10000 + minor*100 + patch
    from 10.0 on (100300 for 10.3.0, 110000 for 11.0; ``include/NvInferRuntimeBase.h``)."""
    return version // 10000 if version >= 100000 else version // 1000


def trtexec_version(executable: str = "trtexec") -> int:
    """The TensorRT major release of a trtexec. ``trtexec --help`` prints its test banner,
    ``&&&& RUNNING TensorRT.trtexec [TensorRT v100300] [b..]`` (``samples/common/logging.h``,
    ``defineTest``), then the help, and passes; the banner is read."""
    import re
    import subprocess

    try:
        done = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CoFormerError(f"{executable} --help did not run ({e}): is TensorRT's trtexec installed?") from None
    found = re.search(r"\[TensorRT v(\d+)\]", done.stdout + done.stderr)
    if found is None:
        raise CoFormerError(f"{executable} --help printed no '[TensorRT vN]' banner: cannot tell its TensorRT version")
    return tensorrt_major(int(found.group(1)))


def trtexec_command(onnx: Path, export_times: Path, warmup_ms: float = 200.0, iterations: int = 10,
                    duration_s: float = 3.0, idle_ms: float = 0.0, precision: str = "fp16",
                    shapes: Optional[Mapping[str, Sequence[int]]] = None, executable: str = "trtexec",
                    tensorrt_major: Optional[int] = None) -> list[str]:
    """The trtexec command that times ``onnx`` as :func:`coformer.runtime.timing.benchmark_engine`
    would, writing its ``--exportTimes`` JSON to ``export_times``.

    ``--warmUp`` and ``--idleTime`` (ms) and ``--duration`` (s) are floats to trtexec (``float``
    in ``InferenceOptions``, parsed by ``std::stof``, in 8.6, 10.3 and 11.0), so they are passed
    as given. ``--fp16`` is a builder flag up to TensorRT 10; TensorRT 11's trtexec has none (it
    builds strongly typed networks and exits on an unknown option), so for ``tensorrt_major`` 11
    and later no flag is passed and the ONNX's own types decide: time an fp16 ONNX
    (``coformer compile --precision fp16``) there. ``tensorrt_major`` None: taken as 10."""
    if precision not in ("fp16", "fp32"):
        raise CoFormerError(f"precision {precision!r} is not one of ['fp16', 'fp32']")
    for name, value in (("warmup_ms", warmup_ms), ("duration_s", duration_s), ("idle_ms", idle_ms)):
        if not value >= 0:
            raise CoFormerError(f"trtexec's {name} must be >= 0, got {value}")
    cmd = [executable, f"--onnx={onnx}", f"--warmUp={float(warmup_ms):g}", f"--iterations={int(iterations)}",
           f"--duration={float(duration_s):g}", f"--idleTime={float(idle_ms):g}", f"--exportTimes={export_times}"]
    if precision == "fp16" and (tensorrt_major is None or tensorrt_major < 11):
        cmd.append("--fp16")
    if shapes:
        cmd.append("--shapes=" + ",".join(f"{name}:{'x'.join(str(int(d)) for d in shape)}"
                                          for name, shape in shapes.items()))
    return cmd


def run_trtexec(onnx: Path, export_times: Path, executable: str = "trtexec", timeout_s: float = 600.0,
                **options: Any) -> dict[str, Any]:
    """Run trtexec on ``onnx`` (:func:`trtexec_command`, its TensorRT release read by
    :func:`trtexec_version` unless ``tensorrt_major`` is given) and import its times
    (:func:`load_trtexec_times`); refuse in one line where trtexec is not on the PATH or fails."""
    import shutil
    import subprocess

    exe = shutil.which(executable)
    if exe is None:
        raise CoFormerError(f"{executable} is not on the PATH: it comes with TensorRT (on a Jetson, "
                            "/usr/src/tensorrt/bin/trtexec; add that folder to PATH)")
    Path(export_times).parent.mkdir(parents=True, exist_ok=True)
    major = options.pop("tensorrt_major", None) or trtexec_version(exe)
    cmd = trtexec_command(onnx, export_times, executable=exe, tensorrt_major=major, **options)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise CoFormerError(f"trtexec on {onnx} ran past {timeout_s:.0f} s") from None
    if done.returncode != 0:
        last = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise CoFormerError(f"trtexec failed on {onnx} (exit {done.returncode}): {' | '.join(last)}")
    times = load_trtexec_times(export_times)
    times["command"], times["tensorrt_major"] = cmd, major
    # what the engine was built at: the flag's fp16 up to TensorRT 10, the ONNX's own types after
    times["precision"] = "fp16" if "--fp16" in cmd else ("fp32" if major < 11 else "as typed in the ONNX")
    return times
