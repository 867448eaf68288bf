"""Measure a bundle as served: every sample through real sockets and processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from coformer.runtime.timing import summarise
from coformer.tools.cluster import LocalCluster, default_placements


def measure_served(bundle_dir: Path, x: np.ndarray, warmup: int = 10, throttle: str = "auto",
                   log_dir: Optional[Path] = None) -> dict[str, Any]:
    """Serve ``bundle_dir`` on this machine (devices emulated) and send each sample of ``x``.

    Returns predictions, round-trip latency statistics, wire bytes from the
    workers, the central node's per-phase medians, and the runtime overhead
    (median round trip of a ``status`` request: message handling and loopback).
    """
    from coformer.runtime.manifest import load_manifest

    placements = default_placements(load_manifest(bundle_dir))
    rtts, preds, wire, breakdown, pings = [], [], [], [], []
    with LocalCluster(bundle_dir, placements, throttle=throttle, log_dir=log_dir) as cluster:
        with cluster.client() as client:
            for i in range(warmup):
                client.infer(x[i % len(x): i % len(x) + 1])
            for i in range(len(x)):
                r = client.infer(x[i: i + 1])
                rtts.append(r.round_trip_ms)
                preds.append(r.label_index[0])
                wire.append(r.wire_bytes_from_workers)
                breakdown.append(r.timing_ms)
            import time

            for _ in range(20):
                t0 = time.perf_counter()
                client.status()
                pings.append((time.perf_counter() - t0) * 1e3)
    med = lambda key: float(np.median([b[key] for b in breakdown]))  # noqa: E731
    return {
        "predictions": np.asarray(preds),
        "latency_ms": summarise(rtts),
        "bytes_per_inference": int(np.median(wire)),
        "status_round_trip_ms": float(np.median(pings)),
        "breakdown_ms_median": {
            "central_compute": med("central_compute"),
            "wait_for_workers": med("wait_for_workers"),
            "aggregate": med("aggregate"),
            "central_total": med("total"),
            "dispatch": med("dispatch"),
            "central_own": med("central_own"),
            **{f"worker_compute.{k}": float(np.median([b["workers_compute"][k] for b in breakdown]))
               for k in breakdown[0]["workers_compute"]},
            **{f"worker_service.{k}": float(np.median([b["workers_service"][k] for b in breakdown]))
               for k in breakdown[0]["workers_service"]},
        },
        "placements": {k: {"cores": list(v.cores or []), "cpu_share": v.cpu_share} for k, v in placements.items()},
    }


def measure_runtime_overhead(teacher, devices, data, out_dir: Path, throttle: str = "auto",
                             requests: int = 60) -> float:
    """The serving runtime's own cost per request on this machine, in ms.

    Serves a probe bundle whose sub-models are the smallest possible (1 layer,
    8 channels, 1 head, 8 neurons, uncalibrated) on the same placements and
    returns the median round trip less the central node's compute: message
    encoding and validation, the loopback hops to the workers and back, and
    the engines' fixed per-call costs. Eq. 3's T leaves these out; adding them
    makes a prediction count what a measurement counts.
    """
    import shutil

    from coformer.calibration.booster import BoostConfig
    from coformer.compiler.families import adapter_for
    from coformer.compiler.pipeline import compile_bundle
    from coformer.compiler.profile_kit import uniform_spec
    from coformer.compiler.specs import Policy

    shape = adapter_for(teacher).read_shape(teacher)
    spec = uniform_spec(shape, (1, min(8, shape.embed_dim // len(devices)), 1, 8))
    policy = Policy(tuple(spec for _ in devices), tuple(d.name for d in devices), source="probe")
    probe = Path(out_dir) / "probe-bundle"
    compile_bundle(teacher, devices, data, probe, policy=policy, boost=BoostConfig(epochs=0),
                   aggregator_epochs=0, progress=False)
    try:
        served = measure_served(probe, data.val.x.numpy()[:requests], warmup=5, throttle=throttle)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return served["latency_ms"]["median"] - served["breakdown_ms_median"]["central_compute"]
