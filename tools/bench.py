"""``coformer bench``: CoFormer against the strategies a user would otherwise deploy,
on the same emulated devices, the same inputs, in one run (paper §II-B, §IV,
Fig. 3/4/10/12, Tables III-V).

Strategies (all from the same teacher's real weights, all served by the same
runtime, see :mod:`coformer.compiler.baselines`): ``coformer`` (the bundle),
``uniform`` (DeViT-style: the same sub-model size on every device, calibrated
like CoFormer's), ``teacher`` (alone on the central, strongest device),
``pipeline`` (EdgeShard-style) and ``tensor_parallel`` (Galaxy-style).

Where the input comes from matters as much as the network:

* ``device``: every device captures the input itself (the paper's setting:
  cameras at every device). Workers load the test inputs and the central node
  sends an index, so only features cross the links.
* ``central``: the input arrives at the central node, which sends it to the
  devices that need it: the honest cost of distributing it.

The teacher, the pipeline and tensor parallelism consume the input only on the
central device, so for them both settings are the same run (reported once,
as ``central``).

Every request's latency is the client's round trip (the client sits on the
central device's side of an unshaped link). Breakdown of the critical path,
from the central node's clock (see ``coformer.runtime.central``): ``compute``
(the central node's own compute outside rounds plus, per round, the part that
finished last), ``transfer`` (the last worker's dispatch-to-answer time less
its service time: the links both ways), ``aggregation``, ``other`` (the rest of
the round trip: message handling, the client link, waiting).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from coformer.runtime._files import atomic_write_bytes, atomic_write_json
from coformer.runtime.errors import CoFormerError
from coformer.runtime.timing import summarise
from coformer.tools.progress import Progress

STRATEGIES = ("coformer", "uniform", "teacher", "pipeline", "tensor_parallel")
INPUT_SOURCES = ("device", "central")
DEFAULT_BANDWIDTHS = "2mbit"
_UNITS = {"kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}
BUNDLES_VERSION = 2  # bump when the baselines are built differently: cached ones are rebuilt (2: explicit attention)


def parse_bandwidths(text: str) -> list[float]:
    """``"2mbit,100mbit,1gbit"`` -> ``[2.0, 100.0, 1000.0]`` (Mbit/s); names the bad entry."""
    out = []
    for part in [p.strip().lower() for p in str(text).split(",")]:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(kbit|mbit|gbit)", part)
        if not m or float(m.group(1)) <= 0:
            raise CoFormerError(f"--bandwidth {part!r}: expected a rate such as 2mbit, 500kbit or 1gbit")
        out.append(float(m.group(1)) * _UNITS[m.group(2)])
    return out


def parse_counts(text: str) -> list[int]:
    """``"1..3"`` or ``"1,3"`` -> device counts; names the bad entry."""
    out: list[int] = []
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        m = re.fullmatch(r"(\d+)(?:\.\.(\d+))?", part)
        if not m or int(m.group(1)) < 1 or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise CoFormerError(f"--devices-count {part!r}: expected a count such as 3, a list 1,3 or a range 1..3")
        out += list(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    if not out:
        raise CoFormerError(f"--devices-count {text!r}: name at least one count")
    return sorted(set(out))


def parse_choice(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [p.strip() for p in str(text).split(",") if p.strip()]
    for p in items:
        if p not in allowed:
            raise CoFormerError(f"{what} {p!r} is not one of {list(allowed)}")
    if not items:
        raise CoFormerError(f"{what}: name at least one of {list(allowed)}")
    return items


def _bw_name(mbit: float) -> str:
    return f"{mbit / 1e3:g}gbit" if mbit >= 1e3 else f"{mbit:g}mbit" if mbit >= 1 else f"{mbit * 1e3:g}kbit"


# -- bundles -------------------------------------------------------------------
def bundles_digest(teacher, devices, boost_epochs: int, aggregator_epochs: int, seed: int, data=None,
                   batch_size: int = 64) -> str:
    """What the built bundles depend on: every byte of the teacher's weights (not a prefix
    of each tensor: a fine-tuned head or a retrained last row differs late), the devices,
    the calibration settings and the data they were calibrated on."""
    import hashlib

    from coformer.compiler.pipeline import hash_data, hash_weights

    key = hashlib.sha256(f"bundles v{BUNDLES_VERSION}".encode())
    hash_weights(key, teacher)
    key.update(json.dumps([d.to_dict() for d in devices], sort_keys=True, default=str).encode())
    key.update(json.dumps([boost_epochs, aggregator_epochs, seed, batch_size]).encode())
    if data is not None:
        hash_data(key, data)
    return key.hexdigest()[:16]


def strategies_for(teacher) -> tuple[str, ...]:
    """The strategies the bench can build for ``teacher``'s family: pipeline and tensor
    parallelism slice ViT/DeiT blocks and tokens, so a Swin teacher gets the others; the
    teacher alone is built for image families."""
    from coformer.compiler.baselines import baseline_families
    from coformer.compiler.families import adapter_for

    family = adapter_for(teacher).name
    return tuple(s for s in STRATEGIES if s in ("coformer", "uniform") or family in baseline_families(s))


def prepare_bundles(strategies: Sequence[str], coformer_bundle: Optional[Path], teacher, devices, data, out_dir: Path,
                    boost_epochs: int = 5, aggregator_epochs: int = 60, seed: int = 0,
                    progress: bool = True, predictors: Optional[Sequence[Any]] = None, compute=None) -> dict[str, Path]:
    """The bundle of every strategy: CoFormer's as given, the others built in ``out_dir``
    (reused while the teacher, devices and settings they were built from are unchanged).

    Without ``coformer_bundle``, CoFormer's is compiled here too: DeBo over
    ``predictors`` (one per device), then calibration, as ``coformer compile`` does;
    ``uniform`` is compiled the same way with the uniform policy. Both go through
    :func:`coformer.compiler.job.run_job`, on ``compute``.
    """
    from coformer.calibration.booster import BoostConfig
    from coformer.calibration.compute import CPU
    from coformer.compiler.baselines import BASELINES, build_baseline
    from coformer.compiler.job import CompileJob, run_job
    from coformer.compiler.sources import source_of
    from coformer.runtime.manifest import load_manifest

    compute = compute or CPU
    digest = bundles_digest(teacher, devices, boost_epochs, aggregator_epochs, seed, data, compute.batch_size)
    out: dict[str, Path] = {}
    for s in strategies:
        if s == "coformer" and coformer_bundle is not None:
            out[s] = Path(coformer_bundle)
            continue
        path = Path(out_dir) / s
        stamp = path / "built-from.txt"
        if (path / "manifest.json").is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
            load_manifest(path)  # verifies checksums
            out[s] = path
            continue
        _say(progress, f"bench: building the {s} bundle")
        if path.exists():
            shutil.rmtree(path)
        if s in BASELINES:
            build_baseline(s, teacher, devices, data.val.head(3), path, data.labels, dict(data.preprocessing),
                           model_name=f"{s}")
        else:  # coformer (searched over the predictors) or uniform, calibrated alike
            if s == "coformer" and predictors is None:
                raise CoFormerError("compiling a CoFormer bundle for the bench needs each device's predictor")
            import torch

            torch.manual_seed(seed)
            run_job(CompileJob(teacher, devices, data, path, search="bo" if s == "coformer" else "uniform",
                               predictors=predictors if s == "coformer" else None, seed=seed,
                               boost=BoostConfig(epochs=boost_epochs, batch_size=compute.batch_size, seed=seed),
                               aggregator_epochs=aggregator_epochs, compute=compute, model_name=s,
                               model_info=source_of(teacher), progress=progress))
        atomic_write_bytes(stamp, (digest + "\n").encode())
        out[s] = path
    return out


def bundle_devices(manifest, devices):
    """``devices`` in the bundle's order (the central node first); refuses other names."""
    order = [d.device for d in manifest.devices]
    if sorted(order) != sorted(d.name for d in devices):
        raise CoFormerError(f"the devices file names {[d.name for d in devices]}, the bundle was compiled for {order}")
    return sorted(devices, key=lambda d: order.index(d.name))


