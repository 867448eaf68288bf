"""Issue 39: what a peer holding a valid key can do to the central node, driven in-process.

The central node (:class:`coformer.runtime.central.CentralNode`) serves in a thread on real
loopback sockets, with the bundle's real ONNX Runtime sessions; edge-b is a real worker
(:func:`coformer.runtime.worker.run_worker`) in another thread, and edge-c is a rogue: a
DEALER socket that registers as edge-c and answers each request as the test says. The
reference answer is the node's own before the rogue joins: edge-c missing, its fallback.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from coformer.runtime import protocol
from coformer.runtime.central import MAX_INDEX_BYTES, CentralNode, _deadlines_close
from coformer.runtime.client import Client, ServerError
from coformer.runtime.engines import open_engine
from coformer.runtime.manifest import manifest_digest
from coformer.runtime.security import OPERATOR_SECRET, curve_client, load_keys, sign_bundle, write_keys
from coformer.runtime.text import model_feeds
from coformer.runtime.worker import KEEPALIVE_S, run_worker
from coformer.tools.cluster import remove_stale_keys

from tests.tools.test_serving import compiled  # noqa: F401  (the module's compiled bundle)

pytestmark = pytest.mark.slow
WAIT_S = 60.0  # for answers; no test waits on a clock to pass


class Rogue:
    """A peer holding edge-c's place: registers as edge-c, then answers each ``infer`` with
    ``answer(msg, honest)``'s list of messages (``honest``: edge-c's true features)."""

    def __init__(self, bundle, back: str, answer) -> None:
        self.bundle, self.answer = bundle, answer
        self.engine = open_engine(bundle / "submodels" / "2-edge-c.onnx", "onnxruntime", 1)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, b"edge-c")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(back)
        self.stop = threading.Event()
        self.requests = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        hello = protocol.encode("hello", 0, device="edge-c", digest=manifest_digest(self.bundle))
        last = 0.0
        while not self.stop.is_set():
            if time.monotonic() - last >= KEEPALIVE_S:  # a worker's heartbeat, as run_worker sends it
                self.sock.send_multipart(hello)
                last = time.monotonic()
            if not self.sock.poll(50):
                continue
            msg = protocol.decode(self.sock.recv_multipart())
            if msg.op == "infer":
                self.requests += 1
                honest = None if msg.tensor is None else \
                    next(iter(self.engine.infer(model_feeds(self.engine, msg.tensor, {})).values()))
                for frames in self.answer(msg, honest):
                    self.sock.send_multipart(frames)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close(0)
        self.ctx.term()


def features(msg, t, **fields):
    timings = {"compute_ms": 1.0, "service_ms": 1.0, "queued_ms": 0.0, **fields}
    return protocol.encode("features", msg.id, t, device="edge-c", **timings)


def raw(endpoint: str):
    """A bare DEALER on ``endpoint``: requests sent back to back, replies read as they come."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


class Served:
    """The central node and edge-b in threads; ``client()`` connects to the node."""

    def __init__(self, bundle, keys=None, **central) -> None:
        self.bundle, self.keys = bundle, keys  # keys: write_keys's folders (CURVE), or None (plain loopback)
        self.node = CentralNode(bundle, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", **central,
                                keys=None if keys is None else load_keys(keys["central"], "central"))
        self.ends = self.node.bind()
        self.stop = threading.Event()
        worker_keys = None if keys is None else load_keys(keys["edge-b"], "worker")
        self.threads = [threading.Thread(target=self.node.serve, args=(self.stop,), daemon=True),
                        threading.Thread(target=run_worker, args=(bundle, "edge-b", self.ends["back"]),
                                         kwargs={"stop": self.stop, "keys": worker_keys}, daemon=True)]
        for t in self.threads:
            t.start()
        self.rogue = None

    def client(self) -> Client:
        keys = None if self.keys is None else self.keys["clients/client"]
        return Client(self.ends["front"], timeout_s=WAIT_S, keys=keys)

    def wait_for(self, workers, client) -> None:
        deadline = time.monotonic() + WAIT_S  # a bound on a hang, not a timing
        while (got := client.status(WAIT_S)["workers"]) != workers:
            assert time.monotonic() < deadline, f"workers {got} registered, waited for {workers}"
            self.stop.wait(0.02)

    def join_rogue(self, answer, client) -> "Rogue":
        self.rogue = Rogue(self.bundle, self.ends["back"], answer)
        self.wait_for(["edge-b", "edge-c"], client)
        return self.rogue

    def __enter__(self) -> "Served":
        return self

    def __exit__(self, *exc) -> None:
        if self.rogue is not None:
            self.rogue.close()
        self.stop.set()
        for t in self.threads:
            t.join(30)


