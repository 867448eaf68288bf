"""``coformer serve``: a bundle on this machine, the central node and the workers as processes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from coformer.runtime.errors import CoFormerError
from coformer.tools.commands.args import THROTTLES


RESTARTS_PER_MIN = 3


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a bundle on this machine: central node and workers as processes")
    p.add_argument("bundle", type=Path)
    p.add_argument("--front", default="tcp://127.0.0.1:5555", help="endpoint clients connect to")
    p.add_argument("--throttle", default="auto", choices=THROTTLES)
    p.add_argument("--keys", type=Path, default=None,
                   help="key folder from `coformer-runtime keys` (default: throwaway keys for this run; "
                        "clients use the clients/ folder printed at start)")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="each process's log, kept after the run (default: a new folder, printed at start)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C. A worker that exits is restarted (at most ``RESTARTS_PER_MIN`` times a
    minute each); meanwhile the central node answers without it, flagged degraded. A central
    node that exits is restarted on the same endpoints (clients see errors meanwhile). The
    processes end with this one, even when it is killed (``kill -9``). Logs go to
    ``--log-dir`` (default: a new folder, printed) and are kept after the run."""
    import tempfile
    import threading
    import time
    from collections import deque

    from coformer.runtime.worker import install_stop_signals
    from coformer.tools.cluster import LocalCluster

    stop = threading.Event()
    install_stop_signals(stop)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="coformer-serve-logs-"))
    try:
        cluster = LocalCluster(args.bundle, throttle=args.throttle, front=args.front, keys=args.keys,
                               log_dir=log_dir, die_with_parent=True)  # no orphans holding the port after a kill -9
        endpoints = cluster.start()
    except BaseException:
        if args.log_dir is None and log_dir.is_dir() and not any(log_dir.iterdir()):
            log_dir.rmdir()  # a serve refused before any process ran leaves no empty log folder behind
        raise
    restarts: dict[str, deque] = {}
    try:
        m = cluster.manifest
        print(f"serving {args.bundle} ({m.model.get('name')}): clients connect to {endpoints['front']} "
              f"with --keys {cluster.client_keys}")
        print(f"  logs in {log_dir} (kept after the run)")
        for d in m.devices:
            p = cluster.placements[d.device]
            print(f"  {d.device:<12} {d.role:<8} cores {list(p.cores or [])} share {p.cpu_share:.2f}")
        print("press Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            for name, proc in list(cluster.procs.items()):
                if proc.poll() is None:
                    continue
                log_file = log_dir / f"{name}.log"
                recent = restarts.setdefault(name, deque())
                now = time.monotonic()
                while recent and now - recent[0] > 60:
                    recent.popleft()
                if len(recent) >= RESTARTS_PER_MIN:
                    raise CoFormerError(f"{name} exited {len(recent) + 1} times within a minute (code "
                                        f"{proc.returncode}); its log: {log_file}")
                recent.append(now)
                if name.startswith("worker-"):
                    print(f"{name} exited with code {proc.returncode} (log: {log_file}); answering without it, "
                          "degraded, and restarting it", file=sys.stderr, flush=True)
                    cluster.start_worker(name[len("worker-"):])
                else:  # the central node: on the same endpoints, so clients and workers find it again
                    print(f"{name} exited with code {proc.returncode} (log: {log_file}); restarting it on "
                          f"{cluster.endpoints['front']}", file=sys.stderr, flush=True)
                    cluster.restart_central()
    finally:
        cluster.stop()
    return 0