def check_bundle_matches(manifest, teacher, data) -> None:
    """Refuse to bench a bundle against a teacher or data it was not compiled from (the
    baselines are built from the teacher, the test inputs from the data)."""
    from coformer.compiler.families import adapter_for

    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher).to_dict()
    recorded = dict(manifest.model.get("shape") or {})
    diff = sorted(k for k in set(shape) | set(recorded) if k != "extras" and shape.get(k) != recorded.get(k))
    if recorded and diff:
        raise CoFormerError(f"the bundle was compiled from another teacher: {', '.join(diff)} differ "
                            f"(bundle {[recorded.get(k) for k in diff]}, --model {[shape.get(k) for k in diff]})")
    recorded_weights = manifest.model.get("weights_sha256")
    if recorded_weights:
        from coformer.compiler.pipeline import weights_digest

        if weights_digest(teacher) != recorded_weights:
            raise CoFormerError("the bundle was compiled from other weights than --model/--checkpoint give "
                                f"(weights SHA-256 {recorded_weights[:12]}... in the manifest); bench it with "
                                "the checkpoint it was compiled from")
    if tuple(manifest.input.shape) != tuple(adapter.input_shape(teacher)):
        raise CoFormerError(f"the bundle takes inputs {list(manifest.input.shape)}, the teacher "
                            f"{list(adapter.input_shape(teacher))}")
    keys = ("kind", "source", "input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std", "scale",
            "resize", "raw_shape")
    pre, want = dict(manifest.input.preprocessing), dict(data.preprocessing)
    bad = [k for k in keys if pre.get(k) != want.get(k)]
    if bad:
        raise CoFormerError(f"the bundle was compiled with other preprocessing ({', '.join(f'{k}: {pre.get(k)!r}' for k in bad)}) "
                            f"than --data gives ({', '.join(f'{k}: {want.get(k)!r}' for k in bad)})")


