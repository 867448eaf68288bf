"""Issue 19: the served runtime against malformed messages, strangers and edited bundles.

Real processes and sockets throughout: a compiled tiny ViT served by ``LocalCluster``
or by ``coformer-runtime`` roles, attacked over ZeroMQ from this process.
"""

import json
import os
import random
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
import zmq
from coformer.runtime import protocol
from coformer.runtime.client import Client, ServerError
from coformer.runtime.errors import CoFormerError
from coformer.runtime.manifest import load_manifest, manifest_digest
from coformer.runtime.security import (
    is_loopback,
    load_keys,
    require_security,
    write_keys,
)
from coformer.tools.cluster import LocalCluster, runtime_cmd

from tests.runtime.test_protocol import CRASHERS
from tests.tools.test_serving import compiled  # noqa: F401  (the module's compiled bundle)

pytestmark = pytest.mark.slow


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _expected(result, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        t = torch.from_numpy(x)
        return result.aggregator(*[s(t) for s in result.submodels]).numpy()


# -- the fuzzer ------------------------------------------------------------------
_JUNK = [None, True, -1, 0, 2**70, 1.5, float("inf"), "", "x" * 300, [], {}, [1, [2, [3]]], {"a": {"b": 1}},
         "float32", "int64", "float16", "object", "<f4", [1, 1, 16, 16], [2**62, 4], [0, 4], [-1], [1] * 9]


def bad_messages(rng: random.Random, op_choices=protocol.OPS + ("bogus", "", None)):
    """An endless stream of malformed messages (frames lists), structured and random."""
    while True:
        kind = rng.randrange(10)
        if kind == 0:
            yield list(rng.choice(CRASHERS)[0])
        elif kind == 1:  # random bytes in 1..4 frames
            yield [rng.randbytes(rng.randrange(0, 120)) for _ in range(rng.randrange(1, 5))]
        elif kind in (2, 3, 4):  # a header with each field of a random type
            header = {"v": rng.choice([1, 1, 1, 2, "1", None]), "op": rng.choice(op_choices),
                      "id": rng.choice([rng.randrange(1 << 20), -3, "7", None, 2**64])}
            for key in ("dtype", "shape", "model", "input_index", "compute_ms", "device", "digest"):
                if rng.random() < 0.5:
                    header[key] = rng.choice(_JUNK)
            raw = json.dumps(header, allow_nan=True).encode()
            yield [raw, rng.randbytes(rng.choice([0, 4, 1024, 1025]))]
        elif kind == 5:  # a well-formed header whose payload does not match its shape
            yield [json.dumps({"v": 1, "op": "infer", "id": 9, "dtype": "float32",
                               "shape": [1, 1, 16, 16]}).encode(), rng.randbytes(rng.choice([0, 3, 1020, 2048]))]
        elif kind == 6:  # deep nesting, in objects and lists
            d = rng.randrange(9, 1200)
            yield [(b'{"a":' * d + b"1" + b"}" * d) if rng.random() < 0.5 else (b"[" * d + b"]" * d), b""]
        elif kind == 7:  # not UTF-8, or not an object
            yield [rng.choice([b"\xff\xfe\x00", b"[1,2,3]", b'"str"', b"null", b"1e999", b"{"]), b""]
        elif kind == 8:  # an oversized header
            yield [b'{"v":1,"op":"status","pad":"' + b"x" * rng.randrange(4100, 9000) + b'"}', b""]
        else:  # a tensor header with a huge or hostile shape and no payload
            shape = rng.choice([[2**62, 4], [2**31, 2**31], [1, 2**40], [0], [], "1,2", [1.5], [True, 1]])
            yield [json.dumps({"v": 1, "op": rng.choice(["infer", "features"]), "id": 3,
                               "dtype": rng.choice(["float32", "int64"]), "shape": shape}).encode(), b""]


def _dealer(ctx, endpoint: str, identity: bytes = None) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if identity:
        s.setsockopt(zmq.IDENTITY, identity)
    s.connect(endpoint)
    return s


def _drain(sock: zmq.Socket) -> int:
    n = 0
    while sock.poll(0):
        sock.recv_multipart()
        n += 1
    return n


class FakeWorker(threading.Thread):
    """A peer holding a real worker's identity (it registers with the bundle's digest) that
    computes the device's true features with onnxruntime, but sends garbage around them: late
    ids, undecodable frames, wrong types. Every ``poison_every``-th request it answers with a
    non-numeric ``compute_ms`` instead (the fourth crasher): that answer is left out, and the
    request answered without it, flagged degraded."""

    def __init__(self, bundle, device: str, back: str, seed: int, garbage_per_request: int, poison_every: int):
        super().__init__(daemon=True)
        import onnxruntime as ort

        m = load_manifest(bundle)
        self.session = ort.InferenceSession(str(bundle / m.device(device).artifact), providers=["CPUExecutionProvider"])
        self.device, self.back, self.digest = device, back, manifest_digest(bundle)
        self.rng = random.Random(seed)
        self.garbage_per_request, self.poison_every = garbage_per_request, poison_every
        self.stop = threading.Event()
        self.sent_garbage = self.requests = self.poisoned = 0
        self.welcomed = threading.Event()

    def run(self) -> None:
        ctx = zmq.Context()
        sock = _dealer(ctx, self.back, self.device.encode())
        bad = bad_messages(self.rng)
        try:
            sock.send_multipart(protocol.encode("hello", 0, device=self.device, digest=self.digest))
            while not self.stop.is_set():
                if not sock.poll(50):
                    continue
                msg = protocol.decode(sock.recv_multipart())
                if msg.op == "welcome":
                    self.welcomed.set()
                if msg.op != "infer":
                    continue
                self.requests += 1
                for _ in range(self.garbage_per_request):
                    frames = next(bad)
                    if self.rng.random() < 0.3:  # or a well-formed answer to a request long gone
                        frames = protocol.encode("features", msg.id + 10**6, np.zeros((1, 3), np.float32),
                                                 compute_ms="fast")
                    sock.send_multipart(frames)
                    self.sent_garbage += 1
                feats = self.session.run(None, {self.session.get_inputs()[0].name: msg.tensor})[0]
                poison = self.requests % self.poison_every == 0
                self.poisoned += poison
                sock.send_multipart(protocol.encode("features", msg.id, feats, device=self.device,
                                                    compute_ms="fast" if poison else 1.0, queued_ms=0.0,
                                                    service_ms=1.0))
        finally:
            sock.close(0)
            ctx.term()


def test_fuzz_20000_malformed_messages_at_both_sockets_of_a_live_cluster(compiled, tmp_path):  # noqa: F811
    """>= 20,000 malformed messages, the four crashers among them, at the central node's client
    socket, its worker socket (strangers, and a peer holding a worker's identity) and at a
    worker's own socket; valid requests interleaved are all answered correctly, no process
    exits, and the central node's memory stays within a bound."""
    result, data = compiled
    xs = data.test.x[:16].numpy()
    expected = _expected(result, xs)
    rng = random.Random(19)
    t_start = time.monotonic()
    with LocalCluster(result.bundle_dir, throttle="none", timeout_s=2.0, secure=False) as c:
        central = c.procs[f"central-{result.manifest.central.device}"]
        # edge-c is played by the fake worker from here on
        c.procs["worker-edge-c"].kill()
        c.procs["worker-edge-c"].wait()
        fake = FakeWorker(result.bundle_dir, "edge-c", c.endpoints["back"], 7, garbage_per_request=8,
                          poison_every=25)
        fake.start()
        assert fake.welcomed.wait(10)
        ctx = zmq.Context()
        front = _dealer(ctx, c.endpoints["front"])
        strangers = [_dealer(ctx, c.endpoints["back"], rng.randbytes(rng.randrange(1, 40)).replace(b"edge", b"xx"))
                     for _ in range(8)] + [_dealer(ctx, c.endpoints["back"])]  # (and one anonymous)
        bad = bad_messages(rng)
        sent_front = sent_back = replies_front = 0
        answered = poisoned = 0
        rss = []
        try:
            with c.client(timeout_s=10) as client:
                for i in range(1, 401):
                    for _ in range(25):
                        front.send_multipart(next(bad))
                        sent_front += 1
                    for _ in range(15):
                        rng.choice(strangers).send_multipart(next(bad))
                        sent_back += 1
                    k = i % len(xs)
                    r = client.infer(xs[k: k + 1])
                    if r.degraded:  # only a poisoned answer is left out, as a dead worker's (issue 39)
                        assert r.degraded == ("edge-c",)
                        poisoned += 1
                    else:
                        np.testing.assert_allclose(r.logits[0], expected[k], atol=1e-4)
                        answered += 1
                    replies_front += _drain(front)
                    for s in strangers:
                        _drain(s)
                    if i in (40, 400):
                        rss.append(_rss_mb(central.pid))
                deadline = time.monotonic() + 5
                while replies_front < sent_front and time.monotonic() < deadline:
                    replies_front += _drain(front)
                    time.sleep(0.01)
                assert client.status()["ready"]
        finally:
            fake.stop.set()
            fake.join(5)
            front.close(0)
            for s in strangers:
                s.close(0)
            ctx.term()
        alive = {name: p.poll() for name, p in c.procs.items() if name != "worker-edge-c"}
    total = sent_front + sent_back + fake.sent_garbage
    print(f"fuzz: {sent_front} at the client socket ({replies_front} answered), {sent_back} from strangers "
          f"and {fake.sent_garbage} from a worker's identity at the worker socket; {answered} valid requests "
          f"answered, {poisoned} poisoned ones answered without edge-c; central RSS {rss[0]:.1f} -> {rss[1]:.1f} MB; "
          f"{time.monotonic() - t_start:.1f} s")
    assert all(code is None for code in alive.values()), alive
    assert replies_front == sent_front  # every malformed request was answered (with an error)
    assert poisoned == fake.poisoned and answered == 400 - poisoned
    assert total >= 20000 - 4000  # with the worker's own socket below, >= 20,000 in all
    assert rss[1] - rss[0] < 25, rss


def test_fuzz_a_workers_own_socket(compiled):  # noqa: F811
    """A worker behind a fake central node: 4,000 malformed messages each answered with an error,
    valid requests between them answered with the sub-model's true features, the worker alive."""
    import onnxruntime as ort

    result, data = compiled
    m = result.manifest
    art = m.device("edge-b")
    session = ort.InferenceSession(str(result.bundle_dir / art.artifact), providers=["CPUExecutionProvider"])
    xs = data.test.x[:8].numpy()
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    proc = subprocess.Popen(runtime_cmd() + ["worker", str(result.bundle_dir), "--device", "edge-b", "--central",
                                              f"tcp://127.0.0.1:{port}", "--throttle", "none"],
                            stderr=subprocess.PIPE, text=True)
    rng = random.Random(5)
    # (no "error" or "welcome" op: those are the central node's to send, and a worker acts on them)
    bad = bad_messages(rng, op_choices=("infer", "features", "result", "status", "hello", "bogus", None))
    try:
        assert router.poll(30000), "the worker never said hello"
        ident, *hello = router.recv_multipart()
        assert protocol.decode(hello).op == "hello"
        router.send_multipart([ident] + protocol.encode("welcome", 0))
        errors = 0
        for i in range(200):
            for _ in range(20):
                router.send_multipart([ident] + next(bad))
            k = i % len(xs)
            router.send_multipart([ident] + protocol.encode("infer", 10**6 + i, xs[k: k + 1]))
            while True:
                assert router.poll(10000), (f"the worker stopped answering (exit code {proc.poll()}):\n"
                                            + (proc.stderr.read()[-3000:] if proc.poll() is not None else ""))
                _, *frames = router.recv_multipart()
                msg = protocol.decode(frames)
                if msg.op == "error":
                    errors += 1
                elif msg.op == "features" and msg.id == 10**6 + i:
                    want = session.run(None, {session.get_inputs()[0].name: xs[k: k + 1]})[0]
                    np.testing.assert_allclose(msg.tensor, want, atol=1e-5)
                    break
        # every malformed message had its error reply, before the valid request behind it
        # (hellos with a payload or stray features also get one: a worker answers nothing silently)
        assert errors >= 200 * 20 * 0.9, errors
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)
        router.close(0)
        ctx.term()


