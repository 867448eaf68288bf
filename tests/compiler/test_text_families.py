"""BERT, GPT-2 and T5 encoder: the converted teacher is the teacher, slices are exact
where they can be checked exactly, and ONNX agrees at several sequence lengths."""

import numpy as np
import pytest
import torch

from coformer.calibration.text import sentiment_records, text_dataset
from coformer.compiler.families import adapter_for
from coformer.compiler.families.textnet import PartsModule
from coformer.compiler.hf import encoder_for, wrap_hf
from coformer.compiler.lower import lower_submodel
from coformer.compiler.specs import SubModelSpec
from coformer.runtime.errors import CoFormerError
from coformer.runtime.onnxruntime_backend import OnnxRuntimeEngine
from tests.text_models import build, word_tokenizer

KINDS = ["bert", "bert-plain", "gpt2", "gpt2-plain", "t5", "t5-relu"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def teacher_and_tokens(kind, tokenizer, n=12):
    teacher = wrap_hf(build(kind), max_length=32, tokenizer=tokenizer)
    data = text_dataset(sentiment_records(60), encoder_for(teacher, pair=False))
    x = data.train.x[:n]
    assert (x[:, 1] == 0).any(), "the batch must hold padding, or masking goes untested"
    return teacher, x


@pytest.mark.parametrize("kind", KINDS)
def test_full_spec_reproduces_the_teacher_feature(kind, tokenizer):
    teacher, x = teacher_and_tokens(kind, tokenizer)
    adapter = adapter_for(teacher)
    full = adapter.slice(teacher, SubModelSpec.full(adapter.read_shape(teacher)))
    with torch.no_grad():
        expected, got = teacher.features(x), full(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=2e-5), (got - expected).abs().max()


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_teacher_logits_are_the_hf_classifier_logits(kind, tokenizer):
    teacher, x = teacher_and_tokens(kind, tokenizer)
    with torch.no_grad():
        hf = teacher.hf(input_ids=x[:, 0], attention_mask=x[:, 1],
                        **({"token_type_ids": x[:, 2]} if kind == "bert" else {})).logits
        assert torch.allclose(teacher(x), hf, atol=2e-5)


def _zero_heads(net, layer, drop, hd):
    with torch.no_grad():
        for j in drop:
            net.blocks[layer].attn.o.weight[:, j * hd:(j + 1) * hd] = 0


@pytest.mark.parametrize("kind", ["t5", "gpt2", "bert-plain"])
def test_dropping_heads_equals_silencing_them(kind, tokenizer):
    """Uneven head sets per layer; for T5 this checks each layer reads its own heads' columns of the
    shared relative-position table."""
    teacher, x = teacher_and_tokens(kind, tokenizer)
    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher)
    full = adapter.full_net(teacher)
    keep = [(0, 3), (1,), (0, 1, 2)]
    spec = SubModelSpec(tuple(range(3)), tuple(range(32)), tuple(keep), tuple(tuple(range(m)) for m in shape.mlp_dims))
    sub = adapter.slice(teacher, spec)
    import copy

    ref = copy.deepcopy(full)
    for layer, k in enumerate(keep):
        _zero_heads(ref, layer, [h for h in range(4) if h not in k], shape.head_dim)
    with torch.no_grad():
        assert torch.allclose(sub(x), ref(x), atol=2e-5)
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in full.parameters())


def test_t5_keeps_the_shared_bias_when_layer_0_is_dropped(tokenizer):
    teacher, x = teacher_and_tokens("t5", tokenizer)
    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher)
    full = adapter.full_net(teacher)
    spec = SubModelSpec((1, 2), tuple(range(32)), ((0, 1, 2, 3), (2,)), tuple(tuple(range(64)) for _ in range(2)))
    sub = adapter.slice(teacher, spec)
    assert sub.rel is not None and sub.rel.weight.shape[1] == 4
    import copy

    ref = copy.deepcopy(full)
    ref.blocks[0].attn = ref.blocks[0].fc1 = None  # layer 0 passes the residual through, its table stays
    _zero_heads(ref, 2, [0, 1, 3], shape.head_dim)
    with torch.no_grad():
        assert torch.allclose(sub(x), ref(x), atol=2e-5)
        silenced = copy.deepcopy(sub)
        silenced.rel.weight.zero_()
        assert not torch.allclose(silenced(x), sub(x), atol=1e-4), "the relative bias must matter"