_PROGRESS = Progress()  # the bench's clock, from when it was imported


def _say(progress: bool, msg: str) -> None:
    if progress:
        _PROGRESS(msg)


# -- one run -------------------------------------------------------------------
def run_strategy(bundle: Path, x: np.ndarray, indices: Sequence[int], source: str, bed=None,
                 inputs_path: Optional[Path] = None, max_seconds: float = 60.0, min_samples: int = 10,
                 warmup: int = 5, timeout_s: float = 120.0, log_dir: Optional[Path] = None) -> dict[str, Any]:
    """Serve ``bundle`` (inside testbed ``bed`` when given) and send the samples ``indices`` of
    ``x`` one at a time: at least ``min_samples``, then until ``max_seconds``. Returns the raw
    measurements (see :func:`summarise_runs`)."""
    from coformer.tools import testbed as tb
    from coformer.tools.cluster import LocalCluster

    local = inputs_path if source == "device" else None
    if bed is not None:
        for d in bed.devices:
            tb.reset_peak_memory(d.name)
    raw: dict[str, list] = {"index": [], "rtt": [], "pred": [], "wire_to": [], "wire_from": [], "timing": []}
    with LocalCluster(bundle, testbed=bed, local_inputs=local, timeout_s=timeout_s, log_dir=log_dir) as cluster:
        with cluster.client(timeout_s=timeout_s) as client:
            def one(i: int):
                return client.infer(x[i:i + 1], input_index=[i] if local is not None else None)

            start = time.monotonic()
            for i in list(indices)[:warmup]:  # warm-up: `warmup` requests, or 10% of the run's time
                one(i)
                if time.monotonic() - start > 0.1 * max_seconds:
                    break
            start = time.monotonic()
            for n, i in enumerate(indices):
                if n >= min_samples and time.monotonic() - start > max_seconds:
                    break
                r = one(i)
                for key, value in (("index", i), ("rtt", r.round_trip_ms),
                                   ("pred", r.label_index[0] if r.label_index else -1),  # -1: an embedding
                                   ("wire_to", r.wire_bytes_to_workers), ("wire_from", r.wire_bytes_from_workers),
                                   ("timing", r.timing_ms)):
                    raw[key].append(value)
        used = [d.device for d in cluster.manifest.devices]  # the teacher alone leaves the others idle
        raw["peak"] = {d.name: tb.peak_memory(d.name) for d in bed.devices if d.name in used} if bed else {}
    return raw


def summarise_runs(raws: Sequence[dict[str, Any]], y: np.ndarray) -> dict[str, Any]:
    """One row from the passes of one strategy and setting: latency statistics over every
    request, medians of the breakdown and bytes, the highest peak memory per device."""
    cat = {k: [v for r in raws for v in r[k]] for k in ("index", "rtt", "pred", "wire_to", "wire_from", "timing")}
    med = lambda k: float(np.median([t.get(k, 0.0) for t in cat["timing"]]))  # noqa: E731
    lat = summarise(cat["rtt"])
    compute, transfer, agg = med("critical_compute"), med("critical_transfer"), med("aggregate")
    peak: dict[str, Optional[int]] = {}
    for r in raws:
        for dev, v in r["peak"].items():
            peak[dev] = v if peak.get(dev) is None else max(peak[dev], v or 0)
    idx, preds = np.asarray(cat["index"]), np.asarray(cat["pred"])
    return {
        "samples": len(idx),
        "passes": len(raws),
        "predictions": dict(zip(idx.tolist(), preds.tolist())),
        "accuracy": float(np.mean(preds == y[idx])),
        "latency_ms": {k: lat[k] for k in ("median", "mean", "p90", "p99", "min", "max")},
        "breakdown_ms": {"compute": compute, "transfer": transfer, "aggregation": agg,
                         "other": max(0.0, lat["median"] - compute - transfer - agg)},
        "bytes_per_inference": int(np.median(np.asarray(cat["wire_to"]) + np.asarray(cat["wire_from"]))),
        "bytes_to_devices": int(np.median(cat["wire_to"])),
        "bytes_from_devices": int(np.median(cat["wire_from"])),
        "peak_memory_bytes": peak,
    }