# -- CURVE -----------------------------------------------------------------------
def test_without_an_allowed_key_a_client_or_worker_gets_nothing(compiled, tmp_path):  # noqa: F811
    result, data = compiled
    x = data.test.x[:1].numpy()
    strangers = write_keys(tmp_path / "other", ["edge-b"], ["mallory"])  # keys the cluster never issued
    with LocalCluster(result.bundle_dir, throttle="none", timeout_s=1.0) as c:
        with c.client(timeout_s=5) as client:
            good = client.infer(x).logits
        # no key at all, and a client key this central node never allowed: no reply, not even an error
        with Client(c.endpoints["front"], timeout_s=1.0) as plain, pytest.raises(CoFormerError, match="no reply"):
            plain.status()
        with Client(c.endpoints["front"], timeout_s=1.0, keys=strangers["clients/mallory"]) as other:
            with pytest.raises(CoFormerError, match="no reply"):
                other.infer(x)
        # a worker with its own (unissued) key, and one with a real key under another device's name
        c.procs["worker-edge-b"].kill()
        c.procs["worker-edge-b"].wait()
        impostors = [
            subprocess.Popen(runtime_cmd() + ["worker", str(result.bundle_dir), "--device", "edge-b", "--central",
                                               c.endpoints["back"], "--keys", str(folder), "--throttle", "none"],
                             stderr=subprocess.DEVNULL)
            for folder in (_with_server_key(strangers["edge-b"], c.keys), _renamed(c.keys / "edge-c", "edge-b",
                                                                                   tmp_path / "borrowed"))]
        try:
            time.sleep(4)
            with c.client(timeout_s=5) as client:
                status = client.status()
                assert status["missing"] == ["edge-b"], status
                # answered without edge-b: neither impostor's features were taken
                assert client.infer(x).degraded == ("edge-b",)
        finally:
            for p in impostors:
                p.kill()
                p.wait()
        # the real worker, with its own key, is back within seconds
        c.procs["worker-edge-b"] = subprocess.Popen(
            runtime_cmd() + ["worker", str(result.bundle_dir), "--device", "edge-b", "--central", c.endpoints["back"],
                              "--keys", str(c.keys / "edge-b"), "--throttle", "none"], stderr=subprocess.DEVNULL)
        with c.client(timeout_s=5) as client:
            client.wait_ready(15)
            np.testing.assert_allclose(client.infer(x).logits, good, atol=1e-5)


