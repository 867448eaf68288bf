"""``coformer-runtime central`` and ``worker``: the two serving roles of a bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from coformer.runtime.commands.args import (add_backend_args, add_limits_args, add_security_args, limits_from_args,
                                            role_keys)


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


def register(sub) -> None:
    p = sub.add_parser("central", help="run the central node: own sub-model, gather, aggregate, answer")
    p.add_argument("bundle", type=Path)
    p.add_argument("--front", default="tcp://127.0.0.1:5555", help="endpoint for clients")
    p.add_argument("--back", default="tcp://127.0.0.1:5556", help="endpoint for workers")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the slowest worker (a request's deadline, at most)")
    p.add_argument("--batch-requests", type=int, default=8,
                   help="serve up to this many queued requests in one round, stacked on the batch axis (1: off)")
    p.add_argument("--queue-limit", type=int, default=256, help="requests waiting past this are answered busy")
    add_backend_args(p)
    add_security_args(p, "central node")
    add_limits_args(p)
    p.set_defaults(run=central)

    p = sub.add_parser("worker", help="run one device's sub-model and send its pooled features")
    p.add_argument("bundle", type=Path)
    p.add_argument("--device", required=True, help="this device's name in the bundle")
    p.add_argument("--central", required=True, help="the central node's back endpoint")
    add_backend_args(p)
    p.add_argument("--local-inputs", type=Path, default=None,
                   help=".npy of model inputs this device captures itself: requests may name a row instead of "
                        "sending the tensor")
    add_security_args(p, "device")
    add_limits_args(p)
    p.set_defaults(run=worker)


def central(args: argparse.Namespace) -> int:
    die_with_parent()
    from coformer.runtime.central import run_central

    run_central(args.bundle, args.front, args.back, limits=limits_from_args(args), threads=args.threads,
                timeout_s=args.timeout, keys=role_keys(args, "central"), insecure=args.insecure,
                batch_requests=args.batch_requests, queue_limit=args.queue_limit, backend=args.backend,
                precision=args.precision)
    return 0


def worker(args: argparse.Namespace) -> int:
    die_with_parent()
    from coformer.runtime.worker import run_worker

    run_worker(args.bundle, args.device, args.central, limits=limits_from_args(args), threads=args.threads,
               local_inputs=args.local_inputs, keys=role_keys(args, "worker"), insecure=args.insecure,
               backend=args.backend, precision=args.precision)
    return 0
