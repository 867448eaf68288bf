"""Where a served request's time goes (issue 39): a bundle served on loopback (``LocalCluster``,
no throttle) while one client sends requests back to back.

    python -m experiments.serving_profile BUNDLE --requests 1000           # CPU per request, per thread
    python -m experiments.serving_profile BUNDLE --py-spy 10                # + py-spy's samples by kind (root)

The first reads each process's and each thread's CPU time from /proc before and after
``--requests`` requests (the Python thread, ZeroMQ's I/O thread; ONNX Runtime runs one thread,
in the caller), beside the engines' compute the replies report. ``--py-spy`` then samples the
central node and edge-b with native frames (``pip install py-spy``) and sorts the samples: ONNX
Runtime, ZeroMQ sends, polling, Python.
"""

import argparse
import collections
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

TICK = os.sysconf("SC_CLK_TCK")


def _threads(pid: int) -> dict[str, float]:
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            st = open(f"/proc/{pid}/task/{t}/stat").read()
        except OSError:
            continue
        f = st.rsplit(")", 1)[1].split()
        out[f"{st[st.index('(') + 1: st.rindex(')')]}:{t}"] = (int(f[11]) + int(f[12])) / TICK
    return out


def cpu_per_request(cluster, x, n: int) -> dict:
    with cluster.client(timeout_s=30) as cl:
        for _ in range(50):
            cl.infer(x)
        pids = {k: p.pid for k, p in cluster.procs.items()}
        before = {k: _threads(p) for k, p in pids.items()}
        me, t0 = time.process_time(), time.perf_counter()
        rtt, compute = [], collections.defaultdict(list)
        for _ in range(n):
            r = cl.infer(x)
            rtt.append(r.round_trip_ms)
            for k, v in r.timing_ms["workers_compute"].items():
                compute[k].append(v)
            compute["central (own sub-model)"].append(r.timing_ms["central_own"])
            compute["central (aggregator)"].append(r.timing_ms["aggregate"])
        wall, me = time.perf_counter() - t0, time.process_time() - me
        after = {k: _threads(p) for k, p in pids.items()}
    per_thread = {k: {t: round((after[k][t] - before[k].get(t, 0.0)) / n * 1e3, 3) for t in after[k]
                      if after[k][t] > before[k].get(t, 0.0)} for k in pids}
    return {"requests": n, "wall_ms_per_request": wall / n * 1e3, "round_trip_ms_median": float(np.median(rtt)),
            "cpu_ms_per_request": {**{k: round(sum(v.values()), 3) for k, v in per_thread.items()},
                                   "client": me / n * 1e3},
            "cpu_ms_per_request_by_thread": per_thread,
            "compute_ms_median": {k: float(np.median(v)) for k, v in compute.items()}}


def py_spy(cluster, x, seconds: float, out_dir: Path) -> dict:
    stop = threading.Event()

    def load() -> None:
        with cluster.client(timeout_s=30) as cl:
            while not stop.is_set():
                cl.infer(x)

    t = threading.Thread(target=load)
    t.start()
    time.sleep(2)
    # the central node and the first worker (a bundle of one device has none)
    names = [n for n in cluster.procs if n.startswith("central-")][:1] + \
        [n for n in cluster.procs if n.startswith("worker-")][:1]
    spies = [subprocess.Popen(["py-spy", "record", "--pid", str(cluster.procs[n].pid), "--duration", str(int(seconds)),
                               "--rate", "200", "--format", "raw", "--native", "-o", str(out_dir / f"{n}.txt")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for n in names]
    for s in spies:
        s.wait()
    stop.set()
    t.join()
    out = {}
    for n in names:
        kinds, total = collections.Counter(), 0
        for line in open(out_dir / f"{n}.txt"):
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            if any("AuthenticationThread" in f for f in frames):
                continue  # the ZAP authenticator's thread, idle in epoll
            total += int(count)
            leaf, whole = frames[-1], ";".join(frames)
            kind = ("ONNX Runtime" if "Session.run" in whole or "onnxruntime" in leaf else
                    "ZeroMQ send" if "zmq_msg_send" in whole or "Socket.send" in whole else
                    "poll" if leaf.startswith("poll") or "Poller.poll" in whole or "Socket.poll" in whole else
                    "sched_yield" if "sched_yield" in leaf else
                    "ZeroMQ recv" if "recv_multipart" in whole else
                    "Python" if ".py:" in leaf or "_json" in leaf or "libpython" in leaf or "numpy" in leaf else
                    "other native")
            kinds[kind] += int(count)
        out[n] = {k: round(v / total, 3) for k, v in kinds.most_common()}
    return out


def main() -> None:
    from coformer.runtime.manifest import load_manifest
    from coformer.tools.cluster import LocalCluster

    p = argparse.ArgumentParser(prog="python -m experiments.serving_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--py-spy", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--out", type=Path, default=Path("serving-profile"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    m = load_manifest(args.bundle)
    x = np.random.default_rng(0).standard_normal([1, *m.input.shape]).astype(np.float32)
    with LocalCluster(args.bundle, throttle="none") as c:
        report = cpu_per_request(c, x, args.requests)
        if args.py_spy > 0:
            report["py_spy_share_of_samples"] = py_spy(c, x, args.py_spy, args.out)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