def _with_server_key(folder, keys_root):
    """A stranger's folder that does hold the real central node's public key (it is public)."""
    shutil.copyfile(keys_root / "central" / "central.key", folder / "central.key")
    return folder


def _renamed(folder, name, out):
    """edge-c's real key pair, presented as edge-b's."""
    out.mkdir()
    shutil.copyfile(folder / "central.key", out / "central.key")
    shutil.copyfile(folder / "edge-c.key_secret", out / f"{name}.key_secret")
    shutil.copyfile(folder / "edge-c.key", out / f"{name}.key")
    return out


def test_secure_is_the_default_off_loopback():
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("tcp://localhost:1") and is_loopback("ipc:///tmp/x")
    assert is_loopback("tcp://[::1]:5") and not is_loopback("tcp://*:5555") and not is_loopback("tcp://10.0.0.2:5")
    assert require_security(None, False, ["tcp://127.0.0.1:*"], "central") is False
    with pytest.raises(CoFormerError, match=r"tcp://0\.0\.0\.0:5556 is not loopback.*--keys.*--insecure"):
        require_security(None, False, ["tcp://127.0.0.1:5555", "tcp://0.0.0.0:5556"], "central")
    assert require_security(None, True, ["tcp://0.0.0.0:5556"], "central") is False


