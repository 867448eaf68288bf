"""``coformer bench --quickstart DIR --fronts``: accuracy against latency, one curve per
strategy and device count, and which of them wins at the user's latency target.

The question it answers is a deployment engineer's: *for the latency I need, should I
split the teacher over my devices, or distil one student for the strongest of them?*
Each point is a bundle built from the quickstart's teacher, data, calibration settings
and device predictors, at one size, then served on the testbed like every bench row:

* the size is the devices' FLOPs budget, ``fraction`` x the device's CPU share x the
  teacher's FLOPs (the quickstart's own is 0.5, :func:`coformer.tools.quickstart.make_devices`):
  a few fractions (default 0.1, 0.25, 0.5) make a curve;
* ``student``: one sub-model on the central (strongest) device, searched by DeBo over its
  predictor and calibrated as CoFormer's are (:func:`coformer.compiler.job.student_job`).
  It is CoFormer on one device, so there is no separate 1-device CoFormer curve;
* ``coformer`` at 2 and 3 devices: DeBo over the first k devices' predictors (eq. 8);
* ``uniform`` at 2 and 3 devices: every device 1/k of each width, cut to its budget;
* ``teacher``: the teacher alone on the central device, one point.

Choices written down. Each fraction is one bench run (:func:`coformer.tools.bench.runner.run_bench`,
one link rate, the given input sources), its strategies interleaved in passes so the
machine's drift falls on them alike; across fractions the runs follow each other, so
each run's teacher is measured again (``teacher_ms_per_run``) to show the drift between
them. Accuracy is given twice: served, on the first ``samples`` test images, and the
compile's own score of the same bundle on the whole test split, which the verdict and the
plot rank on (:func:`scored_on`). The bundles are cached in ``DIR/fronts-bundles``. The target is
``target_ms`` or, without one, the teacher's own median latency (the mean over the runs):
"as fast as the teacher, at most". At the target a curve's score is its most accurate
point whose median latency is within it; the winner is the most accurate curve, or the
fastest of the curves within ``TIE_SE`` standard errors of it (a tie within the noise).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from coformer.runtime.errors import CoFormerError
from coformer.runtime.files import atomic_write_bytes, atomic_write_json
from coformer.runtime.manifest import load_manifest
from coformer.tools.progress import Progress

FRONT_FRACTIONS = (0.1, 0.25, 0.5)
# Curves whose accuracies at the target differ by at most this many standard errors of the most
# accurate one's (binomial, over the samples it was scored on) tie, and the fastest of them wins:
# a 0.1-point lead on 1,000 images is noise, not a reason to deploy three devices.
TIE_SE = 2.0
CURVE_LABELS = {"student": "student (1 device)", "coformer": "CoFormer", "uniform": "uniform"}


def parse_fractions(text: str) -> list[float]:
    """``"0.1,0.25,0.5"`` -> fractions of the teacher's FLOPs in (0, 1]; names the bad entry."""
    out = []
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        try:
            f = float(part)
        except ValueError:
            f = -1.0
        if not 0 < f <= 1:
            raise CoFormerError(f"--fronts-fractions {part!r}: expected fractions of the teacher's FLOPs in (0, 1], "
                                "such as 0.1,0.25,0.5")
        out.append(f)
    if not out:
        raise CoFormerError(f"--fronts-fractions {text!r}: give at least one fraction")
    return sorted(set(out))


def curve_name(strategy: str, devices: int) -> str:
    return CURVE_LABELS[strategy] if strategy == "student" else f"{CURVE_LABELS[strategy]}, {devices} devices"


