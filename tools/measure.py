"""Measure a bundle as served: every sample through real sockets and processes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from coformer.runtime.errors import CoFormerError


def measure_with_probes(bundle_dir: Path, probes: Mapping[str, Mapping[str, Any]], x: np.ndarray, *,
                        y: Optional[np.ndarray] = None, warmup: int = 10, throttle: str = "auto",
                        log_dir: Optional[Path] = None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Serve the bundle and the probe bundles (:func:`build_probe_bundles`; none is fine)
    side by side (:func:`coformer.tools.served.measure_bundles`) and send each every sample
    of ``x``; returns the bundle's summary (:meth:`~coformer.tools.served.Measurement.summary`,
    with ``accuracy`` when ``y`` is given) and each probe's.

    Side by side because this machine's speed drifts by tens of percent from one minute to
    the next: probes measured before the bundle would calibrate the prediction on a
    different machine, in effect.
    """
    from coformer.tools.served import measure_bundles

    if "bundle" in probes:
        raise CoFormerError("a probe may not be named 'bundle'")
    measured = measure_bundles({"bundle": bundle_dir, **{k: v["dir"] for k, v in probes.items()}}, x,
                               warmup=warmup, throttle=throttle, log_dir=log_dir)
    bundle = measured.pop("bundle").summary(y)
    return bundle, {k: m.summary() for k, m in measured.items()}


def probe_layer_counts(num_layers: int) -> list[int]:
    """The layer counts of the uniform probes: 1, 2, 4, ... below ``num_layers``, then all."""
    counts, n = [], 1
    while n < num_layers:
        counts.append(n)
        n *= 2
    return counts + [num_layers]


