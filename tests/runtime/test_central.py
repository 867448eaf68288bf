"""The central node driven one turn at a time (issue 39): :class:`CentralNode` in the test's own
ZeroMQ context on ``inproc://`` endpoints, opened, then :meth:`~CentralNode.step`-ped by the
test, which plays the client and the worker on sockets it holds. Batching, degraded answers
and registration are checked in one thread, with no sleep, no port and no process."""

import numpy as np
import pytest
import torch
import zmq

from coformer.runtime import protocol
from coformer.runtime.central import CentralNode


@pytest.fixture
def node_in():
    """``node_in(bundle)``: an opened CentralNode on inproc endpoints and a client DEALER
    connected to it, in one context; closed after the test."""
    ctx = zmq.Context()
    made = []

    def make(bundle_dir):
        node = CentralNode(bundle_dir, "inproc://front", "inproc://back", context=ctx)
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
    from coformer.runtime.manifest import manifest_digest

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
