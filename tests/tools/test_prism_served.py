"""PRISM bundles (issue 23) served by real processes over real ZeroMQ sockets: every device runs
its share of the positions and the central node relays the K/V Segment Means layer by layer.
What a user notices: the served answer is PRISM's forward (the teacher at CR = 1), the bytes
on the wire are the means (not the tokens), and a worker refuses rounds out of order."""

import threading

import numpy as np
import pytest
import torch
import zmq

from coformer.compiler.prism import prism_vit_forward
from coformer.compiler.prism_bundle import build_prism, plan_communication, prism_scores
from coformer.compiler.specs import DeviceSpec
from coformer.runtime import protocol
from coformer.runtime.errors import CoFormerError
from coformer.runtime.manifest import load_manifest
from coformer.runtime.schema import PRISM_SCHEMA_VERSION
from coformer.runtime.prism import Sessions, model_order
from coformer.tools.cluster import LocalCluster
from tests.compiler.test_baselines import _noisy
from tests.conftest import tiny_vit

DEVICES = [DeviceSpec(name=n, memory_bytes=1 << 29, flops_budget=10**9, link_mbit_s=100.0, cpu_share=s)
           for n, s in (("a", 1.0), ("b", 0.6), ("c", 0.4))]
LABELS = [str(i) for i in range(10)]


@pytest.mark.parametrize("pool,cr", [("token", 4), ("avg", 2)])
def test_served_prism_is_its_forward_and_sends_only_the_means(tmp_path, pool, cr):
    torch.manual_seed(0)
    teacher = _noisy(tiny_vit(depth=3, global_pool=pool))
    x = torch.randn(4, 1, 16, 16)
    m = build_prism(teacher, DEVICES, x, tmp_path / "b", LABELS, {}, cr)
    assert m.strategy == "prism" and m.schema_version == PRISM_SCHEMA_VERSION
    plan = m.model["plan"]
    shares = plan["shares"]
    assert shares == [9, 5, 3] and plan["compression_rate"] == cr
    assert m.parity["served_vs_prism_forward"] <= 1e-4
    want = prism_vit_forward(teacher, x, shares, cr).numpy()
    with torch.no_grad():
        assert np.abs(want - teacher(x).numpy()).max() > 1e-4  # CR > 1 is an approximation, not the teacher
    np.save(tmp_path / "x.npy", x.numpy())
    with LocalCluster(tmp_path / "b", throttle="none", local_inputs=tmp_path / "x.npy") as cluster, \
            cluster.client() as client:
        got = [client.infer(x[i:i + 1].numpy(), input_index=[i]) for i in range(4)]
        batch = client.infer(x[:2].numpy())  # the image from the central node, two samples in one request
    np.testing.assert_allclose(np.concatenate([r.logits for r in got]), want, atol=1e-4)
    np.testing.assert_allclose(batch.logits, want[:2], atol=1e-4)
    r = got[0]
    predicted = plan["communication"]
    assert r.rounds == predicted["rounds_per_inference"] == 3 + (pool == "avg")
    # with the input at every device, what crosses the links is the means (and a header per message)
    sent = r.wire_bytes_to_workers + r.wire_bytes_from_workers
    headers = 2 * 2 * r.rounds * 400
    assert predicted["bytes_per_inference"] < sent < predicted["bytes_per_inference"] + headers
    image = 16 * 16 * 4
    assert batch.wire_bytes_to_workers > 2 * 2 * image  # from the central node the images go out too


