"""Strategies as plug-ins (issue 40): the runtime serves a bundle by looking its manifest's
``strategy`` up in :data:`coformer.runtime.strategies.STRATEGIES`, and nothing else in it
branches on the name. A strategy written here, in the test, is registered and served by an
unchanged :class:`CentralNode` and :class:`Worker`, on inproc sockets in one thread."""

import json
import shutil
import threading

import numpy as np
import pytest
import torch
import zmq

from coformer.runtime import protocol
from coformer.runtime.central import CentralNode
from coformer.runtime.errors import CoFormerError
from coformer.runtime.files import MANIFEST_NAME
from coformer.runtime.manifest import load_manifest
from coformer.runtime.security import local_operator, sign_bundle
from coformer.runtime.strategies import STRATEGIES, strategy_class
from coformer.runtime.strategies.base import Strategy
from coformer.runtime.worker import Worker


class WorkerOnly(Strategy):
    """A strategy no module of the runtime knows: the worker's pooled features are the answer
    (the central device computes nothing), one request at a time."""

    name = "worker_only"

    def run(self, x, index, acct):
        (worker,) = self.node.manifest.workers
        _, out = self.node.exchange({worker.device: (None, x, {})}, x.shape[0], acct)
        return out[worker.device]


@pytest.fixture
def worker_only_bundle(bundles, tmp_path, monkeypatch):
    """The two-device bundle, its manifest's strategy renamed ``worker_only`` and signed again here."""
    monkeypatch.setitem(STRATEGIES, "worker_only", f"{__name__}:WorkerOnly")
    built, data = bundles
    bundle = tmp_path / "bundle"
    shutil.copytree(built["two"].bundle_dir, bundle)
    raw = json.loads((bundle / MANIFEST_NAME).read_text())
    raw["strategy"], raw["fallbacks"] = "worker_only", []
    (bundle / MANIFEST_NAME).write_text(json.dumps(raw))
    sign_bundle(bundle, local_operator(create=True)[0])
    return bundle, built["two"], data


def test_a_strategy_registered_by_a_test_is_served_by_the_unchanged_node_and_worker(worker_only_bundle):
    bundle, result, data = worker_only_bundle
    m = load_manifest(bundle)
    assert m.strategy == "worker_only" and m.schema_version >= 2  # a baseline's floor: old runtimes refuse it
    ctx = zmq.Context()
    node = CentralNode(bundle, "inproc://front", "inproc://back", context=ctx)
    worker = Worker(bundle, "edge-b", "inproc://back", context=ctx)
    dealer, client = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        node.open()
        dealer.connect("inproc://back")
        client.connect("inproc://front")
        dealer.send_multipart(worker.hello())
        node.step(timeout_ms=1000)  # welcomes the worker
        assert worker.handle(dealer.recv_multipart()) is None and node.status()["ready"]
        x = data.test.x[:2].numpy()
        client.send_multipart(protocol.encode("infer", 7, x))
        # the node forwards the input and waits in its step for the worker: the worker answers from a thread

        def play_worker():
            dealer.send_multipart(worker.handle(dealer.recv_multipart()))

        t = threading.Thread(target=play_worker)
        t.start()
        node.step(timeout_ms=1000)
        t.join(10)
        got = protocol.decode(client.recv_multipart())
    finally:
        for s in (dealer, client):
            s.close(0)
        node.close()
        worker.throttle.release()
        ctx.term()
    assert got.op == "result", got.header
    with torch.no_grad():
        want = result.submodels[1](torch.from_numpy(x)).numpy()  # edge-b's pooled features, no aggregator
    np.testing.assert_allclose(got.tensor, want, atol=1e-4)
    assert got.header["degraded"] == [] and got.header["rounds"] == 1


def test_a_manifest_naming_no_registered_strategy_is_refused_by_name(bundles, tmp_path):
    built, _ = bundles
    bundle = tmp_path / "bundle"
    shutil.copytree(built["one"].bundle_dir, bundle)
    raw = json.loads((bundle / MANIFEST_NAME).read_text())
    raw["strategy"] = "sharded"
    (bundle / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(CoFormerError, match="strategy 'sharded' is not one of"):
        load_manifest(bundle)
    with pytest.raises(CoFormerError, match="'sharded'"):
        strategy_class("sharded")
