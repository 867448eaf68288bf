"""``coformer-runtime``: run one role of a served bundle on a device (no torch needed).

  coformer-runtime central BUNDLE --front tcp://*:5555 --back tcp://*:5556
  coformer-runtime worker  BUNDLE --device jetson-nano --central tcp://10.0.0.2:5556
  coformer-runtime infer   BUNDLE --central tcp://10.0.0.2:5555 --input x.npy
  coformer-runtime infer   BUNDLE --central tcp://10.0.0.2:5555 --image photo.jpg --top-k 5
  coformer-runtime verify  BUNDLE
  coformer-runtime doctor  [BUNDLE]   (run first on a new device: what works, what to install)
  coformer-runtime keys    KEYS --bundle BUNDLE --clients laptop   (key folders per role; signs BUNDLE)
  coformer-runtime sign    BUNDLE --key KEYS/operator/operator.signing

Off loopback every link is authenticated and encrypted (ZeroMQ CURVE): give each
role its folder from `keys` with --keys, or --insecure to run plain TCP.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from coformer.runtime.errors import CoFormerError


def _limits(args: argparse.Namespace):
    from coformer.runtime.limits import DeviceLimits, parse_cores

    return DeviceLimits(cpu_share=args.cpu_share, cpu_affinity=parse_cores(args.cpu_cores), mode=args.throttle)


def _add_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: the bundle's, usually 1)")
    p.add_argument("--cpu-cores", default=None, help="pin to these cores, e.g. '0' or '2,3'")
    p.add_argument("--cpu-share", type=float, default=1.0, help="emulate a device with this share of one core")
    p.add_argument("--throttle", default="auto", choices=["auto", "cgroup", "duty-cycle", "none"],
                   help="how --cpu-share is enforced (auto = duty-cycle; cgroup: a CFS quota, needs root)")


def _add_backend(p: argparse.ArgumentParser) -> None:
    from coformer.runtime.engines import BACKENDS

    p.add_argument("--backend", default=None, choices=list(BACKENDS),
                   help="engine backend (default: the bundle's, onnxruntime on the CPU); onnxruntime-cuda and "
                        "onnxruntime-tensorrt need onnxruntime-gpu and a GPU; tensorrt needs TensorRT and "
                        "cuda-python, and builds the device's engines on first start")
    p.add_argument("--precision", default="fp16", choices=["fp16", "fp32"],
                   help="with --backend tensorrt: the precision engines are built at (default fp16)")


def _add_security(p: argparse.ArgumentParser, role: str) -> None:
    p.add_argument("--keys", type=Path, default=None,
                   help=f"this {role}'s key folder from `coformer-runtime keys` (CURVE on every link, and the "
                        "bundle's signature checked against the operator key in it)")
    p.add_argument("--insecure", action="store_true",
                   help="plain TCP on a non-loopback endpoint: anyone who reaches the port may send and read")


def _role_keys(args: argparse.Namespace, role: str):
    if args.keys is None:
        return None
    from coformer.runtime.security import load_keys

    return load_keys(args.keys, role)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coformer-runtime", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("central", help="run the central node: own sub-model, gather, aggregate, answer")
    p.add_argument("bundle", type=Path)
    p.add_argument("--front", default="tcp://127.0.0.1:5555", help="endpoint for clients")
    p.add_argument("--back", default="tcp://127.0.0.1:5556", help="endpoint for workers")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the slowest worker (a request's deadline, at most)")
    p.add_argument("--batch-requests", type=int, default=8,
                   help="serve up to this many queued requests in one round, stacked on the batch axis (1: off)")
    p.add_argument("--queue-limit", type=int, default=256, help="requests waiting past this are answered busy")
    _add_backend(p)
    _add_security(p, "central node")
    _add_limits(p)

    p = sub.add_parser("worker", help="run one device's sub-model and send its pooled features")
    p.add_argument("bundle", type=Path)
    p.add_argument("--device", required=True, help="this device's name in the bundle")
    p.add_argument("--central", required=True, help="the central node's back endpoint")
    _add_backend(p)
    p.add_argument("--local-inputs", type=Path, default=None,
                   help=".npy of model inputs this device captures itself: requests may name a row instead of "
                        "sending the tensor")
    _add_security(p, "device")
    _add_limits(p)

    p = sub.add_parser("infer", help="send one input (.npy, model input or raw data, or text) and print the answer")
    p.add_argument("bundle", type=Path)
    p.add_argument("--central", default="tcp://127.0.0.1:5555", help="the central node's front endpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, help=".npy file")
    src.add_argument("--text", nargs="+", metavar="TEXT",
                     help="text bundles: one text per argument (a sentence-pair bundle takes exactly two: the pair)")
    src.add_argument("--image", nargs="+", type=Path, metavar="FILE",
                     help="image bundles: JPEG, PNG or WebP files, preprocessed here as the bundle records "
                          "(needs Pillow: pip install 'coformer[image]')")
    p.add_argument("--top-k", type=int, default=5, help="with --image: the most likely labels to print")
    p.add_argument("--embed", action="store_true",
                   help="an embedding bundle: print the embedding of each text, image or input row")
    p.add_argument("--raw", action="store_true", help="apply the bundle's preprocessing to the input first")
    p.add_argument("--timeout", type=float, default=30.0)
    _add_security(p, "client")

    p = sub.add_parser("time", help="time a model on each sample of a .npy file (batch 1), under device limits")
    p.add_argument("model", type=Path, help=".onnx file")
    p.add_argument("--inputs", type=Path, required=True, help=".npy of model inputs, [N, ...]")
    p.add_argument("--out", type=Path, required=True, help=".npz to write: outputs and latency_ms")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first")
    _add_limits(p)

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
    _add_limits(p)

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
    _add_limits(p)

    p = sub.add_parser("build-engines", help="build (or reuse) this device's TensorRT engines beside the bundle's "
                       "ONNX, in BUNDLE/engines/, with a timing cache and a sidecar record")
    p.add_argument("bundle", type=Path)
    p.add_argument("--device", required=True, help="this device's name in the bundle")
    p.add_argument("--precision", default="fp16", choices=["fp16", "fp32"])

    p = sub.add_parser("doctor", help="run first on a new device: what it has for serving (ONNX Runtime and each "
                       "provider, TensorRT, Polygraphy, trtexec, CUDA, the GPU), each line tried and, where it fails, "
                       "what to install; with a bundle, its model built, checked and timed on the backend chosen")
    p.add_argument("bundle", type=Path, nargs="?", default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")

    p = sub.add_parser("verify", help="check a bundle's manifest and the SHA-256 of every artifact")
    p.add_argument("bundle", type=Path)
    p.add_argument("--keys", type=Path, default=None,
                   help="a key folder holding operator.pub: also check the operator's signature")

    p = sub.add_parser("keys", help="write CURVE key pairs for the central node, each device and each client, "
                                    "and the operator's signing key; sign the bundle")
    p.add_argument("out", type=Path, help="folder for the keys: one sub-folder per role, to copy to its machine")
    p.add_argument("--bundle", type=Path, required=True, help="the bundle whose devices get keys (and is signed)")
    p.add_argument("--clients", nargs="+", default=["client"], metavar="NAME", help="one key per client")

    p = sub.add_parser("sign", help="sign a bundle's manifest with the operator's key (after a recompile)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--key", type=Path, required=True, help="operator/operator.signing from `coformer-runtime keys`")
    return parser


def _model_input(x: np.ndarray) -> np.ndarray:
    """Integer arrays (token ids) stay int64; anything else becomes float32."""
    return x.astype(np.int64) if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32)


PARENT_ENV = "COFORMER_PARENT_PID"  # set by a launcher whose roles must not outlive it (coformer serve)


def die_with_parent() -> None:
    """End this role when the process that launched it dies, even by ``kill -9``: with
    ``COFORMER_PARENT_PID`` set, the kernel sends SIGTERM at the launcher's death (Linux's
    ``PR_SET_PDEATHSIG``), and a launcher already gone by now ends it at once. Elsewhere, or
    without the variable, nothing changes."""
    import os
    import signal

    want = os.environ.get(PARENT_ENV)
    if not want or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if str(os.getppid()) != want:  # it died before the line above: no signal will come
        raise SystemExit(f"the launcher (pid {want}) is gone; not serving")


def run(args: argparse.Namespace) -> int:
    if args.command in ("central", "worker"):
        die_with_parent()
    if args.command == "central":
        from coformer.runtime.central import run_central

        run_central(args.bundle, args.front, args.back, limits=_limits(args), threads=args.threads,
                    timeout_s=args.timeout, keys=_role_keys(args, "central"), insecure=args.insecure,
                    batch_requests=args.batch_requests, queue_limit=args.queue_limit, backend=args.backend,
                    precision=args.precision)
    elif args.command == "worker":
        from coformer.runtime.worker import run_worker

        run_worker(args.bundle, args.device, args.central, limits=_limits(args), threads=args.threads,
                   local_inputs=args.local_inputs, keys=_role_keys(args, "worker"), insecure=args.insecure,
                   backend=args.backend, precision=args.precision)
    elif args.command == "infer":
        from coformer.runtime.client import Client
        from coformer.runtime.manifest import load_manifest
        from coformer.runtime.preprocess import preprocess

        keys = _role_keys(args, "client")
        manifest = load_manifest(args.bundle, verify=False, trust=keys.operator if keys else None)
        connect = {"timeout_s": args.timeout, "keys": keys, "insecure": args.insecure}
        if args.embed or manifest.task_kind == "embedding":
            if manifest.task_kind != "embedding":
                raise CoFormerError("--embed needs an embedding bundle; this one classifies (drop --embed)")
            if args.text is not None:
                items = [args.text] if manifest.input.preprocessing.get("pair") else args.text
            elif args.image is not None:
                items = [str(f) for f in args.image]
            else:
                if not args.input.is_file():
                    raise CoFormerError(f"input file {args.input} does not exist")
                items = np.load(args.input)
                items = preprocess(manifest.input.preprocessing, items) if args.raw else _model_input(items)
                if items.ndim == len(manifest.input.shape):
                    items = items[None]
            with Client(args.central, **connect) as client:
                vectors = client.embed(items, args.bundle)
            print(json.dumps({"embedding": vectors.tolist(), "dim": int(vectors.shape[1]),
                              "normalized": bool(manifest.task.get("normalize"))}))
            return 0
        if args.text is not None:
            from coformer.runtime.text import TextEncoder

            encoder = TextEncoder.from_bundle(args.bundle, manifest)
            texts = [args.text] if encoder.spec["pair"] else args.text
            with Client(args.central, **connect) as client:
                labels, result = client.classify(texts, encoder, manifest.labels)
            print(json.dumps({"label": labels, "logits": result.logits.tolist(),
                              "round_trip_ms": round(result.round_trip_ms, 3)}))
            return 0
        if args.image is not None:
            with Client(args.central, **connect) as client:
                answers, results = client.classify_images(args.image, manifest, top_k=args.top_k)
            print(json.dumps({"images": [{"file": str(f), "top_k": [{"label": lab, "probability": round(p, 6)}
                                                                      for lab, p in a]}
                                         for f, a in zip(args.image, answers)],
                              "round_trip_ms": round(sum(r.round_trip_ms for r in results), 3)}))
            return 0
        if manifest.input.is_text:
            raise CoFormerError("this bundle takes text: use --text")
        if not args.input.is_file():
            raise CoFormerError(f"input file {args.input} does not exist")
        x = np.load(args.input)
        x = preprocess(manifest.input.preprocessing, x) if args.raw else x.astype(np.float32)
        if x.ndim == len(manifest.input.shape):
            x = x[None]
        with Client(args.central, **connect) as client:
            result = client.infer(x)
        labels = manifest.labels
        print(json.dumps({
            "label": [labels[i] if i < len(labels) else i for i in result.label_index],
            "logits": result.logits.tolist(),
            "round_trip_ms": round(result.round_trip_ms, 3),
        }))
    elif args.command == "time":
        import io

        from coformer.runtime.files import atomic_write_bytes
        from coformer.runtime.timing import summarise, time_samples

        if not args.inputs.is_file():
            raise CoFormerError(f"inputs file {args.inputs} does not exist")
        outputs, latency = time_samples(args.model, _model_input(np.load(args.inputs)), _limits(args),
                                        threads=args.threads or 1, warmup=args.warmup)
        buf = io.BytesIO()
        np.savez(buf, outputs=outputs, latency_ms=latency)
        atomic_write_bytes(args.out, buf.getvalue())
        print(json.dumps(summarise(latency)))
    elif args.command == "profile":
        from coformer.runtime.profile import DEFAULT_ROUNDS, profile_kit

        trt = {}
        for item in args.trtexec:
            key, _, path = item.partition("=")
            if not key.isdigit() or not path:
                raise CoFormerError(f"--trtexec {item!r}: expected ID=TIMES.json")
            trt[int(key)] = Path(path)
        prof = profile_kit(args.kit, args.device, args.backend, args.threads or 1, _limits(args), args.warmup,
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
    elif args.command == "benchmark":
        from coformer.runtime.files import atomic_write_json
        from coformer.runtime.timing import benchmark_engine

        from coformer.runtime.trtexec import format_summary, write_export_times

        t = benchmark_engine(args.model, args.backend, args.warmup, args.iterations, args.duration,
                             args.threads or 1, args.batch, limits=_limits(args), idle_ms=args.idle_time,
                             keep_trace=True, precision=args.precision)
        print(f"{args.model.name}: {t.iterations} runs in {t.total_s:.2f} s (backend {args.backend})")
        print(format_summary(t.trtexec))
        if t.compute_ms["median"] > t.trtexec["GPU Compute Time"]["median"] * 1.05:
            print(f"emulated device time (compute + duty-cycle idle): median {t.compute_ms['median']:.3f} ms")
        if args.export_times:
            write_export_times(t.trace, args.export_times)
        if args.json:
            atomic_write_json(args.json, {**t.to_dict(), "trtexec": t.trtexec})
    elif args.command == "build-engines":
        from coformer.runtime.tensorrt_engines import build_engines

        for e in build_engines(args.bundle, args.device, args.precision):
            print(f"{e['model']}: {'built' if e['built'] else 'reused'} {e['engine']}"
                  + (f" ({e['reason']}; {e['build_s']:.1f} s)" if e["built"] else ""))
    elif args.command == "doctor":
        from coformer.runtime.doctor import doctor, format_table, to_dict

        checks = doctor(args.bundle)
        print(format_table(checks))
        if args.json is not None:
            from coformer.runtime.files import atomic_write_json

            atomic_write_json(args.json, to_dict(checks))
    elif args.command == "verify":
        from coformer.runtime.manifest import load_manifest

        from coformer.runtime.security import SIGNATURE_NAME, load_keys

        trust = None
        if args.keys is not None:
            trust = load_keys(args.keys, "central" if (args.keys / "clients").is_dir() else "worker").operator
            if trust is None:
                raise CoFormerError(f"key folder {args.keys} has no operator.pub to check the signature with")
        m = load_manifest(args.bundle, verify=True, trust=trust)
        signed = ("signature checked" if trust is not None else
                  "signature present, not checked (give --keys)" if (args.bundle / SIGNATURE_NAME).is_file()
                  else "not signed")
        print(f"{args.bundle}: OK, {len(m.files)} files verified, {signed}, devices {[d.device for d in m.devices]}")
    elif args.command == "keys":
        from coformer.runtime.manifest import load_manifest
        from coformer.runtime.security import OPERATOR_SECRET, sign_bundle, write_keys

        m = load_manifest(args.bundle, verify=True)
        folders = write_keys(args.out, [w.device for w in m.workers], args.clients)
        sig = sign_bundle(args.bundle, folders["operator"] / OPERATOR_SECRET)
        print(f"{args.out}: keys for central ({m.central.device}), workers {[w.device for w in m.workers]} and "
              f"clients {args.clients}; {args.bundle} signed ({sig.name})")
        for role, folder in folders.items():
            where = ("stays with the operator: its secret signs bundles" if role == "operator" else
                     f"copy to the machine of {role}, and run it with --keys pointing there")
            print(f"  {folder}: {where}")
    elif args.command == "sign":
        from coformer.runtime.manifest import load_manifest
        from coformer.runtime.security import sign_bundle

        load_manifest(args.bundle, verify=True)  # never sign a bundle whose files do not match
        print(f"{args.bundle}: signed ({sign_bundle(args.bundle, args.key).name})")
    return 0


def cli_main(prog: str, parser: argparse.ArgumentParser, run_fn, argv: Optional[Sequence[str]] = None) -> int:
    """Parse, set up logging, run; a :class:`CoFormerError` becomes one line and exit code 2.

    Shared by ``coformer`` and ``coformer-runtime``. Other exceptions are bugs
    and keep their traceback.
    """
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        return run_fn(args)
    except CoFormerError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli_main("coformer-runtime", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