def memory_story(bed, device: str, teacher_onnx: Path, submodel_onnx: Path, inputs_path: Path,
                 timeout_s: float = 120.0) -> dict[str, Any]:
    """Run the teacher, then the device's own sub-model, inside ``device`` (its memory cgroup):
    each as ``coformer-runtime time`` on a few inputs. Reports ``ok`` with the peak memory, or
    ``out_of_memory`` when the kernel's OOM killer ended it (never a hang: there is a deadline)."""
    import subprocess
    import sys
    import tempfile

    from coformer.tools import testbed as tb

    out: dict[str, Any] = {"device": device, "memory_limit_bytes": bed.device(device).memory_bytes}
    few = Path(tempfile.mkdtemp(prefix="coformer-mem-")) / "x.npy"
    np.save(few, np.load(inputs_path)[:5])
    try:
        for what, model in (("teacher", teacher_onnx), ("submodel", submodel_onnx)):
            tb.reset_peak_memory(device)
            kills_before = tb.oom_kills(device)
            cmd = [sys.executable, "-m", "coformer.runtime.cli", "time", str(model), "--inputs", str(few),
                   "--out", str(few.parent / f"{what}.npz"), "--warmup", "1", "--throttle", "none"]
            try:
                done = bed.run(device, cmd, capture_output=True, text=True, timeout=timeout_s)
                code, err = done.returncode, done.stderr
            except subprocess.TimeoutExpired:
                code, err = None, "timed out"
            killed = tb.oom_kills(device) > kills_before or code == -9
            out[what] = {"model": Path(model).name,
                         "status": "ok" if code == 0 else "out_of_memory" if killed else "failed",
                         "exit_code": code, "peak_memory_bytes": tb.peak_memory(device)}
            if out[what]["status"] == "failed":
                out[what]["error"] = err.strip()[-500:]
    finally:
        shutil.rmtree(few.parent, ignore_errors=True)
    return out


# -- the whole bench -----------------------------------------------------------
def check_testbed() -> None:
    """Raise with the reason (and the way out) when this host cannot hold the testbed."""
    from coformer.tools import testbed as tb

    try:
        tb.check_can_run()
    except CoFormerError as e:
        raise CoFormerError(f"{e}; or bench on loopback with --no-testbed (no link shaping, no memory limits)") \
            from None