BAD_ANSWERS = {
    "nan": lambda m, h: [features(m, np.full_like(h, np.nan))],
    "inf": lambda m, h: [features(m, np.full_like(h, np.inf))],
    "one_nan": lambda m, h: [features(m, np.where(np.arange(h.size).reshape(h.shape) == 3, np.nan, h)
                                      .astype(np.float32))],
    "huge": lambda m, h: [features(m, np.full_like(h, 1e30))],
    "width": lambda m, h: [features(m, np.zeros((h.shape[0], h.shape[1] + 1), np.float32))],
    "batch": lambda m, h: [features(m, np.zeros((h.shape[0] + 1, h.shape[1]), np.float32))],
    "dtype": lambda m, h: [features(m, h.astype(np.float16))],
    "no_tensor": lambda m, h: [features(m, None)],
    "compute_ms_text": lambda m, h: [features(m, h, compute_ms="fast")],
    "compute_ms_negative": lambda m, h: [features(m, h, compute_ms=-1e9)],
    "compute_ms_huge": lambda m, h: [features(m, h, compute_ms=1e300)],
    "engine_error": lambda m, h: [protocol.error_frames(m.id, "engine", "out of memory")],
    "forged_bad_index": lambda m, h: [protocol.error_frames(m.id, "bad_index", "your index is wrong")],
}


@pytest.mark.parametrize("attack", sorted(BAD_ANSWERS))
def test_a_device_key_that_answers_badly_is_left_out_and_flagged(compiled, attack):  # noqa: F811
    """Findings 2 and 3: NaN, inf or 1e30 features, a wrong width, batch or dtype, no tensor, a
    bogus compute_ms, an error of the worker's own or one forged as the client's fault: the
    answer is the node's without edge-c, flagged degraded, never garbage nor an error."""
    result, data = compiled
    x = data.test.x[:2].numpy()
    with Served(result.bundle_dir) as s, s.client() as client:
        s.wait_for(["edge-b"], client)
        reference = client.infer(x)
        assert reference.degraded == ("edge-c",)
        s.join_rogue(BAD_ANSWERS[attack], client)
        for _ in range(3):
            got = client.infer(x)
            assert got.degraded == ("edge-c",), attack
            assert np.isfinite(got.logits).all() and np.allclose(got.logits, reference.logits, atol=1e-5)
            assert all(0 <= v < 1e6 for v in (got.timing_ms["workers_compute"] or {}).values())
        assert s.rogue.requests >= 3  # it was asked each time: left out of each answer, not of the cluster
        status = client.status(WAIT_S)
        assert list(status["faults"]) == ["edge-c"] and "edge-b" not in status["faults"]


def test_an_honest_answer_then_nan_for_the_same_request_does_not_poison_it(compiled):  # noqa: F811
    result, data = compiled
    x = data.test.x[:2].numpy()
    with Served(result.bundle_dir) as s, s.client() as client:
        s.wait_for(["edge-b"], client)
        s.join_rogue(lambda m, h: [features(m, h), features(m, np.full_like(h, np.nan))], client)
        first = client.infer(x)
        for _ in range(5):
            got = client.infer(x)
            assert got.degraded == () and np.isfinite(got.logits).all()
            assert np.allclose(got.logits, first.logits, atol=1e-5)


