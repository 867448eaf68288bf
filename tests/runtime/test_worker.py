"""The worker role as a class (issue 39): :meth:`Worker.handle` answers one message from the
central node without a socket, so what it sends back for each kind of message is checked
message by message; :meth:`Worker.serve` runs it behind a socket in a context the test gives
(``inproc://``, no port, no process, no sleep)."""

import threading

import numpy as np
import pytest
import torch
import zmq

from coformer.runtime import protocol
from coformer.runtime.errors import CoFormerError
from coformer.runtime.worker import Worker


@pytest.fixture(scope="module")
def compiled(bundles):
    """The two-device bundle (tests/runtime/conftest.py): edge-b is its worker."""
    built, data = bundles
    return built["two"], data


def _reply(worker, frames):
    out = worker.handle(frames)
    return None if out is None else protocol.decode(out)


def test_a_worker_answers_each_message_from_the_central_node_without_a_socket(compiled):
    result, data = compiled
    worker = Worker(result.bundle_dir, "edge-b", "tcp://127.0.0.1:1")  # nothing connects: handle() only
    try:
        x = data.test.x[:2].numpy()
        got = _reply(worker, protocol.encode("infer", 7, x))
        assert got.op == "features" and got.header["id"] == 7 and got.header["device"] == "edge-b"
        with torch.no_grad():
            want = result.submodels[1](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got.tensor, want, atol=1e-4)  # its sub-model's pooled features, both rows
        assert all(np.isfinite(got.header[k]) and got.header[k] >= 0 for k in ("compute_ms", "service_ms"))
        # registration: a welcome is taken, a restarted central node's unknown_worker asks for a new hello
        assert not worker.welcomed and _reply(worker, protocol.encode("welcome", 0)) is None and worker.welcomed
        assert _reply(worker, protocol.error_frames(0, "unknown_worker", "who?")) is None and not worker.welcomed
        # what it refuses, by code, and it goes on answering
        assert _reply(worker, protocol.encode("infer", 8, x[:, :, :8])).header["code"] == "bad_shape"
        assert _reply(worker, protocol.encode("infer", 9, x, model="nope")).header["code"] == "bad_model"
        assert _reply(worker, protocol.encode("status", 10)).header["code"] == "bad_op"
        assert _reply(worker, [b"{not json", b""]).header["code"] == "bad_header"
        assert _reply(worker, protocol.encode("infer", 11, x)).op == "features"
        # the wrong bundle or name: serving on cannot help, so it ends
        with pytest.raises(CoFormerError, match="refused worker 'edge-b'"):
            worker.handle(protocol.error_frames(0, "bad_hello", "digest differs"))
    finally:
        worker.throttle.release()


def test_a_worker_served_on_a_socket_the_test_holds_registers_then_answers(compiled):
    result, data = compiled
    ctx = zmq.Context()
    central = ctx.socket(zmq.ROUTER)
    central.bind("inproc://central")
    worker = Worker(result.bundle_dir, "edge-b", "inproc://central", context=ctx)
    stop = threading.Event()
    t = threading.Thread(target=worker.serve, args=(stop,))
    t.start()
    try:
        assert central.poll(30_000), "no hello within 30 s"
        ident, *frames = central.recv_multipart()
        hello = protocol.decode(frames)
        assert hello.op == "hello" and hello.header["device"] == "edge-b"
        assert hello.header["feature_dim"] == result.manifest.device("edge-b").feature_dim
        central.send_multipart([ident, *protocol.encode("welcome", 0)])
        x = data.test.x[:1].numpy()
        central.send_multipart([ident, *protocol.encode("infer", 3, x)])
        while True:  # hellos may still be on their way before the features
            assert central.poll(30_000), "no answer within 30 s"
            ident2, *frames = central.recv_multipart()
            got = protocol.decode(frames)
            if got.op != "hello":
                break
        assert ident2 == ident and got.op == "features" and got.header["id"] == 3
        with torch.no_grad():
            np.testing.assert_allclose(got.tensor, result.submodels[1](torch.from_numpy(x)).numpy(), atol=1e-4)
    finally:
        stop.set()
        t.join(30)
        central.close(0)
        ctx.term()
    assert not t.is_alive()