def run_bench(setups: Sequence[tuple[Sequence[Any], dict[str, Path]]], x: np.ndarray, y: np.ndarray,
              out_dir: Path, bandwidths: Sequence[float], sources: Sequence[str], use_testbed: bool = True,
              samples: int = 200, max_seconds: float = 60.0, warmup: int = 5, progress: bool = True,
              memory_check: Optional[dict[str, Any]] = None, passes: int = 3) -> dict[str, Any]:
    """Every strategy x bandwidth x input source, for each ``(devices, {strategy: bundle})`` setup
    (one per device count); writes ``bench.json``, ``bench.md`` and plots to ``out_dir``.

    Each strategy gets ``samples`` test samples (at least 10; fewer when
    ``max_seconds`` runs out first), spread over ``passes`` interleaved passes.
    """
    if passes < 1:
        raise CoFormerError(f"--passes {passes} must be >= 1")
    from coformer.tools import testbed as tb

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs_path = out_dir / "inputs.npy"
    np.save(inputs_path, np.ascontiguousarray(x))
    if use_testbed:
        check_testbed()
    elif len(bandwidths) > 1:
        raise CoFormerError("a bandwidth sweep needs the testbed (root); without it links are loopback")
    results, memory = [], None
    t0 = time.perf_counter()
    try:
        for devices, bundles in setups:
            k = len(devices)
            for mbit in bandwidths:
                bed = tb.up([replace(d, link_mbit_s=mbit) for d in devices]) if use_testbed else None
                bw = _bw_name(mbit) if bed else "loopback"
                # Interleaved passes: every strategy runs a slice of the samples, then the next
                # strategy, and round again, so the machine's drift (tens of % over minutes here)
                # falls on all of them alike and the ratios hold.
                runs = [(strategy, bundle, source) for strategy, bundle in bundles.items()
                        for source in (sources if strategy in ("coformer", "uniform") else ["central"])]
                order = list(range(min(samples, len(x))))
                raws: dict[tuple[str, str], list] = {(st, so): [] for st, _, so in runs}
                failed: dict[tuple[str, str], dict] = {}
                for p in range(passes):
                    for strategy, bundle, source in runs:
                        if (strategy, source) in failed:
                            continue
                        _say(progress, f"bench: {strategy:<15} {bw:<8} {k} device(s), input from {source}, "
                                       f"pass {p + 1}/{passes}")
                        kills = {d.name: tb.oom_kills(d.name) for d in bed.devices} if bed else {}
                        try:
                            raws[strategy, source].append(run_strategy(
                                bundle, x, order[p::passes], source, bed, inputs_path, max_seconds / passes,
                                -(-10 // passes), warmup, log_dir=out_dir / "logs" / f"{strategy}-{source}-{bw}-{k}"))
                        except CoFormerError as e:  # a device ran out of memory, a process died, a timeout
                            oom = [n for n in kills if tb.oom_kills(n) > kills[n]]
                            failed[strategy, source] = {"status": "out_of_memory" if oom else "failed",
                                                        "error": str(e)[-1000:], "out_of_memory_on": oom,
                                                        "predictions": {}}
                            _say(progress, f"bench: {strategy} {failed[strategy, source]['status']}: "
                                           f"{str(e).splitlines()[0]}")
                for strategy, _, source in runs:
                    row = failed.get((strategy, source)) or {"status": "ok", **summarise_runs(raws[strategy, source], y)}
                    results.append({"strategy": strategy, "bandwidth": bw, "bandwidth_mbit_s": mbit if bed else None,
                                    "devices_count": k, "input_source": source, **row})
                if bed is not None and memory_check and memory is None and memory_check["device"] in \
                        [d.name for d in devices]:
                    memory = memory_story(bed, inputs_path=inputs_path, **memory_check)
    finally:
        if use_testbed:
            tb.down()
    teacher_preds = {(r["bandwidth"], r["devices_count"]): r["predictions"] for r in results
                     if r["strategy"] == "teacher" and r["status"] == "ok"}
    for r in results:
        ref = teacher_preds.get((r["bandwidth"], r["devices_count"]))
        both = sorted(set(ref or {}) & set(r["predictions"]))
        if both and r["status"] == "ok":  # over the samples both ran
            r["agreement_with_teacher"] = float(np.mean([ref[i] == r["predictions"][i] for i in both]))
    largest = max(setups, key=lambda s: len(s[0]))[0]
    report = {"results": [{k: v for k, v in r.items() if k != "predictions"} for r in results],
              "ratios": ratios([r for r in results if r["status"] == "ok"]), "memory": memory,
              "devices": [{"name": d.name, "cpu_share": d.cpu_share, "memory_bytes": d.memory_bytes}
                          for d in largest],
              "testbed": use_testbed, "wall_time_s": time.perf_counter() - t0,
              # the emulation's known optimism: one packet per message crosses an idle link unpaced
              "links": {_bw_name(m): {"mbit_s": m, "mtu": tb.link_mtu(m), "burst_bytes": tb.link_burst(m),
                                      "unpaced_ms_per_message_max": tb.link_burst(m) * 8 / (m * 1e3)}
                        for m in bandwidths} if use_testbed else {}}
    atomic_write_json(out_dir / "bench.json", report)
    atomic_write_bytes(out_dir / "bench.md", markdown(report).encode())
    report["plots"] = plots(report, out_dir)
    atomic_write_json(out_dir / "bench.json", report)
    return report


def ratios(results: Sequence[dict]) -> list[dict[str, Any]]:
    """CoFormer against each other strategy, per bandwidth and input source: how many times
    faster (median latency) and how many times fewer bytes per inference."""
    out = []
    same = lambda a, b: a["bandwidth"] == b["bandwidth"] and a["devices_count"] == b["devices_count"]  # noqa: E731
    for c in [r for r in results if r["strategy"] == "coformer"]:
        row: dict[str, Any] = {"bandwidth": c["bandwidth"], "devices_count": c["devices_count"],
                               "input_source": c["input_source"]}
        for o in results:
            if not same(o, c) or o["strategy"] == "coformer":
                continue
            if o["strategy"] == "uniform" and o["input_source"] != c["input_source"]:
                continue
            row[f"speedup_vs_{o['strategy']}"] = o["latency_ms"]["median"] / c["latency_ms"]["median"]
            if c["bytes_per_inference"] and o["bytes_per_inference"]:  # the teacher alone sends nothing
                row[f"fewer_bytes_vs_{o['strategy']}"] = o["bytes_per_inference"] / c["bytes_per_inference"]
        teacher = next((o for o in results if same(o, c) and o["strategy"] == "teacher"), None)
        if teacher is not None:
            row["accuracy_vs_teacher_points"] = 100 * (c["accuracy"] - teacher["accuracy"])
        out.append(row)
    return out


def _mib(n: Optional[int]) -> str:
    return "–" if not n else f"{n / 2**20:.0f}"


def markdown(report: dict[str, Any]) -> str:
    lines = ["| strategy | devices | bandwidth | input from | accuracy | agrees with teacher | median ms | p90 ms | p99 ms "
             "| compute | transfer | aggregation | other | bytes/inference | peak MiB per device | samples |",
             "|" + "---|" * 16]
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['strategy']} | {r['devices_count']} | {r['bandwidth']} | {r['input_source']} | "
                         f"{r['status']} {', '.join(r.get('out_of_memory_on', []))} |" + " |" * 11)
            continue
        b, lat = r["breakdown_ms"], r["latency_ms"]
        peak = " / ".join(_mib(v) for v in r["peak_memory_bytes"].values()) or "–"
        agree = r.get("agreement_with_teacher")
        lines.append(
            f"| {r['strategy']} | {r['devices_count']} | {r['bandwidth']} | {r['input_source']} | {100 * r['accuracy']:.1f}% | "
            f"{'–' if agree is None else f'{100 * agree:.1f}%'} | {lat['median']:.2f} | {lat['p90']:.2f} | "
            f"{lat['p99']:.2f} | {b['compute']:.2f} | {b['transfer']:.2f} | {b['aggregation']:.2f} | "
            f"{b['other']:.2f} | {r['bytes_per_inference']:,} | {peak} | {r['samples']} |")
    if report["ratios"]:
        lines += ["", "CoFormer against each strategy (x times faster, median latency; x times fewer bytes):", ""]
        keys = sorted({k for r in report["ratios"] for k in r if k.startswith(("speedup", "fewer"))})
        lines.append("| devices | bandwidth | input from | " + " | ".join(k.replace("_", " ") for k in keys) + " |")
        lines.append("|" + "---|" * (len(keys) + 3))
        for r in report["ratios"]:
            lines.append(f"| {r['devices_count']} | {r['bandwidth']} | {r['input_source']} | "
                         + " | ".join("–" if k not in r else f"{r[k]:.1f}x" for k in keys) + " |")
    m = report.get("memory")
    if m:
        lines += ["", f"Memory: on {m['device']} (limit {_mib(m['memory_limit_bytes'])} MiB) the teacher "
                      f"ends {m['teacher']['status']} (peak {_mib(m['teacher']['peak_memory_bytes'])} MiB); its "
                      f"sub-model ends {m['submodel']['status']} (peak {_mib(m['submodel']['peak_memory_bytes'])} MiB)."]
    return "\n".join(lines) + "\n"


def plots(report: dict[str, Any], out_dir: Path) -> list[str]:
    """Latency breakdown bars, accuracy vs latency, and the bandwidth sweep, as PNGs (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    res = [r for r in report["results"] if r["status"] == "ok"]
    if not res:
        return []
    label = lambda r: r["strategy"] + ("" if r["strategy"] not in ("coformer", "uniform")  # noqa: E731
                                       else f" ({r['input_source']} input)")
    written = []
    first_bw = res[0]["bandwidth"]
    most = max(r["devices_count"] for r in res)
    rows = [r for r in res if r["bandwidth"] == first_bw and r["devices_count"] == most]

    def save(fig, name: str) -> None:
        path = Path(out_dir) / name
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(path)
        written.append(name)

    # shares of each strategy's median (stacked bars on a log axis would distort them), total written at the end
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    left = np.zeros(len(rows))
    totals = np.array([sum(r["breakdown_ms"].values()) for r in rows])
    for part, color in (("compute", "#4c72b0"), ("transfer", "#dd8452"), ("aggregation", "#55a868"),
                        ("other", "#bbbbbb")):
        vals = 100 * np.array([r["breakdown_ms"][part] for r in rows]) / np.maximum(totals, 1e-9)
        ax.barh([label(r) for r in rows], vals, left=left, color=color, label=part)
        left += vals
    for i, r in enumerate(rows):
        ax.text(101, i, f"{r['latency_ms']['median']:.1f} ms", va="center", fontsize=8)
    ax.set_xlim(0, 118)
    ax.set_xlabel("share of the median latency, %")
    ax.set_title(f"Where the time goes at {first_bw}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.45, -0.22), ncol=4, fontsize=8, frameon=False)
    save(fig, "latency_breakdown.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["latency_ms"]["median"], 100 * r["accuracy"], s=40)
        ax.annotate(label(r), (r["latency_ms"]["median"], 100 * r["accuracy"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("median latency, ms (log)")
    ax.set_ylabel("accuracy, %")
    ax.set_title(f"Accuracy against latency at {first_bw}")
    save(fig, "accuracy_vs_latency.png")

    counts = sorted({r["devices_count"] for r in res})
    if len(counts) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in sorted({label(r) for r in res}):
            pts = sorted((r["devices_count"], r["latency_ms"]["median"]) for r in res
                         if label(r) == name and r["bandwidth"] == first_bw)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_yscale("log")
        ax.set_xticks(counts)
        ax.set_xlabel("devices")
        ax.set_ylabel("median latency, ms")
        ax.set_title(f"Device-count sweep at {first_bw}")
        ax.legend(fontsize=7)
        save(fig, "devices_sweep.png")

    sweep = [r for r in res if r["bandwidth_mbit_s"] and r["devices_count"] == most]
    if len({r["bandwidth"] for r in sweep}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in sorted({label(r) for r in sweep}):
            pts = sorted((r["bandwidth_mbit_s"], r["latency_ms"]["median"]) for r in sweep if label(r) == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link rate, Mbit/s")
        ax.set_ylabel("median latency, ms")
        ax.set_title("Bandwidth sweep")
        ax.legend(fontsize=7)
        save(fig, "bandwidth_sweep.png")
    return written


def quickstart_inputs(qs_dir: Path, progress: bool = True):
    """The quickstart's teacher, devices, data and bundle, running the quickstart first if needed."""
    from coformer.calibration.data import load_digits_dataset
    from coformer.compiler.builtin import quickstart_teacher
    from coformer.compiler.cost import teacher_cost
    from coformer.compiler.families import adapter_for
    from coformer.tools.quickstart import QuickstartConfig, make_devices, run_quickstart

    qs_dir = Path(qs_dir)
    if not (qs_dir / "report.json").is_file() or not (qs_dir / "bundle" / "manifest.json").is_file():
        _say(progress, f"bench: no quickstart run in {qs_dir}; running it first")
        run_quickstart(qs_dir, progress=progress)
    saved = json.loads((qs_dir / "report.json").read_text()).get("quickstart_config")
    cfg = QuickstartConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}) if saved \
        else QuickstartConfig()
    data = load_digits_dataset(size=cfg.img_size, seed=cfg.seed)
    teacher, _ = quickstart_teacher(cfg.teacher, data, progress)
    devices = make_devices(cfg, teacher_cost(adapter_for(teacher).read_shape(teacher)).flops)
    return teacher, devices, data, qs_dir / "bundle", cfg