def run_fronts(qs_dir: Path, out_dir: Optional[Path] = None, fractions: Sequence[float] = FRONT_FRACTIONS,
               bandwidth: str = "2mbit", sources: Sequence[str] = ("device",), target_ms: Optional[float] = None,
               use_testbed: bool = True, samples: int = 100, max_seconds: float = 30.0, passes: int = 2,
               devices_counts: Sequence[int] = (2, 3), progress: Union[bool, Progress] = True) -> dict[str, Any]:
    """The fronts on the quickstart run in ``qs_dir`` (module doc); writes ``fronts.json``,
    ``fronts.md`` and ``fronts.png`` to ``out_dir`` (default ``qs_dir/fronts``), each
    fraction's bench run beside them (``f<fraction>/bench.json``)."""
    from coformer.compiler.cost import teacher_cost
    from coformer.compiler.families import adapter_for
    from coformer.compiler.predictor import LatencyPredictor
    from coformer.tools.bench.options import parse_bandwidths
    from coformer.tools.bench.runner import BENCH_MEMORY, quickstart_inputs, run_bench
    from coformer.tools.bench.strategies import prepare_bundles

    rates = parse_bandwidths(bandwidth)
    if len(rates) != 1:
        raise CoFormerError(f"--bandwidth {bandwidth!r}: the fronts are measured at one link rate")
    if target_ms is not None and not target_ms > 0:
        raise CoFormerError(f"--target-ms {target_ms} must be > 0")
    progress = Progress.of(progress) or False
    qs_dir = Path(qs_dir)
    teacher, devices, data, bundle, cfg = quickstart_inputs(qs_dir, progress)
    bad = [k for k in devices_counts if not 2 <= k <= len(devices)]
    if bad:
        raise CoFormerError(f"--devices-count {bad}: the fronts' collaborative curves run on 2..{len(devices)} "
                            "devices (the student is the 1-device curve)")
    out_dir = Path(out_dir or qs_dir / "fronts")
    out_dir.mkdir(parents=True, exist_ok=True)
    predictors = [LatencyPredictor.load(qs_dir / "profiles" / f"{d.name}.predictor.json") for d in devices]
    t_flops = teacher_cost(adapter_for(teacher).read_shape(teacher)).flops
    x, y = data.test.head(len(data.test)).numpy(), data.test.y.numpy()
    points, teacher_ms, teacher_acc, teacher_whole = [], [], [], None
    for f in fractions:
        devs = [replace(d, memory_bytes=m, flops_budget=int(f * d.cpu_share * t_flops))
                for d, m in zip(devices, BENCH_MEMORY)]
        setups, paths = [], {}
        for k in (1, *sorted(set(devices_counts))):
            own = bundle if k == len(devices) and abs(f - cfg.flops_fraction) < 1e-9 else None  # the quickstart's
            bundles = prepare_bundles(["teacher", "student"] if k == 1 else ["coformer", "uniform"], own, teacher,
                                      devs[:k], data, qs_dir / "fronts-bundles" / f"f{f:g}" / f"{k}-devices",
                                      boost_epochs=cfg.boost_epochs, aggregator_epochs=cfg.aggregator_epochs,
                                      seed=cfg.seed, progress=progress, predictors=predictors[:k])
            setups.append((devs[:k], bundles))
            paths.update({(s, k): p for s, p in bundles.items()})
        rep = run_bench(setups, x, y, out_dir / f"f{f:g}", rates, sources, use_testbed, samples, max_seconds,
                        progress=progress, passes=passes, throughput=())
        for r in rep["results"]:
            if r["strategy"] == "teacher":
                if r["status"] == "ok":
                    teacher_ms.append(r["latency_ms"]["median"])
                    teacher_acc.append(r["accuracy"])
                continue
            k = r["devices_count"]  # the setup's: a policy may leave a device idle, the curve is still k's
            name = curve_name(r["strategy"], k) + (f" ({r['input_source']} input)" if len(sources) > 1 else "")
            point = {"strategy": r["strategy"], "devices": k, "fraction": f, "input_source": r["input_source"],
                     "status": r["status"], "curve": name}
            if r["status"] == "ok":
                point.update(accuracy=r["accuracy"], median_ms=r["latency_ms"]["median"],
                             p90_ms=r["latency_ms"]["p90"], samples=r["samples"],
                             flops=sum(s["flops"] for s in r.get("submodels", [])),
                             slowest_device_flops=max((s["flops"] for s in r.get("submodels", [])), default=0))
                # the compile's own score, in PyTorch on the whole test split: the served one is
                # on the first ``samples`` images only, a few points of noise at 100
                expected = load_manifest(paths[(r["strategy"], k)], verify=False).expected
                point["test_split_accuracy"] = expected.get("ensemble_accuracy")
                point["test_split_samples"] = expected.get("samples")
                # what the other devices add to the best one alone (None for one device)
                point["collaboration_gain"] = (expected.get("collaboration") or {}).get("gain")
                teacher_whole = expected.get("teacher_accuracy", teacher_whole)
            else:
                point["error"] = r.get("error", "")[-300:]
            points.append(point)
    if not teacher_ms:
        raise CoFormerError("the teacher was not measured in any run: no latency target to compare at")
    teacher_point = {"accuracy": float(np.mean(teacher_acc)), "median_ms": float(np.mean(teacher_ms)),
                     "flops": int(t_flops), "teacher_ms_per_run": teacher_ms, "test_split_accuracy": teacher_whole}
    target = float(target_ms) if target_ms is not None else teacher_point["median_ms"]
    report = {"task": cfg.data, "bandwidth": bandwidth, "input_sources": list(sources), "fractions": list(fractions),
              "teacher": teacher_point, "points": points, "target_ms": target,
              "target_source": "given" if target_ms is not None else "the teacher's median latency",
              "testbed": use_testbed}
    report.update(verdict(report))
    atomic_write_json(out_dir / "fronts.json", report)
    atomic_write_bytes(out_dir / "fronts.md", fronts_markdown(report).encode())
    report["plot"] = plot_fronts(report, out_dir / "fronts.png")
    atomic_write_json(out_dir / "fronts.json", report)
    return report


