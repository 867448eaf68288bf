"""The central node driven one turn at a time (issue 39): :class:`CentralNode` in the test's own
ZeroMQ context on ``inproc://`` endpoints, opened, then :meth:`~CentralNode.step`-ped by the
test, which plays the client and the worker on sockets it holds. Batching, degraded answers,
registration and deadlines are checked in one thread, with no sleep, no port and no process:
deadlines run on a :class:`~coformer.runtime.clock.ManualClock`, simulated time that moves when
the node waits and nothing arrives."""

import numpy as np
import pytest
import torch
import zmq

from coformer.runtime import protocol
from coformer.runtime.central import REPLY_RESERVE_S, CentralNode
from coformer.runtime.clock import ManualClock
from coformer.runtime.manifest import manifest_digest
from coformer.runtime.worker import KEEPALIVE_S


@pytest.fixture
def node_in():
    """``node_in(bundle)``: an opened CentralNode on inproc endpoints and a client DEALER
    connected to it, in one context; closed after the test."""
    ctx = zmq.Context()
    made = []

    def make(bundle_dir, clock=None):
        node = CentralNode(bundle_dir, "inproc://front", "inproc://back", context=ctx, clock=clock)
        node.open()
        client = ctx.socket(zmq.DEALER)
        client.connect("inproc://front")
        made.append((node, client))
        return node, client

    yield make
    for node, client in made:
        client.close(0)
        node.close()
    ctx.term()


def _answers(sock, n):
    out = {}
    for _ in range(n):
        assert sock.poll(0), "an answer is due: the node's step sent it"
        msg = protocol.decode(sock.recv_multipart())
        out[msg.header["id"]] = msg
    return out


def test_requests_queued_together_are_served_in_one_round_each_with_its_rows(bundles, node_in):
    built, data = bundles
    result = built["one"]
    node, client = node_in(result.bundle_dir)
    x = data.test.x[:3].numpy()
    client.send_multipart(protocol.encode("infer", 1, x[:1]))
    client.send_multipart(protocol.encode("infer", 2, x[1:3]))  # inproc: both are waiting when send returns
    node.step(timeout_ms=1000)  # reads both, serves them as one round
    got = _answers(client, 2)
    with torch.no_grad():
        want = result.aggregator(*[s(torch.from_numpy(x)) for s in result.submodels]).numpy()
    np.testing.assert_allclose(got[1].tensor, want[:1], atol=1e-4)
    np.testing.assert_allclose(got[2].tensor, want[1:3], atol=1e-4)
    assert got[1].header["batched_requests"] == got[2].header["batched_requests"] == 2
    assert got[2].header["label_index"] == [int(i) for i in want[1:3].argmax(-1)]


def test_without_its_worker_the_node_answers_from_the_fallback_then_registers_the_worker(bundles, node_in):
    built, data = bundles
    result = built["two"]
    node, client = node_in(result.bundle_dir)
    assert node.status()["missing"] == ["edge-b"] and node.status()["degraded"]
    x = data.test.x[:1].numpy()
    client.send_multipart(protocol.encode("infer", 5, x))
    node.step(timeout_ms=1000)
    got = _answers(client, 1)[5]
    assert got.op == "result" and got.header["degraded"] == ["edge-b"]
    # the answer is the fallback map's, on edge-a's features alone
    import onnxruntime as ort

    fallback = ort.InferenceSession(str(result.bundle_dir / result.manifest.fallback(["edge-b"])["aggregator"]))
    with torch.no_grad():
        own = result.submodels[0](torch.from_numpy(x)).numpy()
    want = fallback.run(None, {fallback.get_inputs()[0].name: own})[0]
    np.testing.assert_allclose(got.tensor, want, atol=1e-4)
    # registration: a hello under the bundle's digest is welcomed, and the worker is ready
    ctx = node.ctx
    worker = ctx.socket(zmq.DEALER)
    worker.connect("inproc://back")
    try:
        worker.send_multipart(protocol.encode("hello", 0, device="edge-b", digest=manifest_digest(result.bundle_dir),
                                              feature_dim=result.manifest.device("edge-b").feature_dim))
        node.step(timeout_ms=1000)
        assert worker.poll(0) and protocol.decode(worker.recv_multipart()).op == "welcome"
        assert node.status()["ready"] and node.status()["workers"] == ["edge-b"]
        # a hello for another bundle is refused by name, and changes nothing
        worker.send_multipart(protocol.encode("hello", 0, device="edge-b", digest="0" * 64, feature_dim=1))
        node.step(timeout_ms=1000)
        refused = protocol.decode(worker.recv_multipart())
        assert refused.op == "error" and refused.header["code"] == "bad_hello"
        assert node.status()["ready"]  # the registration it had stands
    finally:
        worker.close(0)


