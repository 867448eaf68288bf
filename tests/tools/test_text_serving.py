"""Language bundles compiled, served by real processes over real ZeroMQ sockets: raw text in
through the client, the label out, equal to the in-process PyTorch ensemble."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from coformer.calibration.booster import BoostConfig
from coformer.calibration.text import sentiment_records, text_dataset
from coformer.compiler.hf import encoder_for, fit_head, wrap_hf
from coformer.compiler.pipeline import compile_bundle
from coformer.compiler.specs import DeviceSpec
from coformer.runtime import protocol
from coformer.runtime.client import ServerError
from coformer.runtime.errors import CoFormerError
from coformer.runtime.manifest import TEXT_SCHEMA_VERSION
from coformer.runtime.text import TextEncoder
from coformer.tools.cluster import LocalCluster
from tests.text_models import build, word_tokenizer

DEVICES = [DeviceSpec(name=n, memory_bytes=1 << 30, flops_budget=10**10, cpu_share=s)
           for n, s in (("edge-a", 1.0), ("edge-b", 0.6), ("edge-c", 0.4))]
TEXTS = ["the movie was not good", "honestly the food was really great today", "the app"]
PAIRS = [["the movie was good", "the food was bad"], ["the cat", "the dog was not red"]]


def pair_records(n=120):
    singles = [r["text"][0] for r in sentiment_records(n)]
    return [{"text": (a, b), "label": str(int(len(a.split()) > len(b.split())))}
            for a, b in zip(singles[::2], singles[1::2])] * 2


def _compile(kind, tmp, pair=False):
    tok = word_tokenizer(tmp / "tokenizer.json")
    teacher = wrap_hf(build(kind), max_length=24, tokenizer=tok)
    records = pair_records() if pair else sentiment_records(120)
    data = text_dataset(records, encoder_for(teacher, pair=pair))
    fit_head(teacher, data, epochs=20)
    result = compile_bundle(teacher, DEVICES, data, tmp / "bundle", boost=BoostConfig(epochs=1),
                            aggregator_epochs=3, progress=False)
    return result


@pytest.fixture(scope="module", params=["bert-pairs", "gpt2", "t5"])
def served(request, tmp_path_factory):
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    result = _compile(kind.split("-")[0], tmp, pair=kind.endswith("pairs"))
    with LocalCluster(result.bundle_dir, throttle="none", timeout_s=5.0) as cluster:
        yield kind, result, cluster


def test_raw_text_through_the_client_equals_the_pytorch_ensemble(served):
    kind, result, cluster = served
    m = result.manifest
    assert m.schema_version == TEXT_SCHEMA_VERSION and m.input.dynamic_axes == (1,)
    assert "tokenizer.json" in m.files and m.input.preprocessing["kind"] == "text"
    assert all(v < 1e-4 for v in m.parity.values())
    encoder = TextEncoder.from_bundle(result.bundle_dir)
    texts = PAIRS if kind == "bert-pairs" else TEXTS
    x = torch.as_tensor(encoder.encode(texts))
    with torch.no_grad():
        expected = result.aggregator(*[s(x) for s in result.submodels]).numpy()
    with cluster.client() as client:
        labels, r = client.classify(texts, encoder, m.labels)
        np.testing.assert_allclose(r.logits, expected, atol=1e-4)
        assert labels == [m.labels[i] for i in expected.argmax(-1)]
        # one text at a time: each batch has its own sequence length
        for t, row in zip(texts, expected):
            one, _ = client.classify([t], encoder, m.labels)
            assert one == [m.labels[int(row.argmax())]]


def test_bad_text_is_refused_clearly_and_the_server_keeps_serving(served):
    kind, result, cluster = served
    m = result.manifest
    encoder = TextEncoder.from_bundle(result.bundle_dir)
    good = PAIRS[:1] if kind == "bert-pairs" else TEXTS[:1]
    with pytest.raises(CoFormerError, match="input 0 is empty"):
        encoder.encode([["", "x"]] if kind == "bert-pairs" else ["   "])
    with pytest.raises(CoFormerError, match="input 0 has [0-9]+ tokens, the bundle's limit is 24"):
        long = " ".join(["good"] * 25)
        encoder.encode([[long, long]] if kind == "bert-pairs" else [long])
    with pytest.raises(CoFormerError, match="this bundle takes (a pair of texts|one text)"):
        encoder.encode(["one text"] if kind == "bert-pairs" else [["a", "pair"]])
    x = encoder.encode(good)
    V = m.input.preprocessing["vocab_size"]
    with cluster.client() as client:
        before, r_before = client.classify(good, encoder, m.labels)
        bad = x.copy()
        bad[0, 0, 1] = V + 7
        with pytest.raises(ServerError, match=f"bad_ids: token id {V + 7} at sample 0, position 1 is outside "
                                              f"the vocabulary 0..{V - 1}"):
            client.infer(bad)
        empty = x.copy()
        empty[:, 1] = 0
        with pytest.raises(ServerError, match="empty_text"):
            client.infer(empty)
        too_long = np.zeros((1, x.shape[1], 25), dtype=np.int64)
        too_long[:, 1] = 1
        with pytest.raises(ServerError, match=r"bad_shape.*\[batch, %d, 1..24\]" % x.shape[1]):
            client.infer(too_long)
        with pytest.raises(ServerError, match="bad_dtype"):
            client.infer(x.astype(np.float32))
        labels, r_after = client.classify(good, encoder, m.labels)  # still serving, and unchanged by the errors
        assert labels == before and np.allclose(r_after.logits, r_before.logits, atol=1e-5)


def test_a_worker_refuses_out_of_range_ids_itself(served):
    """The central node checks ids first; a worker does too (it may be reached by other senders)."""
    kind, result, cluster = served
    import zmq

    worker = result.manifest.workers[0].device
    encoder = TextEncoder.from_bundle(result.bundle_dir)
    x = encoder.encode(PAIRS[:1] if kind == "bert-pairs" else TEXTS[:1])
    x[0, 0, 0] = -1
    from coformer.runtime.worker import run_worker
    import threading

    ctx = zmq.Context()
    back = ctx.socket(zmq.ROUTER)
    port = back.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    t = threading.Thread(target=run_worker, args=(result.bundle_dir, worker, f"tcp://127.0.0.1:{port}"),
                         kwargs={"stop": stop}, daemon=True)
    t.start()
    try:
        assert back.poll(10_000)
        ident, *hello = back.recv_multipart()
        back.send_multipart([ident] + protocol.encode("welcome", 0))
        back.send_multipart([ident] + protocol.encode("infer", 9, x))
        while True:
            assert back.poll(10_000)
            _, *frames = back.recv_multipart()
            msg = protocol.decode(frames)
            if msg.op != "hello":
                break
        assert msg.op == "error" and msg.header["code"] == "bad_ids" and msg.id == 9
    finally:
        stop.set()
        t.join(5)
        back.close(0)
        ctx.term()


def test_runtime_cli_infer_takes_text(served):
    kind, result, cluster = served
    args = ["--text", *PAIRS[0]] if kind == "bert-pairs" else ["--text", TEXTS[0], TEXTS[1]]
    done = subprocess.run([sys.executable, "-m", "coformer.runtime.cli", "infer", str(result.bundle_dir),
                           "--central", cluster.endpoints["front"], "--keys", str(cluster.client_keys), *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert len(out["label"]) == (1 if kind == "bert-pairs" else 2)
    assert all(lab in result.manifest.labels for lab in out["label"])