def test_cr_1_is_the_teacher_and_the_bytes_fall_with_cr(tmp_path):
    torch.manual_seed(1)
    teacher = _noisy(tiny_vit(depth=2))
    x = torch.randn(3, 1, 16, 16)
    m = build_prism(teacher, DEVICES, x, tmp_path / "b", LABELS, {}, 1)
    assert m.parity["prism_vs_teacher"] <= 1e-5
    with LocalCluster(tmp_path / "b", throttle="none") as cluster, cluster.client() as client:
        r = client.infer(x.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(r.logits, teacher(x).numpy(), atol=1e-4)
    sent = [plan_communication(teacher, DEVICES, cr)["bytes_per_inference"] for cr in (1, 2, 4, 16)]
    assert sent == sorted(sent, reverse=True) and sent[-1] < sent[0] / 3


class _Data:
    """A data set as ``prism_scores`` reads one: a test split with labels."""

    class _Split:
        def __init__(self, x, y):
            self.x, self.y = x, y

        def head(self, n):
            return self.x[:n]

        def __len__(self):
            return len(self.x)

    def __init__(self, x, y):
        self.test, self.preprocessing = self._Split(x, y), {}


def test_scores_at_cr_1_agree_with_the_teacher_everywhere():
    teacher = _noisy(tiny_vit(depth=2))
    x = torch.randn(20, 1, 16, 16)
    with torch.no_grad():
        y = teacher(x).argmax(-1)
    s = prism_scores(teacher, _Data(x, y), [9, 5, 3], [1, 16])
    assert s["teacher_accuracy"] == 1.0 and s["by_cr"][1] == {"accuracy": 1.0, "agreement_with_teacher": 1.0}
    assert 0.0 <= s["by_cr"][16]["agreement_with_teacher"] <= 1.0


def test_text_prism_pads_each_request_and_equals_its_forward(tmp_path):
    from coformer.calibration.text import sentiment_records, text_dataset
    from coformer.compiler.hf import encoder_for, fit_head, wrap_hf
    from coformer.compiler.prism_bundle import prism_family
    from coformer.runtime.prism import pad_tokens
    from coformer.runtime.text import TextEncoder
    from tests.text_models import build, word_tokenizer

    teacher = wrap_hf(build("bert-plain"), max_length=16, tokenizer=word_tokenizer(tmp_path / "tokenizer.json"))
    data = text_dataset(sentiment_records(40), encoder_for(teacher, pair=False))
    fit_head(teacher, data, epochs=5)
    assert teacher.pool_kind == "mean"  # a plain encoder: the workers send their shares' sums
    m = build_prism(teacher, DEVICES, data.val.head(3), tmp_path / "b", data.labels, dict(data.preprocessing), 2)
    assert m.parity["served_vs_prism_forward"] <= 1e-4 and m.input.dynamic_axes == (1,)
    encoder = TextEncoder.from_bundle(tmp_path / "b")
    texts = ["the movie was not good", "honestly the food was really great today and the app"]
    with LocalCluster(tmp_path / "b", throttle="none") as cluster, cluster.client() as client:
        labels, r = client.classify(texts, encoder, m.labels)
        short = client.infer(encoder.encode(texts[:1]))  # 6 tokens, padded to 16 by the central node
    tokens = torch.from_numpy(pad_tokens(encoder.encode(texts), 16, int(data.preprocessing["pad_id"])))
    want = prism_family(teacher).reference(tokens, m.model["plan"]["shares"], 2).numpy()
    np.testing.assert_allclose(r.logits, want, atol=1e-4)
    np.testing.assert_allclose(short.logits, want[:1], atol=1e-4)
    assert labels == [m.labels[i] for i in want.argmax(-1)]
    assert r.rounds == 3 + 1  # three layers, then the workers' sums


def test_gpt2_prism_is_causal_and_pools_the_last_token_wherever_it_falls(tmp_path):
    """GPT-2's last real token moves with the text's length: it lands on a different device for
    a short and a long text, and the served answer is PRISM's forward (the teacher at CR = 1)."""
    from coformer.calibration.text import sentiment_records, text_dataset
    from coformer.compiler.hf import encoder_for, fit_head, wrap_hf
    from coformer.compiler.prism_bundle import prism_family
    from coformer.runtime.prism import pad_tokens
    from coformer.runtime.text import TextEncoder
    from tests.text_models import build, word_tokenizer

    teacher = wrap_hf(build("gpt2"), max_length=16, tokenizer=word_tokenizer(tmp_path / "tokenizer.json"))
    assert teacher.pool_kind == "last"
    data = text_dataset(sentiment_records(40), encoder_for(teacher, pair=False))
    fit_head(teacher, data, epochs=2)
    pad = int(data.preprocessing["pad_id"])
    exact = build_prism(teacher, DEVICES, data.val.head(3), tmp_path / "one", data.labels, dict(data.preprocessing), 1)
    assert exact.parity["prism_vs_teacher"] <= 1e-5 and exact.parity["served_vs_prism_forward"] <= 1e-4
    m = build_prism(teacher, DEVICES, data.val.head(3), tmp_path / "b", data.labels, dict(data.preprocessing), 2)
    assert m.model["plan"]["shares"] == [8, 5, 3]
    encoder = TextEncoder.from_bundle(tmp_path / "b")
    texts = ["not good", "honestly the food was really great today and the app"]  # last token on a, then b or c
    with LocalCluster(tmp_path / "b", throttle="none") as cluster, cluster.client() as client:
        r = client.infer(encoder.encode(texts))
    tokens = torch.from_numpy(pad_tokens(encoder.encode(texts), 16, pad))
    assert tokens[0, 1].sum() <= 8 < tokens[1, 1].sum()
    want = prism_family(teacher).reference(tokens, m.model["plan"]["shares"], 2).numpy()
    np.testing.assert_allclose(r.logits, want, atol=1e-4)
    assert np.isfinite(r.logits).all()


def test_prism_refuses_what_it_does_not_serve(tmp_path):
    from tests.conftest import tiny_deit_distilled

    with pytest.raises(CoFormerError, match="distilled two-head"):
        build_prism(tiny_deit_distilled(), DEVICES, torch.randn(2, 1, 16, 16), tmp_path / "d", LABELS, {}, 4)
    with pytest.raises(CoFormerError, match="at least 2"):
        build_prism(tiny_vit(), DEVICES[:1], torch.randn(2, 1, 16, 16), tmp_path / "one", LABELS, {}, 4)
    with pytest.raises(CoFormerError, match="compression-rate 0"):
        build_prism(tiny_vit(), DEVICES, torch.randn(2, 1, 16, 16), tmp_path / "z", LABELS, {}, 0)
    assert model_order(["layer10", "head", "layer2", "embed"]) == ["embed", "layer2", "layer10", "head"]
    # a family whose adapter has no PRISM hooks is refused by name, with the families that have them
    import timm

    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=112, embed_dim=32,
                             depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), num_classes=len(LABELS)).eval()
    with pytest.raises(CoFormerError, match=r"\['bert', 'gpt2', 'vit'\] families .*not 'SwinTransformer'"):
        build_prism(swin, DEVICES, torch.randn(2, 3, 112, 112), tmp_path / "s", LABELS, {}, 4)


