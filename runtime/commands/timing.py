"""``coformer-runtime time``, ``profile`` and ``benchmark``: a model timed on this device, under its limits."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from coformer.runtime.commands.args import add_limits_args, limits_from_args
from coformer.runtime.commands.infer import model_input
from coformer.runtime.errors import CoFormerError


def register(sub) -> None:
    p = sub.add_parser("time", help="time a model on each sample of a .npy file (batch 1), under device limits")
    p.add_argument("model", type=Path, help=".onnx file")
    p.add_argument("--inputs", type=Path, required=True, help=".npy of model inputs, [N, ...]")
    p.add_argument("--out", type=Path, required=True, help=".npz to write: outputs and latency_ms")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first")
    add_limits_args(p)
    p.set_defaults(run=time_model)

    p = sub.add_parser("profile", help="time every model of a profile kit on this device; write DEVICE.json")
    p.add_argument("kit", type=Path)
    p.add_argument("--out", type=Path, required=True, help="DEVICE.json to write")
    p.add_argument("--device", default="this-device", help="the device's name in devices.yaml")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "onnxruntime-cuda",
                                                                 "onnxruntime-tensorrt", "tensorrt"])
    p.add_argument("--warmup", type=float, default=100.0, help="warm-up per model, ms (trtexec --warmUp)")
    p.add_argument("--iterations", type=int, default=10, help="at least this many runs (trtexec --iterations)")
    p.add_argument("--duration", type=float, default=0.3, help="and at least this many seconds (trtexec --duration)")
    p.add_argument("--idle-time", type=float, default=0.0, help="ms idle before each run (trtexec --idleTime)")
    # default None: the profiler's DEFAULT_ROUNDS, read when the command runs (the profiler is not
    # imported while the parser is built, to keep a worker's start-up light)
    p.add_argument("--rounds", type=int, default=None, help="time every entry this many times, each in a fresh "
                   "session; an entry's latency is the fastest of all its runs (default: the profiler's "
                   "DEFAULT_ROUNDS, in coformer.runtime.profile)")
    p.add_argument("--gap", type=float, default=2.0, help="ms idle between the extra runs that measure how much "
                   "slower a served (idling) device is than back-to-back timing (0: skip)")
    p.add_argument("--extra-rounds", type=int, default=3,
                   help="time an entry again, up to this many more rounds, while its round medians disagree")
    p.add_argument("--tolerance", type=float, default=0.10,
                   help="round medians further apart than this fraction count as disagreeing")
    p.add_argument("--trtexec", action="append", default=[], metavar="ID=TIMES.json",
                   help="use trtexec --exportTimes output for kit entry ID instead of timing it here")
    p.add_argument("--run-trtexec", action="store_true",
                   help="time every other entry with NVIDIA's trtexec (on the PATH) and import its times; "
                        "its --exportTimes files are kept in OUT.trtexec/")
    p.add_argument("--precision", default="fp16", choices=["fp16", "fp32"],
                   help="with --backend tensorrt or --run-trtexec: the precision engines are built at")
    p.add_argument("--no-progress", action="store_true")
    add_limits_args(p)
    p.set_defaults(run=profile)

    p = sub.add_parser("benchmark", help="trtexec-style timing of one model: warm-up, iterations, duration")
    p.add_argument("model", type=Path)
    p.add_argument("--warmup", type=float, default=200.0, help="ms (trtexec --warmUp)")
    p.add_argument("--iterations", type=int, default=10, help="at least this many runs")
    p.add_argument("--duration", type=float, default=3.0, help="and at least this many seconds")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--idle-time", type=float, default=0.0, help="ms idle before each run (trtexec --idleTime)")
    p.add_argument("--json", type=Path, default=None, help="write the full result here")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "onnxruntime-cuda",
                                                                 "onnxruntime-tensorrt", "tensorrt"])
    p.add_argument("--export-times", type=Path, default=None,
                   help="write every run's times here in trtexec's --exportTimes JSON")
    p.add_argument("--precision", default="fp16", choices=["fp16", "fp32"],
                   help="with --backend tensorrt: the precision an ONNX file's engine is built at")
    add_limits_args(p)
    p.set_defaults(run=benchmark)


def time_model(args: argparse.Namespace) -> int:
    import io

    from coformer.runtime.files import atomic_write_bytes
    from coformer.runtime.timing import summarise, time_samples

    if not args.inputs.is_file():
        raise CoFormerError(f"inputs file {args.inputs} does not exist")
    outputs, latency = time_samples(args.model, model_input(np.load(args.inputs)), limits_from_args(args),
                                    threads=args.threads or 1, warmup=args.warmup)
    buf = io.BytesIO()
    np.savez(buf, outputs=outputs, latency_ms=latency)
    atomic_write_bytes(args.out, buf.getvalue())
    print(json.dumps(summarise(latency)))
    return 0


def profile(args: argparse.Namespace) -> int:
    from coformer.runtime.profile import DEFAULT_ROUNDS, profile_kit

    trt = {}
    for item in args.trtexec:
        key, _, path = item.partition("=")
        if not key.isdigit() or not path:
            raise CoFormerError(f"--trtexec {item!r}: expected ID=TIMES.json")
        trt[int(key)] = Path(path)
    prof = profile_kit(args.kit, args.device, args.backend, args.threads or 1, limits_from_args(args), args.warmup,
                       args.iterations, args.duration, args.idle_time, trt,
                       DEFAULT_ROUNDS if args.rounds is None else args.rounds, args.gap,
                       10 if args.gap > 0 else 0, progress=not args.no_progress, out=args.out,
                       extra_rounds=args.extra_rounds, tolerance=args.tolerance,
                       run_trtexec=args.run_trtexec, precision=args.precision)
    st = prof["stability"]
    print(f"{args.out}: {len(prof['entries'])} kit entries timed on {args.device}; a majority of rounds "
          f"within {st['tolerance']:.0%} of each entry's median: {st['within_tolerance_before']:.0%} of "
          f"entries, {st['within_tolerance']:.0%} after timing {st['entries_retimed']} again")
    if st["within_tolerance"] < 0.5:
        print("warning: most entries still disagree between rounds; something else is loading this machine? "
              "A predictor fitted on this profile will be poor: profile again when it is quiet", file=sys.stderr)
    return 0


def benchmark(args: argparse.Namespace) -> int:
    from coformer.runtime.files import atomic_write_json
    from coformer.runtime.timing import benchmark_engine

    from coformer.runtime.trtexec import format_summary, write_export_times

    t = benchmark_engine(args.model, args.backend, args.warmup, args.iterations, args.duration,
                         args.threads or 1, args.batch, limits=limits_from_args(args), idle_ms=args.idle_time,
                         keep_trace=True, precision=args.precision)
    print(f"{args.model.name}: {t.iterations} runs in {t.total_s:.2f} s (backend {args.backend})")
    print(format_summary(t.trtexec))
    if t.compute_ms["median"] > t.trtexec["GPU Compute Time"]["median"] * 1.05:
        print(f"emulated device time (compute + duty-cycle idle): median {t.compute_ms['median']:.3f} ms")
    if args.export_times:
        write_export_times(t.trace, args.export_times)
    if args.json:
        atomic_write_json(args.json, {**t.to_dict(), "trtexec": t.trtexec})
    return 0
