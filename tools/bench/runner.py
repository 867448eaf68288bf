"""Serving every strategy's bundle on the emulated devices, in interleaved passes
(:func:`coformer.tools.served.measure_bundles`, each bundle alone for its turn), across
link rates and device counts; and the memory story on the weakest device."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from coformer.runtime.files import atomic_write_bytes, atomic_write_json
from coformer.runtime.errors import CoFormerError
from coformer.runtime.manifest import load_manifest
from coformer.tools.bench.options import (DECOMPOSED, DEFAULT_BANDWIDTHS, INPUT_SOURCES, PRISM_CRS,
                                          PRISM_FINETUNE_EPOCHS, STRATEGIES, STUDENTS, bandwidth_name,
                                          parse_bandwidths)
from coformer.tools.bench.plots import plots
from coformer.tools.bench.report import markdown, physical_limit, ratios
from coformer.tools.bench.strategies import (STUDENT_FILE, bundle_devices, check_bundle_matches, prepare_bundles,
                                             strategies_for)
from coformer.tools.progress import Progress


def memory_story(bed, device: str, teacher_onnx: Path, submodel_onnx: Path, inputs_path: Path,
                 timeout_s: float = 120.0) -> dict[str, Any]:
    """Run the teacher, then the device's own sub-model, inside ``device`` (its memory cgroup):
    each as ``coformer-runtime time`` on a few inputs. Reports ``ok`` with the peak memory, or
    ``out_of_memory`` when the kernel's OOM killer ended it (never a hang: there is a deadline)."""
    import subprocess
    import sys
    import tempfile

    out: dict[str, Any] = {"device": device, "memory_limit_bytes": bed.device(device).memory_bytes}
    few = Path(tempfile.mkdtemp(prefix="coformer-mem-")) / "x.npy"
    np.save(few, np.load(inputs_path)[:5])
    try:
        for what, model in (("teacher", teacher_onnx), ("submodel", submodel_onnx)):
            bed.reset_peak_memory(device)
            kills_before = bed.oom_kills(device)
            cmd = [sys.executable, "-m", "coformer.runtime.cli", "time", str(model), "--inputs", str(few),
                   "--out", str(few.parent / f"{what}.npz"), "--warmup", "1", "--throttle", "none"]
            try:
                done = bed.run(device, cmd, capture_output=True, text=True, timeout=timeout_s)
                code, err = done.returncode, done.stderr
            except subprocess.TimeoutExpired:
                code, err = None, "timed out"
            killed = bed.oom_kills(device) > kills_before or code == -9
            out[what] = {"model": Path(model).name,
                         "status": "ok" if code == 0 else "out_of_memory" if killed else "failed",
                         "exit_code": code, "peak_memory_bytes": bed.peak_memory(device)}
            if out[what]["status"] == "failed":
                out[what]["error"] = err.strip()[-500:]
    finally:
        shutil.rmtree(few.parent, ignore_errors=True)
    return out


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
              samples: int = 200, max_seconds: float = 60.0, warmup: int = 5,
              progress: Union[bool, Progress] = True, memory_check: Optional[dict[str, Any]] = None, passes: int = 3,
              throughput: Sequence[int] = (1, 8), throughput_s: float = 5.0,
              files: Optional[Sequence[Path]] = None) -> dict[str, Any]:
    """Every strategy x bandwidth x input source, for each ``(devices, {strategy: bundle})`` setup
    (one per device count); writes ``bench.json``, ``bench.md`` and plots to ``out_dir``.

    Each strategy gets ``samples`` test samples (at least 10; fewer when
    ``max_seconds`` runs out first), spread over ``passes`` interleaved passes; then
    ``throughput_s`` seconds at each count of concurrent clients in ``throughput``.

    ``x`` is an array of model inputs, or raw texts (a language model's bundles: each text
    is tokenised by the client with the bundle's own tokenizer and sent with the request,
    so ``sources`` must be ``["central"]``). ``y`` is the class labels, or for embedding
    bundles the reference embeddings (the teacher's), which rows are scored against by mean
    cosine and nearest-neighbour agreement in place of accuracy (``report["task"]``).

    ``files``: the image files ``x`` was preprocessed from, for the source ``files`` (the
    client sends each file as it is; the central node forwards it and every device decodes it).
    """
    if passes < 1:
        raise CoFormerError(f"--passes {passes} must be >= 1")
    from coformer.tools import testbed as tb
    from coformer.tools.served import measure_bundles

    say = Progress.of(progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = not isinstance(x, np.ndarray)
    if text and list(sources) != ["central"]:
        raise CoFormerError(f"input sources {list(sources)}: raw text is sent with the request (input from central)")
    if "files" in sources and (files is None or len(files) < len(x)):
        raise CoFormerError("input source files needs the image files the inputs came from: a folder of images as "
                            "--data, with a bundle of a timm teacher")
    inputs_path = out_dir / "inputs.npy"
    if not text:  # the workers with local inputs read them from here
        np.save(inputs_path, np.ascontiguousarray(x))
    if use_testbed:
        check_testbed()
    elif len(bandwidths) > 1:
        raise CoFormerError("a bandwidth sweep needs the testbed (root); without it links are loopback")
    results, memory = [], None
    t0 = time.perf_counter()
    bed = None  # this run's own testbed (its own slot: another bench's is never touched)
    try:
        for devices, bundles in setups:
            k = len(devices)
            for mbit in bandwidths:
                if bed is not None:
                    bed.down()
                bed = tb.up([replace(d, link_mbit_s=mbit) for d in devices]) if use_testbed else None
                bw = bandwidth_name(mbit) if bed else "loopback"
                # Interleaved passes: every strategy runs a slice of the samples, then the next
                # strategy, and round again, so the machine's drift (tens of % over minutes here)
                # falls on all of them alike and the ratios hold. Alone: in the testbed each
                # device's memory limit, its peak and its OOM kills are one bundle's.
                # PRISM runs on every device too: with the input at every device only means travel
                runs = {f"{strategy}-{source}": (strategy, bundle, source) for strategy, bundle in bundles.items()
                        for source in (sources if strategy in ("coformer", "uniform") or strategy.startswith("prism")
                                       else ["central"])}  # one device: no link

                def turn(name: str, p: int, n: int) -> None:
                    if say:
                        strategy, _, source = runs[name]
                        say(f"bench: {strategy:<15} {bw:<8} {k} device(s), input from {source}, pass {p + 1}/{n}")

                measured = measure_bundles(
                    {n: r[1] for n, r in runs.items()}, x, indices=range(min(samples, len(x))), passes=passes,
                    alone=True, warmup=warmup, max_seconds=max_seconds, min_samples=10, bed=bed,
                    local_inputs={n: inputs_path for n, r in runs.items() if r[2] == "device"}, timeout_s=120.0,
                    files={n: files for n, r in runs.items() if r[2] == "files"},
                    log_dir=out_dir / "logs" / f"{bw}-{k}", keep_going=True, on_turn=turn, throughput=throughput,
                    throughput_s=throughput_s)
                for name, (strategy, _, source) in runs.items():
                    m = measured[name]
                    if m.ok:
                        summary = m.summary(y)
                        row = {"status": "ok", **{key: v for key, v in summary.items()
                                                  if key not in ("indices", "predictions", "embeddings")},
                               "predictions": dict(zip(summary["indices"].tolist(), summary["predictions"].tolist()))}
                        manifest = load_manifest(m.bundle, verify=False)  # verified when it was served
                        row["task"] = manifest.task_kind
                        row["devices_used"] = len(manifest.devices)  # devices_count is the setup's (a student: 1 of them)
                        if manifest.strategy == "prism":  # what the exchange should cost, beside what it did
                            plan = manifest.model["plan"]
                            tuned = plan.get("finetune")
                            row["prism"] = {"compression_rate": plan["compression_rate"], "shares": plan["shares"],
                                            "predicted": plan["communication"],
                                            "finetune": None if tuned is None else
                                            {k: tuned[k] for k in ("epochs", "kept", "validation", "seconds")}}
                        if strategy in DECOMPOSED:
                            row.update(physical_limit(row, manifest, mbit if bed else None))
                            row["policy_source"] = manifest.policy.get("source")  # bo, uniform, heuristic
                            row["decomposition"] = manifest.policy.get("decomposition", "nested")
                            # what the other devices add to the best one alone, on the compile's test split
                            row["collaboration"] = manifest.expected.get("collaboration")
                            row["submodels"] = [{"device": d.device, "flops": d.flops, "feature_dim": d.feature_dim}
                                                for d in manifest.devices]
                            if (Path(m.bundle) / STUDENT_FILE).is_file():
                                row["flops_budget"] = json.loads((Path(m.bundle) / STUDENT_FILE).read_text())["flops_budget"]
                    else:  # a device ran out of memory, a process died, a timeout
                        row = {"status": m.status, "error": m.error[-1000:], "out_of_memory_on": m.out_of_memory_on,
                               "predictions": {}}
                        if say:
                            say(f"bench: {strategy} {m.status}: {m.error.splitlines()[0]}")
                    results.append({"strategy": strategy, "bandwidth": bw, "bandwidth_mbit_s": mbit if bed else None,
                                    "devices_count": k, "input_source": source, **row})
                if bed is not None and memory_check and memory is None and memory_check["device"] in \
                        [d.name for d in devices]:
                    memory = memory_story(bed, inputs_path=inputs_path, **memory_check)
    finally:
        if bed is not None:
            bed.down()
    teacher_preds = {(r["bandwidth"], r["devices_count"]): r["predictions"] for r in results
                     if r["strategy"] == "teacher" and r["status"] == "ok"}
    for r in results:
        ref = teacher_preds.get((r["bandwidth"], r["devices_count"]))
        both = sorted(set(ref or {}) & set(r["predictions"]))
        if both and r["status"] == "ok" and r.get("task") != "embedding":  # over the samples both ran
            r["agreement_with_teacher"] = float(np.mean([ref[i] == r["predictions"][i] for i in both]))
    largest = max(setups, key=lambda s: len(s[0]))[0]
    embedding = np.asarray(y).ndim == 2  # the teacher's embeddings, not labels
    report = {"task": "embedding" if embedding else "classification",
              "results": [{k: v for k, v in r.items() if k != "predictions"} for r in results],
              "ratios": ratios([r for r in results if r["status"] == "ok"]), "memory": memory,
              "devices": [{"name": d.name, "cpu_share": d.cpu_share, "memory_bytes": d.memory_bytes}
                          for d in largest],
              "testbed": use_testbed, "wall_time_s": time.perf_counter() - t0,
              # the emulation's known optimism: one packet per message crosses an idle link unpaced
              "links": {bandwidth_name(m): {"mbit_s": m, "mtu": tb.link_mtu(m), "burst_bytes": tb.link_burst(m),
                                      "unpaced_ms_per_message_max": tb.link_burst(m) * 8 / (m * 1e3)}
                        for m in bandwidths} if use_testbed else {}}
    atomic_write_json(out_dir / "bench.json", report)
    atomic_write_bytes(out_dir / "bench.md", markdown(report).encode())
    report["plots"] = plots(report, out_dir)
    atomic_write_json(out_dir / "bench.json", report)
    return report


def quickstart_inputs(qs_dir: Path, progress: Union[bool, Progress] = True):
    """The quickstart's teacher, devices, data and bundle, running the quickstart first if needed."""
    from coformer.tools.quickstart import load_quickstart, run_quickstart

    say = Progress.of(progress)
    qs_dir = Path(qs_dir)
    if not (qs_dir / "report.json").is_file() or not (qs_dir / "bundle" / "manifest.json").is_file():
        if say:
            say(f"bench: no quickstart run in {qs_dir}; running it first")
        run_quickstart(qs_dir, progress=bool(progress))
    qs = load_quickstart(qs_dir, bool(progress), say=say)
    return qs.teacher, qs.devices, qs.data, qs_dir / "bundle", qs.config


BENCH_MEMORY = (1 << 30, 512 << 20, 192 << 20)  # per quickstart device on the testbed; see run_quickstart_bench


def run_quickstart_bench(qs_dir: Path = Path("coformer-quickstart"), out_dir: Optional[Path] = None,
                         bandwidths: str = DEFAULT_BANDWIDTHS, strategies: Sequence[str] = STRATEGIES,
                         sources: Sequence[str] = INPUT_SOURCES, samples: int = 200, max_seconds: float = 60.0,
                         use_testbed: bool = True, progress: bool = True,
                         devices_counts: Optional[Sequence[int]] = None, passes: int = 3,
                         throughput: Sequence[int] = (1, 8), throughput_s: float = 5.0,
                         prism_crs: Sequence[int] = PRISM_CRS,
                         prism_finetune: int = PRISM_FINETUNE_EPOCHS) -> dict[str, Any]:
    """``coformer bench --quickstart``: every strategy on the quickstart's three devices, 2 Mbit/s links.

    On the testbed the devices get 1 GiB / 512 MiB / 192 MiB of memory: the
    teacher fits on the central device, not on edge-c, which still runs its
    sub-model (the memory story, checked after the first bandwidth).
    ``devices_counts`` (e.g. ``[1, 2, 3]``) also runs the first k devices
    alone: their CoFormer bundle is searched with the quickstart's predictors.
    """
    from coformer.compiler.predictor import LatencyPredictor

    progress = Progress.of(progress) or False  # one clock for the whole bench
    teacher, devices, data, bundle, cfg = quickstart_inputs(qs_dir, progress)
    devices = [replace(d, memory_bytes=m) for d, m in zip(devices, BENCH_MEMORY)]
    counts = sorted(set(devices_counts or [len(devices)]))
    if counts[0] < 1 or counts[-1] > len(devices):
        raise CoFormerError(f"--devices-count {counts}: the quickstart has {len(devices)} devices (1..{len(devices)})")
    out_dir = Path(out_dir or Path(qs_dir) / "bench")
    setups = []
    for k in counts:
        full = k == len(devices)
        predictors = None  # CoFormer's search when it is compiled here, and the students'
        if (not full and "coformer" in strategies) or set(STUDENTS) & set(strategies):
            predictors = [LatencyPredictor.load(Path(qs_dir) / "profiles" / f"{d.name}.predictor.json") for d in devices[:k]]
        here = [s for s in strategies if not (s == "prism" and k < 2)]  # PRISM shares positions among devices
        bundles = prepare_bundles(here, bundle if full else None, teacher, devices[:k], data,
                                  Path(qs_dir) / "baselines" / ("" if full else f"{k}-devices"),
                                  boost_epochs=cfg.boost_epochs, aggregator_epochs=cfg.aggregator_epochs,
                                  seed=cfg.seed, progress=progress, predictors=predictors, prism_crs=prism_crs,
                                  prism_finetune=prism_finetune)
        setups.append((devices[:k], bundles))
    memory_check = None
    if use_testbed and "teacher" in strategies and "coformer" in strategies:

        weakest = devices[-1].name
        teacher_bundle = setups[-1][1]["teacher"]
        memory_check = {"device": weakest,
                        "teacher_onnx": teacher_bundle / load_manifest(teacher_bundle).central.artifact,
                        "submodel_onnx": bundle / load_manifest(bundle).device(weakest).artifact}
    x, y = data.test.head(len(data.test)).numpy(), data.test.y.numpy()
    return run_bench(setups, x, y, out_dir, parse_bandwidths(bandwidths), sources, use_testbed,
                     samples, max_seconds, progress=progress, memory_check=memory_check, passes=passes,
                     throughput=throughput, throughput_s=throughput_s)


def run_model_bench(bundle: Path, teacher, devices, data, out_dir: Optional[Path] = None,
                    strategies: Optional[Sequence[str]] = None, sources: Sequence[str] = INPUT_SOURCES,
                    bandwidths: str = DEFAULT_BANDWIDTHS, use_testbed: bool = True, samples: int = 200,
                    max_seconds: float = 60.0, progress: bool = True, passes: int = 3,
                    boost_epochs: Optional[int] = None,
                    compute=None, throughput: Sequence[int] = (1, 8), throughput_s: float = 5.0,
                    prism_crs: Sequence[int] = PRISM_CRS,
                    prism_finetune: int = PRISM_FINETUNE_EPOCHS) -> dict[str, Any]:
    """``coformer bench BUNDLE --model ... --devices ... --data ...``: the user's bundle against
    every strategy the teacher's family has (:func:`strategies_for`), built from the same
    teacher, on the first ``samples`` of the data's test split.

    Without labels (a flat image folder) accuracy is agreement with the teacher's own
    decisions in PyTorch (``reference: teacher`` in the report). An embedding bundle's rows
    are scored against the teacher's embeddings instead (mean cosine, nearest-neighbour
    agreement; ``reference: teacher embedding``), its students distilled to them.

    The other strategies' sub-models are calibrated with the bundle's own settings (its
    manifest's ``model.calibration_settings``: epochs, learning rate, residual; ``boost_epochs``
    overrides the epochs), so the comparison is at the same data and epochs; a bundle from
    before those were recorded gets ``boost_epochs`` (default 5) and the defaults.
    """
    import torch

    from coformer.compiler.inference import run_batched

    progress = Progress.of(progress) or False  # one clock for the whole bench
    manifest = load_manifest(bundle)
    embedding = manifest.task_kind == "embedding"
    text = manifest.input.is_text
    if text:
        # Choice written down: a text reaches the system at one place, with the request; its
        # tokens are a few hundred bytes, which the central node forwards to the workers (the
        # rows' bytes count them). Inputs already at every device are an image deployment's case.
        if "central" not in sources:
            raise CoFormerError(f"--input-source {','.join(sources)}: a text bundle's tokens come with the request "
                                "to the central node; bench it with --input-source central")
        sources = ["central"]
    devices = bundle_devices(manifest, devices)
    check_bundle_matches(manifest, teacher, data)
    available = strategies_for(teacher, manifest.task_kind)
    strategies = list(strategies or available)
    refused = [s for s in strategies if s not in available]
    if refused:
        what = "an embedding bundle of this teacher" if embedding else "this teacher"
        raise CoFormerError(f"--strategies {refused} cannot be built for {what}; it has {list(available)}")
    out = Path(out_dir or Path(bundle).resolve().parent / "bench")
    predictors = None  # the students are searched over the central device's predictor, where it has a profile
    if set(STUDENTS) & set(strategies) and devices[0].profile:
        from coformer.compiler.predictor import predictor_for

        predictors = [predictor_for(Path(devices[0].profile))[0]]
    # the others are calibrated as the bundle was (its manifest says how) and answer what it answers
    bundles = prepare_bundles(strategies, bundle, teacher, devices, data, out / "bundles", boost_epochs=boost_epochs,
                              progress=progress, compute=compute, predictors=predictors, prism_crs=prism_crs,
                              prism_finetune=prism_finetune, calibration=manifest.model.get("calibration_settings"),
                              task=dict(manifest.task))
    x = data.test.head(samples)
    if embedding:  # the teacher's embedding in float32 on the CPU, as the compile scored it
        from coformer.compiler.families import adapter_for
        from coformer.compiler.tasks import TeacherEmbedding

        target = TeacherEmbedding(adapter_for(teacher), teacher.eval(), bool(manifest.task.get("normalize")))
        y, reference = run_batched(target, x).numpy(), "teacher embedding"
    elif data.test.y is not None:
        y, reference = data.test.y[: len(x)].numpy(), "labels"
    else:
        # the reference in float32 on the CPU, as the served teacher's ONNX computes it
        y, reference = run_batched(teacher, x).argmax(-1).numpy(), "teacher"
    with torch.no_grad():
        # raw texts, each tokenised by the client as a user's would be; or the image inputs
        x = [data.test.raw[i] for i in range(len(x))] if text else x.numpy()
    # an image folder's test files, for the source that sends them as they are
    files = [Path(p) for p in data.test.raw[: len(x)]] if "files" in sources and not text and \
        data.test.source is not None and manifest.input.preprocessing.get("source") == "timm" else None
    report = run_bench([(devices, bundles)], x, y, out, parse_bandwidths(bandwidths), sources, use_testbed,
                       samples, max_seconds, progress=progress, passes=passes, throughput=throughput,
                       throughput_s=throughput_s, files=files)
    report["accuracy_reference"] = reference
    atomic_write_json(out / "bench.json", report)
    return report


def is_text_quickstart(qs_dir: Path) -> bool:
    """Whether ``qs_dir`` holds a ``coformer quickstart --task text`` run."""
    report = Path(qs_dir) / "report.json"
    return report.is_file() and json.loads(report.read_text()).get("task") == "text"


def text_quickstart_inputs(qs_dir: Path):
    """A text quickstart run's teacher (rebuilt from its HF checkpoint), its emulated devices
    (with the bench's memory limits and the predictors it fitted), its data (the built-in reviews
    it was calibrated on) and its config."""
    import dataclasses

    from coformer.calibration.text import SENTIMENT_LABELS, sentiment_records, text_dataset
    from coformer.compiler.cost import teacher_cost
    from coformer.compiler.families import adapter_for
    from coformer.compiler.hf import encoder_for, fit_head, load_hf
    from coformer.tools.quickstart import make_devices
    from coformer.tools.quickstart_text import TextQuickstartConfig

    report = json.loads((Path(qs_dir) / "report.json").read_text())
    known = {f.name for f in dataclasses.fields(TextQuickstartConfig)}
    cfg = TextQuickstartConfig(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in report["quickstart_config"].items() if k in known})
    teacher = load_hf(Path(report["teacher"]["checkpoint"]), max_length=cfg.max_length)
    data = text_dataset(sentiment_records(cfg.examples, cfg.seed), encoder_for(teacher, pair=False),
                        labels=SENTIMENT_LABELS)
    fit_head(teacher, data)  # as the quickstart did: a T5 encoder's head, the same every run
    devices = make_devices(cfg, teacher_cost(adapter_for(teacher).read_shape(teacher)).flops)
    fitted = {d.name: Path(qs_dir) / "profiles" / f"{d.name}.predictor.json" for d in devices}
    devices = [replace(d, memory_bytes=m, profile=str(fitted[d.name]) if fitted[d.name].is_file() else d.profile)
               for d, m in zip(devices, BENCH_MEMORY)]
    return teacher, devices, data, cfg