@pytest.mark.parametrize("kind", ["bert", "gpt2", "t5"])
def test_onnx_matches_pytorch_at_three_sequence_lengths(kind, tokenizer, tmp_path):
    teacher, x = teacher_and_tokens(kind, tokenizer)
    adapter = adapter_for(teacher)
    spec = SubModelSpec((0, 2), tuple(range(0, 32, 2)), ((1, 2), (0,)), (tuple(range(20)), tuple(range(5, 30))))
    sub = adapter.slice(teacher, spec)
    path = tmp_path / "sub.onnx"
    assert lower_submodel(PartsModule(sub), x[:3], path, adapter.input_names(teacher), text=True) < 1e-4
    names = adapter.input_names(teacher)
    with OnnxRuntimeEngine(path) as engine, torch.no_grad():
        assert engine.input_names == names
        for T in (2, 5, int(x.shape[-1])):
            cut = x[..., :T].clone()
            got = next(iter(engine.infer({n: cut[:, i].numpy() for i, n in enumerate(names)}).values()))
            np.testing.assert_allclose(got, sub(cut).numpy(), atol=1e-4)


def test_plain_encoders_and_supported_architectures(tokenizer):
    from coformer.compiler.families import hf_adapter_for

    teacher = wrap_hf(build("t5"), max_length=32, tokenizer=tokenizer)
    assert not teacher.head_fitted and teacher.pool_kind == "mean"
    import transformers as tf

    roberta = tf.RobertaModel(tf.RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32))
    with pytest.raises(CoFormerError, match="RobertaModel is not supported.*BertModel.*GPT2Model.*T5EncoderModel"):
        hf_adapter_for(roberta)
    with pytest.raises(CoFormerError, match="max_length 64 exceeds the model's 40 positions"):
        wrap_hf(build("bert"), max_length=64, tokenizer=tokenizer)


def test_text_costs_count_embeddings_and_gated_mlps(tokenizer):
    from coformer.compiler.cost import teacher_cost

    for kind in ("bert", "gpt2", "t5"):
        teacher = wrap_hf(build(kind), max_length=32, tokenizer=tokenizer)
        net = adapter_for(teacher).full_net(teacher)
        c = teacher_cost(adapter_for(teacher).read_shape(teacher))
        # the analytic count is the sliceable network's parameters (T5: its small bias table aside)
        exact = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("rel."))
        assert c.params == exact, kind


def test_slices_follow_the_teacher_after_it_is_trained_further(tokenizer):
    teacher, x = teacher_and_tokens("bert", tokenizer)
    adapter = adapter_for(teacher)
    full = SubModelSpec.full(adapter.read_shape(teacher))
    before = adapter.slice(teacher, full)
    with torch.no_grad():
        teacher.hf.bert.encoder.layer[1].output.dense.weight.mul_(1.5)  # as an optimiser step would, in place
        after = adapter.slice(teacher, full)
        assert torch.allclose(after(x), teacher.features(x), atol=2e-5)
        assert not torch.allclose(before(x), after(x), atol=1e-4)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "t5"])
def test_importance_finds_planted_heads_and_neurons(kind, tokenizer):
    teacher, x = teacher_and_tokens(kind, tokenizer)
    adapter = adapter_for(teacher)
    net = adapter.full_net(teacher)
    with torch.no_grad():  # plant on the converted network the scores are read from
        hd = net.cfg["head_dim"]
        net.blocks[1].attn.o.weight[:, 2 * hd:3 * hd] *= 30.0
        net.blocks[1].attn.o.weight[:, 0:hd] = 0.0
        net.blocks[2].fc2.weight[:, 7] *= 50.0
        net.blocks[2].fc2.weight[:, 3] = 0.0
    imp = adapter.importance(teacher, [x])
    assert max(range(4), key=lambda h: imp.heads[1][h]) == 2
    assert min(range(4), key=lambda h: imp.heads[1][h]) == 0
    assert max(range(len(imp.neurons[2])), key=lambda i: imp.neurons[2][i]) == 7
    assert imp.neurons[2][3] == 0.0
    with pytest.raises(CoFormerError, match="importance method 'taylor' is not available"):
        adapter.importance(teacher, [x], "taylor")