def _hello(worker, result):
    worker.send_multipart(protocol.encode("hello", 0, device="edge-b", digest=manifest_digest(result.bundle_dir),
                                          feature_dim=result.manifest.device("edge-b").feature_dim))


def test_deadlines_in_simulated_time(bundles, node_in):
    """A silent worker is waited for until the request's deadline, to the millisecond, and no
    longer: the answer then comes from the fallback, flagged degraded; the worker is not waited
    for again until it is heard from. A request with a short deadline is not batched with a long
    one, and is answered ``timeout`` when its deadline passes while it waits in the queue. A
    worker silent for three keep-alive periods leaves the ready set."""
    built, data = bundles
    result = built["two"]
    clock = ManualClock()
    node, client = node_in(result.bundle_dir, clock=clock)
    worker = node.ctx.socket(zmq.DEALER)
    worker.connect("inproc://back")
    try:
        _hello(worker, result)
        node.step(timeout_ms=0)
        assert protocol.decode(worker.recv_multipart()).op == "welcome" and node.status()["ready"]
        x = data.test.x[:1].numpy()
        t0 = clock.now()
        client.send_multipart(protocol.encode("infer", 1, x, deadline_ms=2000))
        client.send_multipart(protocol.encode("infer", 2, x, deadline_ms=100))
        node.step(timeout_ms=0)  # reads both; serves request 1 alone, and waits for edge-b
        sent = protocol.decode(worker.recv_multipart())
        assert sent.op == "infer"  # edge-b was asked, and did not answer
        got = _answers(client, 1)
        assert got[1].op == "result" and got[1].header["degraded"] == ["edge-b"]
        assert got[1].header["batched_requests"] == 1  # request 2's 0.1 s is far from request 1's 2 s
        # the wait ended at request 1's deadline: its 2 s less the reply's reserve, within a poll's rounding
        waited = clock.now() - t0
        assert 2.0 - REPLY_RESERVE_S - 0.002 <= waited <= 2.0 - REPLY_RESERVE_S + 0.002, waited
        assert node.status()["missing"] == ["edge-b"]  # late: not waited for again...
        node.step(timeout_ms=0)  # request 2 waited in the queue past its 0.1 s
        late = _answers(client, 1)[2]
        assert late.op == "error" and late.header["code"] == "timeout"
        client.send_multipart(protocol.encode("infer", 3, x))
        before = clock.now()
        node.step(timeout_ms=0)
        assert _answers(client, 1)[3].header["degraded"] == ["edge-b"] and clock.now() == before  # ...not at all
        assert not worker.poll(0)  # and not sent the request
        clock.advance(0.5)
        _hello(worker, result)  # its heartbeat: heard from again, it is waited for again
        node.step(timeout_ms=0)
        assert node.status()["ready"]
        clock.advance(3 * KEEPALIVE_S + 0.01)  # then silent for three keep-alive periods: gone
        assert node.status()["missing"] == ["edge-b"]
    finally:
        worker.close(0)