def scored_on(points: Sequence[dict[str, Any]]) -> str:
    """Which accuracy the verdict and the plot use: the compile's score on the whole test
    split where every point has one (hundreds of images rather than the ``samples`` served:
    a point is one image at 100, so ranking on the served score ranks noise), else the
    served score. The bundle served is the one scored (ONNX parity checked at compile)."""
    return "test_split_accuracy" if points and all(p.get("test_split_accuracy") is not None for p in points) \
        else "accuracy"


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """Each curve's best point within the target, the winner, and the sentence that says so."""
    target = report["target_ms"]
    ok = [p for p in report["points"] if p["status"] == "ok"]
    key = scored_on(ok)
    ok = [{**p, "accuracy": p[key]} for p in ok]
    by_curve: dict[str, list[dict[str, Any]]] = {}
    for p in ok:
        by_curve.setdefault(p["curve"], []).append(p)
    best = {}
    for name, pts in by_curve.items():
        within = [p for p in pts if p["median_ms"] <= target]
        if within:
            b = max(within, key=lambda p: (p["accuracy"], -p["median_ms"]))
            best[name] = {"accuracy": b["accuracy"], "median_ms": b["median_ms"], "fraction": b["fraction"],
                          "samples": b.get("test_split_samples" if key == "test_split_accuracy" else "samples") or 0}
    ranked = sorted(best.items(), key=lambda kv: (-kv[1]["accuracy"], kv[1]["median_ms"]))
    if ranked:  # curves within the noise of the most accurate tie with it, and the fastest of them wins
        top = ranked[0][1]
        noise = TIE_SE * (top["accuracy"] * (1 - top["accuracy"]) / max(1, top["samples"])) ** 0.5
        tied = [kv for kv in ranked if top["accuracy"] - kv[1]["accuracy"] <= noise]
        first = min(tied, key=lambda kv: kv[1]["median_ms"])
        ranked = [first] + [kv for kv in ranked if kv is not first]
    where = f"{target:.2f} ms ({report['target_source']}; accuracy " + \
        ("on the whole test split)" if key == "test_split_accuracy" else "served)")
    if not ranked:
        if not ok:
            return {"at_target": {}, "winner": None, "scored_on": key, "sentence": f"No strategy answered; nothing wins at {where}."}
        fastest = min(ok, key=lambda p: p["median_ms"])
        return {"at_target": {}, "winner": None, "scored_on": key,
                "sentence": f"No strategy answers within {where}; the fastest is {fastest['curve']} at "
                            f"{fastest['median_ms']:.2f} ms ({100 * fastest['accuracy']:.1f}%)."}
    (w, b), rest = ranked[0], ranked[1:]
    sentence = (f"At {where}, {w} wins: {100 * b['accuracy']:.1f}% at {b['median_ms']:.2f} ms "
                f"(fraction {b['fraction']:g})")
    if rest:
        (n, r) = rest[0]
        sentence += f"; next is {n}, {100 * r['accuracy']:.1f}% at {r['median_ms']:.2f} ms"
        if r["accuracy"] >= b["accuracy"]:  # more accurate, but within the noise: the faster wins
            sentence += (f", as accurate within the noise ({TIE_SE:g} standard errors of its score, "
                         f"{100 * noise:.1f} points) and slower")
    return {"at_target": best, "winner": w, "scored_on": key, "sentence": sentence + "."}