def run_text_quickstart_bench(qs_dir: Path, out_dir: Optional[Path] = None, bandwidths: str = DEFAULT_BANDWIDTHS,
                              strategies: Optional[Sequence[str]] = None, samples: int = 200,
                              max_seconds: float = 60.0, use_testbed: bool = True, progress: bool = True,
                              passes: int = 3, throughput: Sequence[int] = (1, 8),
                              throughput_s: float = 5.0, sources: Sequence[str] = ("central",),
                              prism_crs: Sequence[int] = PRISM_CRS,
                              prism_finetune: int = PRISM_FINETUNE_EPOCHS) -> dict[str, Any]:
    """``coformer bench --quickstart DIR`` on a text quickstart: its bundle against the teacher
    alone, uniform and the students (:func:`run_model_bench`), with the teacher rebuilt from
    the run's HF checkpoint, its data (the built-in reviews it was calibrated on) and its
    three emulated devices, on the testbed with the vision bench's memory limits
    (``BENCH_MEMORY``). The students are searched by DeBo over the central device's
    predictor the quickstart fitted (``DIR/profiles``); a run from before the text
    quickstart profiled its devices has none, and its students are the largest sub-model
    that fits (``policy_source: uniform``)."""
    teacher, devices, data, cfg = text_quickstart_inputs(qs_dir)
    return run_model_bench(Path(qs_dir) / "bundle", teacher, devices, data, out_dir or Path(qs_dir) / "bench",
                           strategies, sources, bandwidths, use_testbed, samples, max_seconds, progress, passes,
                           cfg.boost_epochs, throughput=throughput, throughput_s=throughput_s, prism_crs=prism_crs,
                           prism_finetune=prism_finetune)
