"""Soak a served bundle: N clients for T seconds against a local cluster.

  python -m coformer.tools.soak BUNDLE --clients 1,8 --seconds 60
  python -m coformer.tools.soak BUNDLE --clients 1 --seconds 60 --compare-plain
  python -m coformer.tools.soak BUNDLE --clients 4 --seconds 30 --deadline 0.5 \
      --kill edge-b --kill-at 10 --restart-after 5

Reports, for each client count: answers per second, round-trip p50/p99, answers lost
(no reply by the deadline), duplicated or mismatched (a reply to an id already answered,
or logits that differ from the single-request answer for that input), error replies by
code, and the RSS of every process after warm-up and at the end.

``--compare-plain`` serves the bundle twice, with CURVE (the default) and in plain TCP,
and alternates short rounds between the two, so both see the same machine drift; it
reports the ratio of their round-trip medians (issue 19: CURVE may cost at most 10%).

``--kill DEVICE`` SIGKILLs that device's worker ``--kill-at`` seconds into each round and
starts a fresh one ``--restart-after`` seconds later (``--stop`` sends SIGSTOP instead,
and SIGCONT at the restart: a hung device that comes back). With ``--deadline`` every
request carries that deadline; the round then reports the replies later than it, the
answers flagged ``degraded`` by missing set, degraded answers outside the outage, and how
long after the restart the answers were full again (the last degraded answer's arrival).

Clients are threads of this process, each with its own DEALER socket; ids are unique per
client, so a lost, late or duplicated answer is seen as such.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import zmq

from coformer.runtime import protocol
from coformer.runtime.files import atomic_write_json
from coformer.runtime.manifest import load_manifest


def _rss_mb(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _inputs(bundle: Path, n: int = 16, seed: int = 0) -> np.ndarray:
    m = load_manifest(bundle, verify=False)
    rng = np.random.default_rng(seed)
    spec = m.input
    if spec.is_text:
        vocab = int(spec.preprocessing.get("vocab_size", 1000))
        return rng.integers(1, max(2, vocab), size=(n, 1, *spec.shape)).astype(np.int64)
    return rng.standard_normal((n, 1, *spec.shape)).astype(np.float32)


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rtt_ms: list[float] = []
        self.lost = self.duplicated = self.mismatched = 0
        self.errors: dict[str, int] = {}
        # (sent, received, degraded names) of every answer, time.monotonic()
        self.answers: list[tuple[float, float, tuple]] = []


def _client_loop(endpoint: str, keys, xs: np.ndarray, expected: list, stats: _Stats, until: float,
                 timeout_s: float, cid: int, deadline_s: Optional[float] = None) -> None:
    from coformer.runtime.security import curve_client

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        curve_client(sock, keys)
    sock.connect(endpoint)
    answered: set[int] = set()
    ids = itertools.count(cid * 10**9 + 1)
    rtt, lost, dup, bad, errors, answers = [], 0, 0, 0, {}, []
    fields = {} if deadline_s is None else {"deadline_ms": deadline_s * 1e3}
    try:
        k = cid
        while time.monotonic() < until:
            rid = next(ids)
            k = (k + 1) % len(xs)
            t0, sent = time.perf_counter(), time.monotonic()
            sock.send_multipart(protocol.encode("infer", rid, xs[k], **fields))
            deadline = time.monotonic() + timeout_s
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(int(left * 1e3)):
                    lost += 1
                    break
                msg = protocol.decode(sock.recv_multipart())
                if msg.id != rid:
                    dup += msg.id in answered  # a second answer to an id; a late first one is not a loss
                    answered.add(msg.id)
                    continue
                answered.add(rid)
                if msg.op == "error":
                    code = str(msg.header.get("code"))
                    errors[code] = errors.get(code, 0) + 1
                else:
                    rtt.append((time.perf_counter() - t0) * 1e3)
                    degraded = tuple(msg.header.get("degraded") or ())
                    answers.append((sent, time.monotonic(), degraded))
                    # a degraded answer comes from a fallback map: it is not the full answer
                    if not degraded and expected[k] is not None and not np.allclose(msg.tensor, expected[k],
                                                                                       atol=1e-4):
                        bad += 1
                break
    finally:
        sock.close(0)
        ctx.term()
    with stats.lock:
        stats.rtt_ms += rtt
        stats.lost += lost
        stats.duplicated += dup
        stats.mismatched += bad
        stats.answers += answers
        for c, n in errors.items():
            stats.errors[c] = stats.errors.get(c, 0) + n


def _fault(cluster, device: str, kill_at: float, restart_after: float, signal_name: str, t0: float,
           times: dict) -> None:
    """SIGKILL (or SIGSTOP) ``device``'s worker at ``t0 + kill_at``; start a fresh one (or
    SIGCONT it) ``restart_after`` seconds later. ``times`` gets both moments."""
    import signal

    proc = cluster.procs[f"worker-{device}"]
    time.sleep(max(0.0, t0 + kill_at - time.monotonic()))
    times["fault"] = time.monotonic()
    if signal_name == "kill":
        proc.kill()
        proc.wait()
    else:
        proc.send_signal(signal.SIGSTOP)
    time.sleep(restart_after)
    times["restart"] = time.monotonic()
    if signal_name == "kill":
        cluster.start_worker(device)
    else:
        proc.send_signal(signal.SIGCONT)


def _fault_report(answers: list, times: dict, deadline_s: Optional[float]) -> dict:
    """What the clients saw around a fault (see the module doc)."""
    fault, restart = times["fault"], times["restart"]
    degraded = [a for a in answers if a[2]]
    by_set: dict[str, int] = {}
    for a in degraded:
        by_set["+".join(a[2])] = by_set.get("+".join(a[2]), 0) + 1
    # an answer to a request sent before the fault may still come back degraded, so the
    # outage runs from the fault less one deadline
    early = fault - (deadline_s or 0.0)
    after = [a for a in answers if a[1] > restart]
    last_degraded = max((a[1] for a in degraded if a[1] > restart), default=None)
    first_full = min((a[1] for a in after if not a[2]), default=None)
    return {
        "degraded": len(degraded), "degraded_by_missing_set": by_set,
        "degraded_before_fault": sum(1 for a in degraded if a[1] < early),
        "answers_during_outage": sum(1 for a in answers if fault <= a[1] <= restart),
        "full_during_outage": sum(1 for a in answers if fault <= a[0] and a[1] <= restart and not a[2]),
        "full_again_after_restart_s": None if after == [] else
        round(0.0 if last_degraded is None else last_degraded - restart, 3),
        "first_full_after_restart_s": None if first_full is None else round(first_full - restart, 3),
    }


def soak(cluster, clients: int, seconds: float, xs: np.ndarray, expected: list, timeout_s: float = 10.0,
         deadline_s: Optional[float] = None, fault: Optional[dict] = None) -> dict:
    """Run ``clients`` concurrent clients against ``cluster`` for ``seconds``; ``fault``:
    ``{"device", "kill_at", "restart_after", "signal": "kill" | "stop"}`` (see :func:`_fault`)."""
    keys = None
    if cluster.secure:
        from coformer.runtime.security import load_keys

        keys = load_keys(cluster.client_keys, "client")
    stats = _Stats()
    rss0 = {name: _rss_mb(p.pid) for name, p in cluster.procs.items()}
    t0 = time.monotonic()
    until = t0 + seconds
    threads = [threading.Thread(target=_client_loop, args=(cluster.endpoints["front"], keys, xs, expected, stats,
                                                           until, timeout_s, i, deadline_s))
               for i in range(clients)]
    times: dict = {}
    if fault is not None:
        threads.append(threading.Thread(target=_fault, args=(cluster, fault["device"], fault["kill_at"],
                                                              fault["restart_after"], fault["signal"], t0, times)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    rss1 = {name: _rss_mb(p.pid) for name, p in cluster.procs.items()}
    rtt = np.asarray(stats.rtt_ms) if stats.rtt_ms else np.asarray([float("nan")])
    out = {
        "clients": clients, "seconds": round(wall, 2), "answers": len(stats.rtt_ms),
        "answers_per_s": round(len(stats.rtt_ms) / wall, 1),
        "p50_ms": round(float(np.median(rtt)), 3), "p99_ms": round(float(np.percentile(rtt, 99)), 3),
        "lost": stats.lost, "duplicated": stats.duplicated, "mismatched": stats.mismatched,
        "errors": stats.errors,
        "rss_mb": {name: [rss0[name], rss1[name]] for name in rss0},
        "secure": cluster.secure,
        "max_ms": round(float(rtt.max()), 3),
    }
    if deadline_s is not None:
        out["deadline_ms"] = deadline_s * 1e3
        out["later_than_deadline"] = int((rtt > deadline_s * 1e3).sum())
    if fault is not None:
        out["fault"] = {**fault, **_fault_report(stats.answers, times, deadline_s),
                        "fault_at_s": round(times["fault"] - t0, 3), "restart_at_s": round(times["restart"] - t0, 3)}
    return out


def _expected(cluster, xs) -> list:
    with cluster.client(timeout_s=30) as c:
        c.wait_ready(60)
        return [c.infer(x).logits for x in xs]


def main(argv=None) -> int:
    from coformer.tools.cluster import LocalCluster

    p = argparse.ArgumentParser(prog="python -m coformer.tools.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--clients", default="1,8", help="comma-separated client counts, each a round")
    p.add_argument("--seconds", type=float, default=30.0, help="per round")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of one client before the first round")
    p.add_argument("--throttle", default="auto", help="how devices' shares are held (see coformer serve)")
    p.add_argument("--timeout", type=float, default=10.0, help="a request unanswered this long is lost")
    p.add_argument("--plain", action="store_true", help="plain TCP instead of CURVE")
    p.add_argument("--compare-plain", action="store_true",
                   help="alternate rounds between a CURVE and a plain cluster of the same bundle")
    p.add_argument("--rounds", type=int, default=6, help="with --compare-plain: rounds per mode")
    p.add_argument("--batch-requests", type=int, default=None,
                   help="the central node's --batch-requests (default: its own, 8; 1: one request per round)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds: every request carries this deadline (default: the central node's --timeout)")
    p.add_argument("--kill", metavar="DEVICE", default=None,
                   help="kill this device's worker in every round and start a fresh one (see --kill-at)")
    p.add_argument("--stop", action="store_true", help="with --kill: SIGSTOP and SIGCONT instead (a hang)")
    p.add_argument("--kill-at", type=float, default=10.0, help="seconds into each round")
    p.add_argument("--restart-after", type=float, default=5.0, help="seconds after the kill")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    fault = None
    if args.kill is not None:
        workers = [w.device for w in load_manifest(args.bundle, verify=False).workers]
        if args.kill not in workers:
            p.error(f"--kill {args.kill!r} is not a worker of this bundle; its workers: {', '.join(workers)}")
        if args.compare_plain:
            p.error("--kill and --compare-plain do not go together")
        if not (0 < args.kill_at and args.kill_at + args.restart_after < args.seconds):
            p.error(f"--kill-at {args.kill_at:g} + --restart-after {args.restart_after:g} must fall inside "
                    f"--seconds {args.seconds:g}")
        fault = {"device": args.kill, "kill_at": args.kill_at, "restart_after": args.restart_after,
                 "signal": "stop" if args.stop else "kill"}
    central_args = [] if args.batch_requests is None else ["--batch-requests", str(args.batch_requests)]
    xs = _inputs(args.bundle)
    report: dict = {"bundle": str(args.bundle), "rounds": []}
    if args.compare_plain:
        with LocalCluster(args.bundle, throttle=args.throttle, central_args=central_args) as sec, \
                LocalCluster(args.bundle, throttle=args.throttle, secure=False, central_args=central_args) as plain:
            expected = _expected(sec, xs)
            for c in (sec, plain):
                soak(c, 1, args.warmup, xs, expected)
            per = {True: [], False: []}
            for r in range(args.rounds):
                for c in ((sec, plain) if r % 2 == 0 else (plain, sec)):
                    out = soak(c, counts[0], args.seconds / args.rounds, xs, expected, args.timeout)
                    per[c.secure].append(out)
                    report["rounds"].append(out)
                    print(json.dumps({k: out[k] for k in ("secure", "answers_per_s", "p50_ms", "p99_ms", "lost")}),
                          flush=True)
        med = {s: float(np.median([o["p50_ms"] for o in per[s]])) for s in per}
        report["curve_over_plain_p50"] = round(med[True] / med[False], 3)
        print(f"round trip p50: CURVE {med[True]:.3f} ms, plain {med[False]:.3f} ms, "
              f"ratio {med[True] / med[False]:.3f} (median of {args.rounds} alternating rounds each)")
    else:
        with LocalCluster(args.bundle, throttle=args.throttle, secure=not args.plain,
                          central_args=central_args) as cluster:
            expected = _expected(cluster, xs)
            soak(cluster, 1, args.warmup, xs, expected)
            print("| clients | answers/s | p50 ms | p99 ms | lost | duplicated | mismatched | errors |")
            print("|---:|---:|---:|---:|---:|---:|---:|---|")
            for n in counts:
                out = soak(cluster, n, args.seconds, xs, expected, args.timeout, args.deadline, fault)
                report["rounds"].append(out)
                print(f"| {n} | {out['answers_per_s']:.1f} | {out['p50_ms']:.2f} | {out['p99_ms']:.2f} | "
                      f"{out['lost']} | {out['duplicated']} | {out['mismatched']} | {out['errors'] or '-'} |",
                      flush=True)
                if args.deadline is not None:
                    print(f"  slowest reply {out['max_ms']:.1f} ms; {out['later_than_deadline']} later than the "
                          f"deadline of {args.deadline * 1e3:g} ms", flush=True)
                if fault is not None:
                    f = out["fault"]
                    print(f"  {fault['signal']} {fault['device']} at {f['fault_at_s']:.1f} s, restarted at "
                          f"{f['restart_at_s']:.1f} s: {f['degraded']} degraded answers "
                          f"{f['degraded_by_missing_set'] or ''}, {f['degraded_before_fault']} before the fault; "
                          f"answers full again {f['full_again_after_restart_s']} s after the restart (first full "
                          f"{f['first_full_after_restart_s']} s)", flush=True)
            print("RSS MB (after warm-up -> end of the last round):")
            first, last = report["rounds"][0]["rss_mb"], report["rounds"][-1]["rss_mb"]
            for name in first:
                print(f"  {name}: {first[name][0]:.1f} -> {last[name][1]:.1f}")
    expected_deg = load_manifest(args.bundle, verify=False).expected.get("degraded")
    if fault is not None and expected_deg:
        report["manifest_degraded"] = expected_deg
        print(f"accuracy recorded in the manifest with devices missing: {json.dumps(expected_deg)}")
    if args.json:
        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