def test_nan_inputs_are_refused_by_name(compiled):  # noqa: F811
    """Finding 8: a client's NaN or inf input is refused, not answered with NaN logits."""
    result, data = compiled
    x = data.test.x[:2].numpy().copy()
    x[1, 0, 3, 3] = np.nan
    with Served(result.bundle_dir) as s, s.client() as client:
        s.wait_for(["edge-b"], client)
        with pytest.raises(ServerError, match="NaN or infinite") as e:
            client.infer(x)
        assert e.value.code == "bad_payload"
        assert np.isfinite(client.infer(np.nan_to_num(x)).logits).all()  # and the node serves on


def test_long_indexes_never_build_a_header_the_workers_refuse(compiled):  # noqa: F811
    """Finding 1: two requests whose input_index is long, back to back, were batched into one
    header over the workers' limit, refused with id 0, and waited for until the timeout.
    Each now gets the workers' own verdict on its index (no worker here holds local inputs)."""
    result, data = compiled
    x = data.test.x[:1].numpy()
    big = int("9" * (MAX_INDEX_BYTES * 2 // 3))  # one row number of ~2,400 digits: two make ~4,800 bytes
    with Served(result.bundle_dir, timeout_s=30.0) as s, s.client() as client, s.client() as other:
        s.wait_for(["edge-b"], client)
        s.join_rogue(lambda m, h: [features(m, h)] if "input_index" not in m.header else
                     [protocol.error_frames(m.id, "no_local_inputs", "this worker holds no local inputs")], client)
        sock = raw(s.ends["front"])
        ids = [1, 2]
        for rid in ids:  # back to back, so the central node finds both queued
            sock.send_multipart(protocol.encode("infer", rid, x, input_index=[big]))
        replies = [protocol.decode(sock.recv_multipart()) for _ in ids if sock.poll(WAIT_S * 1e3)]
        sock.close(0)
        assert sorted(r.id for r in replies) == sorted(ids)
        assert all(r.op == "error" and r.header["code"] == "no_local_inputs" for r in replies), \
            [r.header for r in replies]
        assert other.infer(x).degraded == ()  # and nobody else waited on them
        with pytest.raises(ServerError, match="at most") as e:  # one index beyond any header is refused at once
            client.infer(x, input_index=[int("9" * (MAX_INDEX_BYTES + 10))])
        assert e.value.code == "bad_index"


def test_one_clients_flood_leaves_room_for_another(compiled):  # noqa: F811
    """Finding 5: one connection may hold half the queue; the rest is another client's."""
    result, data = compiled
    x = data.test.x[:1].numpy()
    with Served(result.bundle_dir, queue_limit=8, batch_requests=1) as s, s.client() as client, \
            s.client() as other:
        s.wait_for(["edge-b"], client)
        sock = raw(s.ends["front"])
        for i in range(1, 201):
            sock.send_multipart(protocol.encode("infer", i, x))
        got = other.infer(x)  # sent after the flood: the flooder holds at most 4 of the 8 places
        assert np.isfinite(got.logits).all()
        codes = []
        while len(codes) < 200 and sock.poll(WAIT_S * 1e3):
            msg = protocol.decode(sock.recv_multipart())
            codes.append(msg.op if msg.op == "result" else msg.header["code"])
        sock.close(0)
        assert len(codes) == 200 and set(codes) == {"result", "busy"}


def test_a_batch_waits_only_with_requests_of_about_its_deadline():
    """Finding 5: one client's 1 ms deadline does not cut another's 10 s wait to 1 ms."""
    now = 100.0
    assert not _deadlines_close(now + 0.001, now + 10.0, now)
    assert not _deadlines_close(now + 10.0, now + 0.001, now)
    assert _deadlines_close(now + 10.0, now + 10.01, now) and _deadlines_close(now + 0.002, now + 0.003, now)


def test_one_devices_key_cannot_take_over_another_device(compiled, tmp_path):  # noqa: F811
    """Finding 4: a peer holding edge-c's key connects under the identity ``edge-b`` and says it is
    edge-b. It is refused, never handed edge-b's connection, and never sees a client's input."""
    result, data = compiled
    bundle = tmp_path / "bundle"
    shutil.copytree(result.bundle_dir, bundle)
    keys = write_keys(tmp_path / "keys", ["edge-b", "edge-c"], ["client"])
    sign_bundle(bundle, tmp_path / "keys" / "operator" / OPERATOR_SECRET)
    x = data.test.x[:1].numpy()
    with Served(bundle, keys=keys) as s, s.client() as client:
        s.wait_for(["edge-b"], client)
        ctx = zmq.Context.instance()
        impostor = ctx.socket(zmq.DEALER)
        impostor.setsockopt(zmq.LINGER, 0)
        impostor.setsockopt(zmq.IDENTITY, b"edge-b")
        curve_client(impostor, load_keys(keys["edge-c"], "worker"))
        impostor.connect(s.ends["back"])
        try:
            impostor.send_multipart(protocol.encode("hello", 0, device="edge-b", digest=manifest_digest(bundle)))
            assert impostor.poll(WAIT_S * 1e3)
            refusal = protocol.decode(impostor.recv_multipart())
            assert refusal.op == "error" and refusal.header["code"] == "bad_hello" and "key" in refusal.header["message"]
            for _ in range(20):  # edge-b still answers every request; the impostor is sent none
                assert client.infer(x).degraded == ("edge-c",)
            seen = []
            while impostor.poll(0):
                seen.append(protocol.decode(impostor.recv_multipart()).op)
            assert "infer" not in seen, seen
            assert client.status(WAIT_S)["workers"] == ["edge-b"]
        finally:
            impostor.close(0)


def _live_children(pid: int) -> dict[int, str]:
    """Processes whose parent is ``pid`` and that still run (not zombies): pid -> command line."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
            cmd = open(f"/proc/{d}/cmdline").read().replace("\0", " ")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            out[int(d)] = cmd
    return out


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ready(endpoint: str, keys: str) -> Client:
    """A client of a serve that is (again) ready; waits as long as WAIT_S for it."""
    deadline = time.monotonic() + WAIT_S
    while True:
        client = Client(endpoint, keys=keys, timeout_s=2.0)
        try:
            if client.status()["ready"]:
                return client
        except Exception:
            if time.monotonic() > deadline:
                raise
        client.close()
        time.sleep(0.1)


def test_serve_restarts_its_central_node_and_leaves_no_orphans_when_killed(compiled, tmp_path):  # noqa: F811
    """Finding 7: a dead central node is restarted on its endpoint (the serve went down with it);
    after ``kill -9`` of ``coformer serve`` its processes end (they served on, holding the port)."""
    result, data = compiled
    x = data.test.x[:1].numpy()
    proc = subprocess.Popen([sys.executable, "-m", "coformer.tools.cli", "serve", str(result.bundle_dir),
                             "--front", "tcp://127.0.0.1:*", "--throttle", "none", "--log-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        found = re.search(r"clients connect to (\S+) with --keys (\S+)", proc.stdout.readline())
        assert found, proc.stderr.read()[-2000:] if proc.poll() is not None else "no endpoint line"
        endpoint, keys = found.groups()
        folder = Path(keys).parent.parent  # the throwaway keys: no operator secret among them
        assert not list(folder.rglob("operator.signing")) and (folder / "central").is_dir()
        with _ready(endpoint, keys) as client:
            first = client.infer(x)
        roles = _live_children(proc.pid)
        assert len(roles) == 3, roles  # the central node and two workers
        (central,) = [p for p, cmd in roles.items() if " central " in cmd]
        os.kill(central, signal.SIGKILL)
        with _ready(endpoint, keys) as client:  # the same address answers again, the workers back
            again = client.infer(x)
        assert again.degraded == () and np.allclose(again.logits, first.logits, atol=1e-5)
        assert proc.poll() is None
        roles = _live_children(proc.pid)
        assert len(roles) == 3 and central not in roles
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + WAIT_S
        while any(_alive(p) for p in roles) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in roles if _alive(p)], roles
        # its key folder outlived it (no finally runs after kill -9): the next cluster removes it
        assert folder.is_dir() and folder in remove_stale_keys() and not folder.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_status_stops_saying_ready_once_a_workers_connection_is_gone(compiled, monkeypatch):  # noqa: F811
    """Finding 8: a worker whose connection closed was still counted ready until three heartbeats
    passed; it now leaves the ready set when the connection goes. Silence alone is made to take an
    hour to notice here, so only the closed connection can tell."""
    import coformer.runtime.central as central

    monkeypatch.setattr(central, "KEEPALIVE_S", 3600.0)
    result, data = compiled
    x = data.test.x[:1].numpy()
    with Served(result.bundle_dir) as s, s.client() as client:
        s.wait_for(["edge-b"], client)
        s.join_rogue(lambda m, h: [features(m, h)], client)
        assert client.infer(x).degraded == ()
        s.rogue.close()
        s.rogue = None
        deadline = time.monotonic() + WAIT_S
        while client.status(WAIT_S)["missing"] != ["edge-c"] and time.monotonic() < deadline:
            time.sleep(0.02)
        status = client.status(WAIT_S)
        assert status["missing"] == ["edge-c"] and not status["ready"] and status["degraded"]
        assert client.infer(x).degraded == ("edge-c",)


@pytest.mark.parametrize("edit", ["label", "preprocessing", "unsigned"])
def test_serve_without_keys_refuses_a_bundle_edited_after_its_compile(compiled, tmp_path, edit):  # noqa: F811
    """Finding 6: every compile signs its bundle with this user's operator key, and ``coformer serve``
    without ``--keys`` checks it, as a keyless role on loopback does: an edited label or
    preprocessing mean, or a deleted signature, started and served before. The compiled bundle itself serves, and its signature is checked by
    every role (the throwaway key folders carry this user's verify key, and no secret)."""
    import json

    from coformer.runtime.security import SIGNATURE_NAME, local_operator
    from coformer.tools.cluster import LocalCluster

    result, data = compiled
    assert (result.bundle_dir / SIGNATURE_NAME).is_file() and local_operator() is not None
    bundle = tmp_path / "bundle"
    shutil.copytree(result.bundle_dir, bundle)
    with LocalCluster(bundle, throttle="none") as c, c.client() as client:
        assert client.infer(data.test.x[:1].numpy()).degraded == ()
        folder = c.keys
        assert (folder / "edge-b" / "operator.pub").read_text().strip() == local_operator()[1].hex()
        assert not list(folder.rglob("operator.signing"))
    m = json.loads((bundle / "manifest.json").read_text())
    if edit == "label":
        m["task"]["labels"][0] = "seven"
    elif edit == "preprocessing":
        m["input"]["preprocessing"]["mean"] = 0.9
    if edit == "unsigned":
        (bundle / SIGNATURE_NAME).unlink()
    else:
        (bundle / "manifest.json").write_text(json.dumps(m))
    done = subprocess.run([sys.executable, "-m", "coformer.tools.cli", "serve", str(bundle), "--front",
                           "tcp://127.0.0.1:*", "--throttle", "none"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert ("not signed" if edit == "unsigned" else "does not match its signature") in done.stderr
    assert "coformer-runtime sign" in done.stderr  # the way out, for a bundle the user trusts
    # and a role started by hand without keys on loopback checks the same signature
    role = subprocess.run([sys.executable, "-m", "coformer.runtime.cli", "central", str(bundle), "--front",
                           "tcp://127.0.0.1:*", "--back", "tcp://127.0.0.1:*"], capture_output=True, text=True,
                          timeout=120)
    assert role.returncode == 2 and "Traceback" not in role.stderr, role.stderr[-2000:]
    assert ("not signed" if edit == "unsigned" else "does not match its signature") in role.stderr