def fronts_markdown(report: dict[str, Any]) -> str:
    t = report["teacher"]
    lines = [f"Task: {report['task']}; links {report['bandwidth']}, input from {', '.join(report['input_sources'])}; "
             f"teacher {100 * t['accuracy']:.1f}% served"
             + ("" if t.get("test_split_accuracy") is None else f", {100 * t['test_split_accuracy']:.1f}% on the whole test split")
             + f", at {t['median_ms']:.2f} ms "
             f"(per run: {', '.join(f'{v:.2f}' for v in t['teacher_ms_per_run'])} ms).", "",
             f"**{report['sentence']}**", "",
             "| curve | fraction | accuracy served | whole test split | collaboration gain | median | p90 "
             "| MFLOPs (all devices) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(report["points"], key=lambda p: (p["curve"], p["fraction"])):
        if p["status"] != "ok":
            lines.append(f"| {p['curve']} | {p['fraction']:g} | {p['status']} | | | | | |")
            continue
        whole, gain = p.get("test_split_accuracy"), p.get("collaboration_gain")
        lines.append(f"| {p['curve']} | {p['fraction']:g} | {100 * p['accuracy']:.1f}% | "
                     f"{'-' if whole is None else f'{100 * whole:.1f}%'} | "
                     f"{'-' if gain is None else f'{100 * gain:+.1f} points'} | {p['median_ms']:.2f} ms "
                     f"| {p['p90_ms']:.2f} ms | {p['flops'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def plot_fronts(report: dict[str, Any], path: Path) -> Optional[str]:
    """Accuracy against median latency, one line per curve, the teacher a star and the target
    a dashed line (PNG; None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves: dict[str, list[dict[str, Any]]] = {}
    ok = [p for p in report["points"] if p["status"] == "ok"]
    key = scored_on(ok)
    for p in ok:
        curves.setdefault(p["curve"], []).append({**p, "accuracy": p[key]})
    for name, pts in sorted(curves.items()):
        pts = sorted(pts, key=lambda p: p["median_ms"])
        ax.plot([p["median_ms"] for p in pts], [100 * p["accuracy"] for p in pts], marker="o", label=name)
        for p in pts:
            ax.annotate(f"{p['fraction']:g}", (p["median_ms"], 100 * p["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    t = report["teacher"]
    ax.plot([t["median_ms"]], [100 * t.get(key, t["accuracy"])], marker="*", markersize=12, linestyle="none", color="k",
            label="teacher")
    ax.axvline(report["target_ms"], linestyle="--", color="grey", linewidth=1, label="target")
    ax.set_xscale("log")
    ax.set_xlabel(f"median latency, ms (log; links {report['bandwidth']})")
    ax.set_ylabel("accuracy, % (" + ("whole test split" if key == "test_split_accuracy" else "served") + ")")
    ax.set_title(f"Accuracy against latency: {report['task']} (labels: FLOPs fraction)", fontsize=10)
    ax.legend(fontsize=8)
    from coformer.tools.bench.plots import save_png

    return save_png(fig, path)