def build_probe_bundles(teacher, devices, data, out_dir: Path, decoder, latency) -> dict[str, dict[str, Any]]:
    """Bundles that do not depend on the policy being predicted, to calibrate the
    prediction of served latency on this machine (:func:`predict_served_here`):

    * ``small``: the smallest sub-models (1 layer, 8 channels, 1 head, 8
      neurons): served, it costs what the runtime itself costs. Where the layer
      has fewer heads than there are devices (a Swin's first stage may have 2),
      the devices beyond them keep none (C3 bounds the heads' sum);
    * ``uniform-l{k}`` and ``uniform``: the uniform decomposition (every device
      1/N of each width, cut to its budget; the search's DeViT-style baseline)
      with k = 1, 2, 4, ... layers (:func:`probe_layer_counts`) and with all.

    A ladder of sizes rather than two ends, because served compute is not one
    factor times the predicted one (see :func:`predict_served_here`). The
    uniform decomposition is usually slower than the policy the search picks,
    so that the prediction interpolates; beyond it, it extrapolates the last segment.
    All uncalibrated (no distillation: only their timing matters). ``decoder``
    and ``latency`` are the search's
    (:func:`coformer.compiler.planning.search_space`): the uniform policies and
    each probe's predicted ``t1_ms`` and ``t3_ms``. Returns name -> ``{"dir",
    "policy", "t1_ms", "t3_ms"}``, smallest first; probes whose policies
    coincide are built once.
    """
    from coformer.calibration.booster import BoostConfig
    from coformer.compiler.families import adapter_for
    from coformer.compiler.job import CompileJob, run_job
    from coformer.compiler.profile_kit import uniform_spec
    from coformer.compiler.specs import Policy

    shape = adapter_for(teacher).read_shape(teacher)
    data = data.head(64)  # only their timing matters: no pass over a large data set
    spec = uniform_spec(shape, (1, min(8, shape.embed_dim // len(devices)), 1, 8))
    heads_there = [shape.heads[i] for i in spec.layers] if shape.stage_dims else [max(shape.heads)]
    room = min(heads_there) // max(1, max(len(h) for h in spec.heads))  # devices that may keep a head
    headless = dataclasses.replace(spec, heads=tuple(() for _ in spec.heads))
    policies = {"small": Policy(tuple(spec if i < room else headless for i in range(len(devices))),
                                tuple(d.name for d in devices), source="probe")}
    n, widths = len(devices), decoder.uniform_point()[1:4]
    for k in probe_layer_counts(shape.num_layers):
        name = "uniform" if k == shape.num_layers else f"uniform-l{k}"
        policy = dataclasses.replace(decoder.decode([k / shape.num_layers, *widths] * n), source="probe")
        if policy.submodels not in [p.submodels for p in policies.values()]:
            policies[name] = policy
    out = {}
    for name, policy in policies.items():
        path = Path(out_dir) / f"probe-{name}"
        run_job(CompileJob(teacher, devices, data, path, policy=policy, boost=BoostConfig(epochs=0),
                           aggregator_epochs=0, progress=False))
        t1, _, t3, _ = latency.terms(policy)
        out[name] = {"dir": path, "policy": policy, "t1_ms": t1, "t3_ms": t3}
    return out


def device_compute_ms(served: Mapping[str, Any], devices: Sequence[Any]) -> list[float]:
    """Each device's median served compute from a measurement (:func:`measure_with_probes`),
    in the order of ``devices`` (the first is the central node)."""
    bd = served["breakdown_ms_median"]
    return [bd["central_compute"]] + [bd[f"worker_compute.{d.name}"] for d in devices[1:]]


def probe_measurements(probes: Mapping[str, Mapping[str, Any]], probed: Mapping[str, Mapping[str, Any]],
                       devices: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """The probes as :func:`predict_served_here` takes them: each with its predicted terms,
    measured median round trip (``measured_ms``) and devices' compute (``device_ms``)."""
    return {k: {"t1_ms": v["t1_ms"], "t3_ms": v["t3_ms"], "measured_ms": probed[k]["latency_ms"]["median"],
                "device_ms": device_compute_ms(probed[k], devices)} for k, v in probes.items()}


def served_compute_ms(t1_ms: Sequence[float], t3_ms: float, devices: Sequence[Any],
                      placements: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The compute a request waits for when served on this machine, devices emulated on
    ``placements`` (``served["placements"]``: each device's ``cores`` and ``cpu_share``):
    the slowest device's ``t1_n`` plus the aggregation ``t3``; eq. 3's link
    terms drop out (loopback).

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
    return {"compute_ms": max(device_ms) + t3_ms, "t1": list(t1_ms), "colocated": colocated, "t3": t3_ms,
            "slowest_device": devices[int(np.argmax(device_ms))].name}


def interpolate(x: float, points: Sequence[tuple[float, float]]) -> float:
    """Piecewise-linear through ``points`` (x, y), extended by the end segments; points of
    equal x are averaged; a single point is extended with slope 1."""
    merged: dict[float, list[float]] = {}
    for px, py in sorted(points):
        key = next((k for k in merged if abs(k - px) <= 1e-9), px)
        merged.setdefault(key, []).append(py)
    pts = [(k, float(np.mean(v))) for k, v in sorted(merged.items())]
    if not pts:
        raise CoFormerError("nothing to interpolate: no points")
    if len(pts) == 1:
        return pts[0][1] + x - pts[0][0]
    i = min(max(int(np.searchsorted([p[0] for p in pts], x)), 1), len(pts) - 1)
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


def predict_served_here(t1_ms: Sequence[float], t3_ms: float, devices: Sequence[Any],
                        placements: Mapping[str, Mapping[str, Any]],
                        probes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The latency a policy should measure when served on this machine, calibrated on the
    probe bundles of :func:`build_probe_bundles` served in the same minutes
    (:func:`probe_measurements`: each probe's predicted ``t1_ms`` and ``t3_ms``,
    its devices' measured compute ``device_ms`` and median round trip
    ``measured_ms``). Two steps, each piecewise-linear through the probes:

    1. device n's served compute: its predicted ``t1_n`` placed among the
       probes' ``t1_n``, read off their measured compute (``t1_served``);
    2. the round trip: C = :func:`served_compute_ms` on the served compute,
       placed among the probes' C (on their measured compute), read off their
       measured round trips.

    Served, compute costs more than the profiles say, and not by one factor: a fixed
    cost per request (divided by the device's share) dominates the smallest sub-models,
    devices that share a core slow each other, and the round trip less the critical
    path's compute grows with the bundle. Reading both steps off probes measured in the
    same minutes as the bundle takes all of that from this machine as it is now, as it
    drifts by tens of percent from minute to minute. Probes are fixed by the teacher and
    the devices, not by the policy. How well this predicts, against the simpler
    predictions before it: docs/benchmarks.md, "Served latency calibrated on probe
    bundles" (``python -m coformer.tools.served_bench``).
    """
    if not probes:
        raise CoFormerError("no probe measurements: serve the probe bundles beside the bundle")
    served = [interpolate(t, [(p["t1_ms"][n], p["device_ms"][n]) for p in probes.values()])
              for n, t in enumerate(t1_ms)]
    c = served_compute_ms(served, t3_ms, devices, placements)
    points = {k: served_compute_ms(p["device_ms"], p["t3_ms"], devices, placements)["compute_ms"]
              for k, p in probes.items()}
    predicted = interpolate(c["compute_ms"], [(points[k], p["measured_ms"]) for k, p in probes.items()])
    return {"predicted_ms": predicted,
            "terms_ms": {**c, "t1": list(t1_ms), "t1_served": served,
                         "probes": {k: {"compute_ms": points[k], "measured_ms": p["measured_ms"]}
                                    for k, p in probes.items()}}}


def measure_job(job, out, x: np.ndarray, y: Optional[np.ndarray] = None, throttle: str = "auto", warmup: int = 10,
                log_dir: Optional[Path] = None) -> dict[str, Any]:
    """``coformer compile --measure``: serve the compiled bundle (``out``, what
    :func:`coformer.compiler.job.run_job` returned for ``job``) on this machine, devices
    emulated, send every sample of ``x``, and return what the report adds.

    When the job searched, probe bundles are built and served beside it
    (:func:`build_probe_bundles`) and the report adds the latency predicted for this
    machine (:func:`predict_served_here`): loopback links, so eq. 3's t2 drops out.
    """
    import shutil
    import tempfile

    report = out.report
    extra: dict[str, Any] = {}
    if "search" in report and out.space is not None:
        tmp = Path(tempfile.mkdtemp(prefix="coformer-probe-", dir=Path(job.out_dir).resolve().parent))
        try:
            probes = build_probe_bundles(job.teacher, job.devices, job.data, tmp, *out.space)
            served, probed = measure_with_probes(job.out_dir, probes, x, y=y, warmup=warmup, throttle=throttle,
                                                 log_dir=log_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        best = report["search"][out.method]
        here = predict_served_here(best["t1_ms"], best["t3_ms"], job.devices, served["placements"],
                                   probe_measurements(probes, probed, job.devices))
        extra.update(runtime_overhead_ms=probed["small"]["runtime_ms_median"],
                     predicted_latency_local_ms=here["predicted_ms"],
                     predicted_latency_local_terms_ms=here["terms_ms"])
    else:
        served, _ = measure_with_probes(job.out_dir, {}, x, y=y, warmup=warmup, throttle=throttle,
                                        log_dir=log_dir)
    extra["measured_latency_ms"] = served["latency_ms"]["median"]
    extra["measured_samples"] = int(len(x))
    if "embeddings" in served:  # served vectors against the teacher's, on the same inputs
        import torch

        from coformer.compiler.families import adapter_for
        from coformer.compiler.inference import run_batched
        from coformer.compiler.tasks import TeacherEmbedding, embedding_scores, normalizes

        reference = TeacherEmbedding(adapter_for(job.teacher), job.teacher, normalizes(job.teacher, job.normalize))
        t = run_batched(reference, torch.as_tensor(x))
        extra["served_embedding"] = embedding_scores(t, torch.as_tensor(served["embeddings"]))
    elif "accuracy" in served:
        extra["served_accuracy"] = served["accuracy"]
    extra["served_breakdown_ms_median"] = served["breakdown_ms_median"]
    return extra
