"""The floor under any runtime built on ZeroMQ (issue 39): one DEALER client and one ROUTER echo
server in two processes on loopback, one request in flight, plain TCP or CURVE, each process
free to run anywhere, both pinned to core 0, or pinned to cores 0 and 1.

    python -m experiments.zmq_floor [--requests 3000] [--bytes 3000]

Prints the median round trip and each process's CPU time per round trip (time.process_time:
its Python thread and ZeroMQ's I/O thread together). A served request costs at least this
per hop pair (client and central node; central node and each worker), before any header is
read or any model runs.
"""

import argparse
import multiprocessing as mp
import os
import time

import zmq


def _server(keys, core, n, q) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    if keys:
        s.curve_server, s.curve_publickey, s.curve_secretkey = True, keys[0], keys[1]
    q.put(s.bind_to_random_port("tcp://127.0.0.1"))
    t0 = time.process_time()
    for i in range(n + 50):
        s.send_multipart(s.recv_multipart())
        if i == 49:
            t0 = time.process_time()
    q.put((time.process_time() - t0) / n * 1e3)
    s.close(0)
    ctx.term()


def floor(curve: bool, pin, n: int, size: int) -> dict:
    q = mp.Queue()
    keys = zmq.curve_keypair() if curve else None
    p = mp.Process(target=_server, args=(keys, 0 if pin else None, n, q))
    p.start()
    port = q.get()
    every = os.sched_getaffinity(0)
    if pin:
        os.sched_setaffinity(0, {0 if pin == "same core" else 1})
    ctx = zmq.Context()
    c = ctx.socket(zmq.DEALER)
    if curve:
        c.curve_serverkey = keys[0]
        c.curve_publickey, c.curve_secretkey = zmq.curve_keypair()
    c.connect(f"tcp://127.0.0.1:{port}")
    frames = [b'{"op":"infer","id":1}', b"x" * size]
    rtt, t0 = [], 0.0
    for i in range(n + 50):
        t = time.perf_counter()
        c.send_multipart(frames)
        c.recv_multipart()
        rtt.append(time.perf_counter() - t)
        if i == 49:
            t0 = time.process_time()
    client_cpu = (time.process_time() - t0) / n * 1e3
    server_cpu = q.get()
    p.join()
    c.close(0)
    ctx.term()
    os.sched_setaffinity(0, every)
    rtt = sorted(rtt[50:])
    return {"curve": curve, "placement": pin or "anywhere", "median_ms": rtt[len(rtt) // 2] * 1e3,
            "client_cpu_ms": client_cpu, "server_cpu_ms": server_cpu}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.zmq_floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--bytes", type=int, default=3000, help="the request's payload (a 3 KB feature or input)")
    args = p.parse_args()
    print("| link | processes | median round trip | client CPU | server CPU |")
    print("|---|---|---:|---:|---:|")
    for curve in (False, True):
        for pin in (None, "same core", "two cores"):
            r = floor(curve, pin, args.requests, args.bytes)
            print(f"| {'CURVE' if curve else 'plain'} | {r['placement']} | {r['median_ms']:.3f} ms | "
                  f"{r['client_cpu_ms']:.3f} ms | {r['server_cpu_ms']:.3f} ms |", flush=True)


if __name__ == "__main__":
    main()