BENCH_MEMORY = (1 << 30, 512 << 20, 192 << 20)  # per quickstart device on the testbed; see run_quickstart_bench


def run_quickstart_bench(qs_dir: Path = Path("coformer-quickstart"), out_dir: Optional[Path] = None,
                         bandwidths: str = DEFAULT_BANDWIDTHS, strategies: Sequence[str] = STRATEGIES,
                         sources: Sequence[str] = INPUT_SOURCES, samples: int = 200, max_seconds: float = 60.0,
                         use_testbed: bool = True, progress: bool = True,
                         devices_counts: Optional[Sequence[int]] = None, passes: int = 3) -> dict[str, Any]:
    """``coformer bench --quickstart``: every strategy on the quickstart's three devices, 2 Mbit/s links.

    On the testbed the devices get 1 GiB / 512 MiB / 192 MiB of memory: the
    teacher fits on the central device, not on edge-c, which still runs its
    sub-model (the memory story, checked after the first bandwidth).
    ``devices_counts`` (e.g. ``[1, 2, 3]``) also runs the first k devices
    alone: their CoFormer bundle is searched with the quickstart's predictors.
    """
    from coformer.compiler.predictor import LatencyPredictor

    teacher, devices, data, bundle, cfg = quickstart_inputs(qs_dir, progress)
    devices = [replace(d, memory_bytes=m) for d, m in zip(devices, BENCH_MEMORY)]
    counts = sorted(set(devices_counts or [len(devices)]))
    if counts[0] < 1 or counts[-1] > len(devices):
        raise CoFormerError(f"--devices-count {counts}: the quickstart has {len(devices)} devices (1..{len(devices)})")
    out_dir = Path(out_dir or Path(qs_dir) / "bench")
    setups = []
    for k in counts:
        full = k == len(devices)
        predictors = None
        if not full and "coformer" in strategies:
            predictors = [LatencyPredictor.load(Path(qs_dir) / "profiles" / f"{d.name}.predictor.json") for d in devices[:k]]
        bundles = prepare_bundles(strategies, bundle if full else None, teacher, devices[:k], data,
                                  Path(qs_dir) / "baselines" / ("" if full else f"{k}-devices"),
                                  boost_epochs=cfg.boost_epochs, aggregator_epochs=cfg.aggregator_epochs,
                                  seed=cfg.seed, progress=progress, predictors=predictors)
        setups.append((devices[:k], bundles))
    memory_check = None
    if use_testbed and "teacher" in strategies and "coformer" in strategies:
        from coformer.runtime.manifest import load_manifest

        weakest = devices[-1].name
        teacher_bundle = setups[-1][1]["teacher"]
        memory_check = {"device": weakest,
                        "teacher_onnx": teacher_bundle / load_manifest(teacher_bundle).central.artifact,
                        "submodel_onnx": bundle / load_manifest(bundle).device(weakest).artifact}
    x, y = data.test.head(len(data.test)).numpy(), data.test.y.numpy()
    return run_bench(setups, x, y, out_dir, parse_bandwidths(bandwidths), sources, use_testbed,
                     samples, max_seconds, progress=progress, memory_check=memory_check, passes=passes)