def test_a_worker_refuses_rounds_out_of_order_and_keeps_serving(tmp_path):
    """A peer acting as the central node (a real ROUTER socket) drives a real worker."""
    from coformer.runtime.manifest import manifest_digest
    from coformer.runtime.worker import run_worker

    teacher = _noisy(tiny_vit(depth=3))
    x = torch.randn(1, 1, 16, 16)
    m = build_prism(teacher, DEVICES, x, tmp_path / "b", LABELS, {}, 4)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, args=(tmp_path / "b", "b", f"tcp://127.0.0.1:{port}"),
                              kwargs={"stop": stop}, daemon=True)
    worker.start()
    try:
        assert router.poll(30000)
        ident, *hello = router.recv_multipart()
        assert protocol.decode(hello).header["digest"] == manifest_digest(tmp_path / "b")
        router.send_multipart([ident, *protocol.encode("welcome", 0)])
        others = np.zeros((1, *m.device("b").models["layer0"].input_shape), np.float32)

        def ask(rid, model, tensor, **fields):
            router.send_multipart([ident, *protocol.encode("infer", rid, tensor, model=model, **fields)])
            while True:
                assert router.poll(30000)
                msg = protocol.decode(router.recv_multipart()[1:])
                if msg.op != "hello":
                    return msg

        bad = ask(1, "layer0", others, session=7)  # no embed round before it
        assert bad.op == "error" and bad.header["code"] == "bad_session" and "out of order" in bad.header["message"]
        assert ask(2, "layer0", others).header["code"] == "bad_session"  # no session number at all
        means = ask(3, "embed", x.numpy(), session=7)
        assert means.op == "features" and means.tensor.shape == (1, *m.device("b").models["embed"].output_shape)
        assert ask(4, "layer1", others, session=7).header["code"] == "bad_session"  # skips layer0
        nxt = ask(5, "layer0", others, session=7)
        assert nxt.op == "features" and np.isfinite(nxt.tensor).all()
    finally:
        stop.set()
        worker.join(timeout=10)
        router.close(0)
        ctx.term()


def test_sessions_keep_a_bounded_number_of_requests():
    class Engine:
        input_names = ["pixels"]

        def infer(self, feeds):
            return {"new_hidden": np.zeros(1), "send": np.ones(1)}

    s = Sessions(["embed", "layer0", "layer1"], {}, keep=2)
    for sid in range(5):
        s.run(Engine(), "embed", {"session": sid}, np.zeros(1))
    assert len(s) == 2
    with pytest.raises(protocol.ProtocolError, match="session 0"):
        s.run(Engine(), "layer0", {"session": 0}, np.zeros(1))


def test_a_one_layer_class_token_model_needs_one_round(tmp_path):
    teacher = tiny_vit(depth=1)
    m = build_prism(teacher, DEVICES, torch.randn(2, 1, 16, 16), tmp_path / "b", LABELS, {}, 16)
    # depth 1, class token: the workers only embed and send their first (and last) layer's means
    assert {d.device: model_order(d.models) for d in m.devices} == {"a": ["embed", "layer0"], "b": ["embed"],
                                                                    "c": ["embed"]}
    assert load_manifest(tmp_path / "b").model["plan"]["communication"]["rounds_per_inference"] == 1
