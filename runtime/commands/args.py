"""The argument groups the ``coformer-runtime`` roles share (device limits, backend, keys), and what
they build."""

from __future__ import annotations

import argparse
from pathlib import Path


def limits_from_args(args: argparse.Namespace):
    from coformer.runtime.limits import DeviceLimits, parse_cores

    return DeviceLimits(cpu_share=args.cpu_share, cpu_affinity=parse_cores(args.cpu_cores), mode=args.throttle)


def add_limits_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: the bundle's, usually 1)")
    p.add_argument("--cpu-cores", default=None, help="pin to these cores, e.g. '0' or '2,3'")
    p.add_argument("--cpu-share", type=float, default=1.0, help="emulate a device with this share of one core")
    p.add_argument("--throttle", default="auto", choices=["auto", "cgroup", "duty-cycle", "none"],
                   help="how --cpu-share is enforced (auto = duty-cycle; cgroup: a CFS quota, needs root)")


def add_backend_args(p: argparse.ArgumentParser) -> None:
    from coformer.runtime.engines import BACKENDS

    p.add_argument("--backend", default=None, choices=list(BACKENDS),
                   help="engine backend (default: the bundle's, onnxruntime on the CPU); onnxruntime-cuda and "
                        "onnxruntime-tensorrt need onnxruntime-gpu and a GPU; tensorrt needs TensorRT and "
                        "cuda-python, and builds the device's engines on first start")
    p.add_argument("--precision", default="fp16", choices=["fp16", "fp32"],
                   help="with --backend tensorrt: the precision engines are built at (default fp16)")


def add_security_args(p: argparse.ArgumentParser, role: str) -> None:
    p.add_argument("--keys", type=Path, default=None,
                   help=f"this {role}'s key folder from `coformer-runtime keys` (CURVE on every link, and the "
                        "bundle's signature checked against the operator key in it)")
    p.add_argument("--insecure", action="store_true",
                   help="plain TCP on a non-loopback endpoint: anyone who reaches the port may send and read")


def role_keys(args: argparse.Namespace, role: str):
    if args.keys is None:
        return None
    from coformer.runtime.security import load_keys

    return load_keys(args.keys, role)