def run_model_bench(bundle: Path, teacher, devices, data, out_dir: Optional[Path] = None,
                    strategies: Optional[Sequence[str]] = None, sources: Sequence[str] = INPUT_SOURCES,
                    bandwidths: str = DEFAULT_BANDWIDTHS, use_testbed: bool = True, samples: int = 200,
                    max_seconds: float = 60.0, progress: bool = True, passes: int = 3, boost_epochs: int = 5,
                    compute=None) -> dict[str, Any]:
    """``coformer bench BUNDLE --model ... --devices ... --data ...``: the user's bundle against
    every strategy the teacher's family has (:func:`strategies_for`), built from the same
    teacher, on the first ``samples`` of the data's test split.

    Without labels (a flat image folder) accuracy is agreement with the teacher's own
    decisions in PyTorch (``reference: teacher`` in the report).
    """
    import torch

    from coformer.compiler.pipeline import run_batched
    from coformer.runtime.manifest import load_manifest

    manifest = load_manifest(bundle)
    if manifest.input.is_text or manifest.task_kind == "embedding":
        what = "language-model" if manifest.input.is_text else "embedding"
        raise CoFormerError(f"coformer bench does not take {what} bundles yet (its baselines and accuracy are built "
                            "for image classifiers); measure this bundle with coformer compile --measure")
    devices = bundle_devices(manifest, devices)
    check_bundle_matches(manifest, teacher, data)
    available = strategies_for(teacher)
    strategies = list(strategies or available)
    refused = [s for s in strategies if s not in available]
    if refused:
        raise CoFormerError(f"--strategies {refused} cannot be built for this teacher; it has {list(available)}")
    out = Path(out_dir or Path(bundle).resolve().parent / "bench")
    bundles = prepare_bundles(strategies, bundle, teacher, devices, data, out / "bundles", boost_epochs=boost_epochs,
                              progress=progress, compute=compute)
    x = data.test.head(samples)
    if data.test.y is not None:
        y, reference = data.test.y[: len(x)].numpy(), "labels"
    else:
        # the reference in float32 on the CPU, as the served teacher's ONNX computes it
        y, reference = run_batched(teacher, x).argmax(-1).numpy(), "teacher"
    with torch.no_grad():
        x = x.numpy()
    report = run_bench([(devices, bundles)], x, y, out, parse_bandwidths(bandwidths), sources, use_testbed,
                       samples, max_seconds, progress=progress, passes=passes)
    report["accuracy_reference"] = reference
    atomic_write_json(out / "bench.json", report)
    return report


def format_summary(report: dict[str, Any]) -> str:
    return markdown(report) + (f"\nplots: {', '.join(report.get('plots', [])) or 'none (matplotlib missing)'}\n")


__all__ = ["run_bench", "run_model_bench", "run_quickstart_bench", "prepare_bundles", "parse_bandwidths"]