def test_runtime_roles_refuse_plain_tcp_off_loopback_without_insecure(compiled):  # noqa: F811
    result, _ = compiled
    done = subprocess.run(runtime_cmd() + ["central", str(result.bundle_dir), "--front", "tcp://0.0.0.0:*",
                                            "--back", "tcp://127.0.0.1:*"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "is not loopback" in done.stderr and "--insecure" in done.stderr
    done = subprocess.run(runtime_cmd() + ["worker", str(result.bundle_dir), "--device", "edge-b", "--central",
                                            "tcp://10.255.255.1:5556"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--keys" in done.stderr and "Traceback" not in done.stderr


# -- the signed bundle -------------------------------------------------------------
def _edits(bundle):
    """Each edit the issue names, applied to a copy; the manifest stays valid JSON."""
    def label(m):
        m["task"]["labels"][0] = "cat"

    def mean(m):
        pre = m["input"]["preprocessing"]
        key = "mean" if "mean" in pre else next(k for k, v in pre.items() if isinstance(v, (int, float, list)))
        pre[key] = [0.4] * len(pre[key]) if isinstance(pre[key], list) else 0.4

    def checksum(m):  # an ONNX file replaced together with its checksum
        from coformer.runtime.files import sha256_file

        rel = m["devices"][1]["artifact"]
        path = bundle / rel
        path.write_bytes(path.read_bytes() + b"\0")
        m["files"][rel] = sha256_file(path)

    return {"label": label, "preprocessing": mean, "checksum": checksum}


@pytest.mark.parametrize("edit", ["label", "preprocessing", "checksum"])
def test_an_edited_manifest_is_refused_by_every_role(compiled, tmp_path, edit):  # noqa: F811
    result, _ = compiled
    bundle = tmp_path / "bundle"
    shutil.copytree(result.bundle_dir, bundle)
    keys = tmp_path / "keys"
    done = subprocess.run(runtime_cmd() + ["keys", str(keys), "--bundle", str(bundle), "--clients", "laptop"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    verified = subprocess.run(runtime_cmd() + ["verify", str(bundle), "--keys", str(keys / "edge-b")],
                              capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and "signature checked" in verified.stdout, verified.stderr
    m = json.loads((bundle / "manifest.json").read_text())
    _edits(bundle)[edit](m)
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 16, 16), np.float32))
    roles = {
        "verify": ["verify", str(bundle), "--keys", str(keys / "central")],
        "central": ["central", str(bundle), "--front", "tcp://127.0.0.1:*", "--back", "tcp://127.0.0.1:*",
                    "--keys", str(keys / "central")],
        "worker": ["worker", str(bundle), "--device", "edge-b", "--central", "tcp://127.0.0.1:1",
                   "--keys", str(keys / "edge-b")],
        "infer": ["infer", str(bundle), "--central", "tcp://127.0.0.1:1", "--input", str(tmp_path / "x.npy"),
                  "--keys", str(keys / "clients" / "laptop")],
    }
    for role, args in roles.items():
        done = subprocess.run(runtime_cmd() + args, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (role, done.stderr)
        assert "does not match its signature" in done.stderr and "Traceback" not in done.stderr, (role, done.stderr)
    with pytest.raises(CoFormerError, match="does not match its signature"):  # and the Python client
        with Client("tcp://127.0.0.1:1", keys=keys / "clients" / "laptop") as client:
            client.embed(["a"], bundle)
    with pytest.raises(CoFormerError, match="does not match its signature"):  # and coformer serve's cluster
        LocalCluster(bundle, keys=keys)


def test_a_bundle_served_with_the_operators_keys_answers_and_resigning_after_a_change_works(compiled, tmp_path):  # noqa: F811
    result, data = compiled
    bundle = tmp_path / "bundle"
    shutil.copytree(result.bundle_dir, bundle)
    keys = tmp_path / "keys"
    subprocess.run(runtime_cmd() + ["keys", str(keys), "--bundle", str(bundle)], check=True, capture_output=True)
    x = data.test.x[:2].numpy()
    with LocalCluster(bundle, throttle="none", keys=keys) as c, c.client() as client:
        np.testing.assert_allclose(client.infer(x).logits, _expected(result, x), atol=1e-4)
    assert load_keys(keys / "clients" / "client", "client").operator is not None
    # the operator edits on purpose, then signs again: served again
    m = json.loads((bundle / "manifest.json").read_text())
    m["task"]["labels"][0] = "zero"
    (bundle / "manifest.json").write_text(json.dumps(m))
    done = subprocess.run(runtime_cmd() + ["sign", str(bundle), "--key", str(keys / "operator" / "operator.signing")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert LocalCluster(bundle, keys=keys).manifest.labels[0] == "zero"


# -- requests in flight, and devices that drop ------------------------------------
def _stream(cluster, xs, expected, stop, deadline_s, log, lock):
    """One client: requests back to back until ``stop``; logs (t, kind, degraded, seconds)."""
    with cluster.client(timeout_s=deadline_s + 5) as client:
        k = 0
        while not stop.is_set():
            k = (k + 1) % len(xs)
            t0 = time.monotonic()
            try:
                r = client.infer(xs[k: k + 1], deadline_s=deadline_s)
                kind = "full" if not r.degraded else "degraded"
                if not r.degraded:
                    np.testing.assert_allclose(r.logits[0], expected[k], atol=1e-4)
                entry = (t0, kind, r.degraded, time.monotonic() - t0)
            except ServerError as e:
                entry = (t0, e.code, (), time.monotonic() - t0)
            with lock:
                log.append(entry)


def test_concurrent_clients_are_batched_and_all_answered(compiled):  # noqa: F811
    result, data = compiled
    xs = data.test.x[:16].numpy()
    expected = _expected(result, xs)
    with LocalCluster(result.bundle_dir, throttle="none", timeout_s=5.0) as c:
        log, lock, stop = [], threading.Lock(), threading.Event()
        threads = [threading.Thread(target=_stream, args=(c, xs, expected, stop, 5.0, log, lock)) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(30)
        with c.client() as client:  # and a request with several rows among them still gets its own rows back
            np.testing.assert_allclose(client.infer(xs[:3]).logits, expected[:3], atol=1e-4)
    kinds = {k for _, k, _, _ in log}
    assert kinds == {"full"} and len(log) > 50, (kinds, len(log))


def test_a_full_queue_answers_busy_and_loses_nothing(compiled):  # noqa: F811
    result, data = compiled
    x = data.test.x[:1].numpy()
    with LocalCluster(result.bundle_dir, throttle="none", central_args=["--queue-limit", "4",
                                                                          "--batch-requests", "1"]) as c:
        keys = load_keys(c.client_keys, "client")
        from coformer.runtime.security import curve_client

        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        curve_client(sock, keys)
        sock.connect(c.endpoints["front"])
        try:
            for i in range(1, 201):
                sock.send_multipart(protocol.encode("infer", i, x))
            replies = {}
            while len(replies) < 200 and sock.poll(10000):
                msg = protocol.decode(sock.recv_multipart())
                assert msg.id not in replies
                replies[msg.id] = msg.op if msg.op == "result" else msg.header["code"]
        finally:
            sock.close(0)
            ctx.term()
    counts = {v: list(replies.values()).count(v) for v in set(replies.values())}
    assert len(replies) == 200, counts  # every request answered exactly once
    assert set(counts) == {"result", "busy"} and counts["busy"] > 100, counts


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_worker_lost_mid_stream_degrades_answers_then_rejoins(compiled, fault):  # noqa: F811
    """4 clients streaming; one worker SIGKILLed (or SIGSTOPped, hung) mid-stream: every request is
    answered within its deadline, degraded ones flagged; after the restart (or SIGCONT) answers
    are full again within 2 s."""
    import signal

    result, data = compiled
    xs = data.test.x[:16].numpy()
    expected = _expected(result, xs)
    deadline_s = 0.5
    with LocalCluster(result.bundle_dir, throttle="none", timeout_s=5.0) as c:
        log, lock, stop = [], threading.Lock(), threading.Event()
        threads = [threading.Thread(target=_stream, args=(c, xs, expected, stop, deadline_s, log, lock))
                   for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        proc = c.procs["worker-edge-c"]
        t_fault = time.monotonic()
        if fault == "kill":
            proc.kill()
            proc.wait()
        else:
            os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(3.0)
        t_back = time.monotonic()
        if fault == "kill":
            c.start_worker("edge-c")
        else:
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(4.0)
        stop.set()
        for t in threads:
            t.join(30)
    before = [e for e in log if e[0] + e[3] < t_fault]  # answered before the fault (those in flight may degrade)
    during = [e for e in log if t_fault + 0.1 < e[0] and e[0] + e[3] < t_back]
    after = [e for e in log if e[0] > t_back + 2.0]
    assert all(k == "full" for _, k, _, _ in before) and before, [e for e in before if e[1] != "full"][:5]
    # every answer without edge-c says so; rarely (about 1 in 4,000 here) one round right after the
    # fault also went without edge-b, and says that too
    # (or, the issue allows, failed with a clear error within its deadline: those that waited in the
    # queue behind the one round that waited for the hung worker)
    odd = [e for e in during if (e[1] != "degraded" or "edge-c" not in e[2]) and e[1] != "timeout"]
    assert sum(e[1] == "timeout" for e in during) <= 0.02 * len(during)
    assert during and not odd, (len(during), odd[:5])
    assert sum(e[2] == ("edge-c",) for e in during) >= 0.99 * len(during)
    assert after and all(k == "full" for _, k, _, _ in after), after[:5]
    # nobody waited for the node's 5 s timeout: the rounds with the hung worker ended at the request's
    # 0.5 s deadline. A bound halfway between the two tells them apart on a machine as busy as any
    # (how close replies come to the deadline is measured in docs/benchmarks.md, not asserted here)
    assert max(s for _, _, _, s in log) < 2.5, max(s for _, _, _, s in log)
    assert {k for _, k, _, _ in log} <= {"full", "degraded", "timeout"}


def test_the_soak_tool_kills_a_worker_and_reports_what_the_clients_saw(compiled, tmp_path):  # noqa: F811
    """`python -m coformer.tools.soak --kill`, as the docs run it: the kill, the degraded answers,
    the deadline and the recovery come back in its report."""
    import sys

    result, _ = compiled
    bundle = str(result.bundle_dir)
    base = [sys.executable, "-m", "coformer.tools.soak", bundle, "--throttle", "none", "--warmup", "1"]
    done = subprocess.run([*base, "--clients", "2", "--seconds", "7", "--deadline", "0.5", "--kill", "edge-c",
                           "--kill-at", "2", "--restart-after", "2", "--json", str(tmp_path / "soak.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    (r,) = json.loads((tmp_path / "soak.json").read_text())["rounds"]
    assert r["answers"] > 50 and r["lost"] == r["duplicated"] == r["mismatched"] == 0, r
    f = r["fault"]
    assert f["device"] == "edge-c" and f["signal"] == "kill" and 1.9 < f["fault_at_s"] < f["restart_at_s"] < 6.5
    assert f["degraded"] > 0 and f["degraded_before_fault"] == 0 and "edge-c" in f["degraded_by_missing_set"]
    assert f["full_again_after_restart_s"] is not None and f["full_again_after_restart_s"] < 2.0, f
    assert r["max_ms"] < 1000 and r["later_than_deadline"] <= 0.02 * r["answers"], r
    assert "degraded answers" in done.stdout and "accuracy recorded in the manifest" in done.stdout
    bad = subprocess.run([*base, "--kill", "edge-z"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--kill 'edge-z' is not a worker of this bundle" in bad.stderr
