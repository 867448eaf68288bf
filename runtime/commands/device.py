"""``coformer-runtime build-engines`` and ``doctor``: what a device has for serving, and its TensorRT engines."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("build-engines", help="build (or reuse) this device's TensorRT engines beside the bundle's "
                       "ONNX, in BUNDLE/engines/, with a timing cache and a sidecar record")
    p.add_argument("bundle", type=Path)
    p.add_argument("--device", required=True, help="this device's name in the bundle")
    p.add_argument("--precision", default="fp16", choices=["fp16", "fp32"])
    p.set_defaults(run=build_engines)

    p = sub.add_parser("doctor", help="run first on a new device: what it has for serving (ONNX Runtime and each "
                       "provider, TensorRT, Polygraphy, trtexec, CUDA, the GPU), each line tried and, where it fails, "
                       "what to install; with a bundle, its model built, checked and timed on the backend chosen")
    p.add_argument("bundle", type=Path, nargs="?", default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    p.set_defaults(run=doctor)


def build_engines(args: argparse.Namespace) -> int:
    from coformer.runtime.tensorrt_engines import build_engines

    for e in build_engines(args.bundle, args.device, args.precision):
        print(f"{e['model']}: {'built' if e['built'] else 'reused'} {e['engine']}"
              + (f" ({e['reason']}; {e['build_s']:.1f} s)" if e["built"] else ""))
    return 0


def doctor(args: argparse.Namespace) -> int:
    from coformer.runtime.doctor import doctor, format_table, to_dict

    checks = doctor(args.bundle)
    print(format_table(checks))
    if args.json is not None:
        from coformer.runtime.files import atomic_write_json

        atomic_write_json(args.json, to_dict(checks))
    return 0
