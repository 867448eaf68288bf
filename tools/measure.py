"""Measure a bundle as served: every sample through real sockets and processes."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from coformer.runtime.timing import summarise
from coformer.tools.cluster import LocalCluster


class _Records:
    """What one served bundle answered, request by request."""

    def __init__(self) -> None:
        self.rtts: list[float] = []
        self.preds: list[int] = []
        self.wire: list[int] = []
        self.breakdown: list[dict] = []
        self.runtime: list[float] = []  # round trip less the compute on its critical path

    def add(self, r) -> None:
        self.rtts.append(r.round_trip_ms)
        self.preds.append(r.label_index[0])
        self.wire.append(r.wire_bytes_from_workers)
        self.breakdown.append(r.timing_ms)
        self.runtime.append(r.round_trip_ms - r.timing_ms["critical_compute"])

    def summary(self, placements) -> dict[str, Any]:
        bd = self.breakdown
        med = lambda key: float(np.median([b[key] for b in bd]))  # noqa: E731
        return {
            "predictions": np.asarray(self.preds),
            "latency_ms": summarise(self.rtts),
            "bytes_per_inference": int(np.median(self.wire)),
            "runtime_ms_median": float(np.median(self.runtime)),
            "breakdown_ms_median": {
                "central_compute": med("central_compute"),
                "wait_for_workers": med("wait_for_workers"),
                "aggregate": med("aggregate"),
                "central_total": med("total"),
                "dispatch": med("dispatch"),
                "central_own": med("central_own"),
                "critical_compute": med("critical_compute"),
                **{f"worker_compute.{k}": float(np.median([b["workers_compute"][k] for b in bd]))
                   for k in bd[0]["workers_compute"]},
                **{f"worker_service.{k}": float(np.median([b["workers_service"][k] for b in bd]))
                   for k in bd[0]["workers_service"]},
                **{f"worker_queued.{k}": float(np.median([b["workers_queued"][k] for b in bd]))
                   for k in bd[0]["workers_queued"]},
            },
            "placements": {k: {"cores": list(v.cores or []), "cpu_share": v.cpu_share} for k, v in placements.items()},
        }


def _warm_up(client, x: np.ndarray, n: int) -> None:
    """``n`` untimed requests (sessions, sockets and caches warm), cycling over ``x``."""
    for i in range(n):
        client.infer(x[i % len(x): i % len(x) + 1])


def measure_served(bundle_dir: Path, x: np.ndarray, warmup: int = 10, throttle: str = "auto",
                   log_dir: Optional[Path] = None) -> dict[str, Any]:
    """Serve ``bundle_dir`` on this machine (devices emulated) and send each sample of ``x``.

    Returns predictions, round-trip latency statistics, wire bytes from the
    workers, the central node's per-phase medians, the round trip less the
    critical path's compute (``runtime_ms_median``), and the median round trip
    of a ``status`` request (message handling and loopback alone).
    """
    rec, pings = _Records(), []
    with LocalCluster(bundle_dir, throttle=throttle, log_dir=log_dir) as cluster:
        with cluster.client() as client:
            _warm_up(client, x, warmup)
            for i in range(len(x)):
                rec.add(client.infer(x[i: i + 1]))
            for _ in range(20):
                t0 = time.perf_counter()
                client.status()
                pings.append((time.perf_counter() - t0) * 1e3)
    return {**rec.summary(cluster.placements), "status_round_trip_ms": float(np.median(pings))}


def measure_served_with_probe(bundle_dir: Path, probe_dir: Path, x: np.ndarray, warmup: int = 10,
                              throttle: str = "auto", log_dir: Optional[Path] = None,
                              block: int = 20) -> tuple[dict[str, Any], dict[str, Any]]:
    """Serve the bundle and the probe bundle (:func:`build_probe_bundle`) side by side and
    send every sample of ``x`` to each, in alternating blocks of ``block`` requests.

    Returns the bundle's measurement and the probe's (as :func:`measure_served`);
    the probe's ``runtime_ms_median`` is the runtime's own cost per request
    measured in the same minutes as the bundle. This machine's speed drifts by
    tens of percent from one minute to the next (the probe's runtime cost: 1.6
    and 2.9 ms a minute apart here), so an overhead measured before the bundle
    would be compared with a measurement taken on a different machine, in effect.
    Blocks rather than single requests, so that each cluster idles between its
    requests as it does when served alone.
    """
    clusters = [LocalCluster(d, throttle=throttle, log_dir=None if log_dir is None else Path(log_dir) / name)
                for d, name in ((bundle_dir, "bundle"), (probe_dir, "probe"))]
    recs = [_Records(), _Records()]
    with ExitStack() as stack:
        clients = [stack.enter_context(stack.enter_context(c).client()) for c in clusters]
        for client in clients:
            _warm_up(client, x, warmup)
        for lo in range(0, len(x), block):
            for client, rec in zip(clients, recs):
                for i in range(lo, min(lo + block, len(x))):
                    rec.add(client.infer(x[i: i + 1]))
    return recs[0].summary(clusters[0].placements), recs[1].summary(clusters[1].placements)


def build_probe_bundle(teacher, devices, data, out_dir: Path) -> Path:
    """A bundle whose sub-models are the smallest possible (1 layer, 8 channels, 1 head,
    8 neurons, uncalibrated) for ``devices``: served, it costs what the runtime itself costs."""
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
    return probe


def predict_served_here(t1_ms: Sequence[float], t3_ms: float, devices: Sequence[Any],
                        placements: Mapping[str, Mapping[str, Any]], overhead_ms: float) -> dict[str, Any]:
    """The latency a policy should measure when served on this machine, devices emulated
    on ``placements`` as the served measurement records them (``served["placements"]``:
    each device's ``cores`` and ``cpu_share``).

    ``overhead_ms`` (the runtime's own cost: the probe bundle's round trip less
    the compute on its critical path) plus the
    slowest device's served compute ``t1_n`` (eq. 4, already with its served
    factor) plus the aggregation ``t3``; eq. 3's link terms drop out (loopback).
    Measure ``overhead_ms`` with :func:`measure_served_with_probe`, in the same
    minutes as the measurement the prediction is compared with.
    One term is this machine's alone: emulated devices that share a core (two
    workers on core 1 of two cores) can each be delayed by what the others
    compute for the same request (the core is fully booked at shares summing
    to 1.0, and a woken device waits out its neighbour's time slice), so
    device n's time adds its core-mates' CPU time, ``sum_j t1_j * share_j``.
    Real devices have cores of their own; the search's T leaves this out.
    """
    cores = {d.name: set(placements[d.name]["cores"] or [0]) for d in devices}
    colocated = []
    for n, d in enumerate(devices):
        colocated.append(sum(t1_ms[j] * e.cpu_share for j, e in enumerate(devices)
                             if j != n and cores[e.name] & cores[d.name]))
    device_ms = [t + c for t, c in zip(t1_ms, colocated)]
    return {"predicted_ms": overhead_ms + max(device_ms) + t3_ms,
            "terms_ms": {"runtime_overhead": overhead_ms, "t1": list(t1_ms), "colocated": colocated,
                         "t3": t3_ms, "slowest_device": devices[int(np.argmax(device_ms))].name}}
