import pytest
import torch

from coformer.compiler.cost import submodel_cost
from coformer.compiler.families import adapter_for
from coformer.compiler.specs import SubModelSpec
from coformer.runtime.errors import CoFormerError
from tests.conftest import tiny_deit_distilled, tiny_vit

VARIANTS = {
    "vit-token": lambda: tiny_vit(),
    "vit-avg": lambda: tiny_vit(global_pool="avg"),
    "vit-layerscale-qknorm": lambda: tiny_vit(init_values=0.1, qk_norm=True, qkv_bias=False),
    "vit-reg-noembedclass": lambda: tiny_vit(reg_tokens=2, no_embed_class=True, pre_norm=True),
    "deit-distilled": lambda: tiny_deit_distilled(),
}


def _randomised(model):
    # Stock init leaves biases and LayerNorm affines at 0/1: perturb so slicing errors show.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_full_spec_reproduces_teacher_features(variant):
    teacher = _randomised(VARIANTS[variant]())
    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher)
    sub = adapter.slice(teacher, SubModelSpec.full(shape))
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        expected = adapter.teacher_features(teacher, x)
        got = sub(x)
        logits = adapter.teacher_head(teacher)(got)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
    assert torch.allclose(logits, teacher(x), atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cost_model_matches_flop_counter_and_parameter_count(variant):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    teacher = VARIANTS[variant]()
    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher)
    spec = SubModelSpec(layers=(0, 2), channels=tuple(range(0, 48, 2)), heads=((1, 3), ()),
                        neurons=((), tuple(range(0, 192, 3))))
    for s in (SubModelSpec.full(shape), spec):
        sub = adapter.slice(teacher, s)
        counter = FlopCounterMode(display=False)
        # The math backend runs attention as two counted matrix products; the fused
        # CPU kernel chosen for some lengths is invisible to the counter.
        with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            sub(torch.randn(1, 1, 16, 16))
        cost = submodel_cost(s, shape)
        assert cost.flops == counter.get_total_flops()
        assert cost.params == sum(p.numel() for p in sub.parameters())


def test_sliced_submodel_keeps_exactly_the_teachers_chosen_units():
    """The sub-model holds the teacher's own weights for the kept layers, channels, heads and
    neurons, and nothing else: smaller by what the spec drops, and it runs."""
    teacher = _randomised(tiny_vit())
    adapter = adapter_for(teacher)
    spec = SubModelSpec(layers=(0, 2), channels=(0, 5, 7, 40), heads=((2,), (0, 3)), neurons=((1, 2, 3), (9,)))
    sub = adapter.slice(teacher, spec)
    ch, hd = list(spec.channels), 12  # 48 channels over 4 heads
    p = dict(sub.named_parameters())
    assert torch.equal(p["patch.weight"], teacher.patch_embed.proj.weight[ch])
    assert torch.equal(p["pos_embed"], teacher.pos_embed[..., ch])
    for i, (layer, heads, neurons) in enumerate(zip(spec.layers, spec.heads, spec.neurons)):
        block = teacher.blocks[layer]
        rows = [part * 48 + h * hd + j for part in range(3) for h in heads for j in range(hd)]  # q, k, v
        assert torch.equal(p[f"blocks.{i}.attn.qkv.weight"], block.attn.qkv.weight[rows][:, ch])
        assert torch.equal(p[f"blocks.{i}.fc1.weight"], block.mlp.fc1.weight[list(neurons)][:, ch])
        assert torch.equal(p[f"blocks.{i}.fc2.weight"], block.mlp.fc2.weight[ch][:, list(neurons)])
    assert sum(v.numel() for v in p.values()) == submodel_cost(spec, adapter.read_shape(teacher)).params
    assert sum(v.numel() for v in p.values()) < sum(v.numel() for v in teacher.parameters()) / 20
    out = sub(torch.randn(2, 1, 16, 16))
    assert out.shape == (2, 4) and torch.isfinite(out).all()


def test_bad_spec_names_the_bad_indices():
    teacher = tiny_vit()
    adapter = adapter_for(teacher)
    spec = SubModelSpec(layers=(0, 7), channels=(0, 1), heads=((0,), (0,)), neurons=((0,), (0,)))
    with pytest.raises(CoFormerError, match=r"layers indices \[7\] are outside 0..2"):
        adapter.slice(teacher, spec)


def test_unsupported_model_is_refused_with_the_supported_list():
    with pytest.raises(CoFormerError, match="supported families: \\['bert', 'gpt2', 'swin', 't5', 'vit'\\]"):
        adapter_for(torch.nn.Linear(2, 2))


def test_importance_finds_planted_units():
    teacher = tiny_vit()
    with torch.no_grad():
        blk = teacher.blocks[1]
        hd = blk.attn.head_dim
        blk.attn.proj.weight[:, 2 * hd: 3 * hd] = 0.0       # head 2 of layer 1 contributes nothing
        blk.attn.proj.weight[:, 0:hd] *= 20.0               # head 0 of layer 1 dominates
        blk.mlp.fc2.weight[:, 17] *= 50.0                   # neuron 17 of layer 1 dominates
        blk.mlp.fc2.weight[:, 5] = 0.0                      # neuron 5 of layer 1 is dead
        teacher.patch_embed.proj.weight[11] *= 30.0         # channel 11 carries the most signal
        for m in (teacher.blocks[2].attn.proj, teacher.blocks[2].mlp.fc2):
            m.weight.zero_()
            m.bias.zero_()                                  # layer 2 changes nothing
    adapter = adapter_for(teacher)
    imp = adapter.importance(teacher, [torch.randn(8, 1, 16, 16) for _ in range(2)])
    heads = imp.heads[1]
    assert heads.index(min(heads)) == 2 and heads.index(max(heads)) == 0
    neurons = imp.neurons[1]
    assert neurons.index(max(neurons)) == 17 and neurons.index(min(neurons)) == 5
    assert imp.channels.index(max(imp.channels)) == 11
    assert imp.layers.index(min(imp.layers)) == 2


def test_importance_scorer_is_pluggable():
    teacher = tiny_vit()
    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher)

    def by_index(model, batches):
        from coformer.compiler.importance import Importance

        return Importance(tuple(range(3)), tuple(range(48)), tuple(tuple(range(4)) for _ in range(3)),
                          tuple(tuple(range(192)) for _ in range(3)), method="by-index")

    assert adapter.importance(teacher, [], method=by_index).method == "by-index"
    with pytest.raises(CoFormerError, match=r"use one of \['magnitude'\]"):
        adapter.importance(teacher, [], method="taylor")
    assert shape.num_layers == 3


@pytest.mark.parametrize("variant", ["vit-avg", "vit-layerscale-qknorm"])
def test_attention_is_exported_with_a_constant_scale(variant, tmp_path):
    """Exported sub-models and teachers carry the explicit attention (no run-time scale from the
    shape: Shape/Cast/Sqrt/Div a layer), agree with PyTorch's fused attention in ONNX Runtime, and
    the modules are left on their fused path after the export."""
    import onnx

    from coformer.compiler.lower import check_parity, export_onnx

    teacher = _randomised(VARIANTS[variant]())
    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher)
    spec = SubModelSpec((0, 1), tuple(range(20)), ((0, 2), (1,)), (tuple(range(30)), tuple(range(40))))
    sub = adapter.slice(teacher, spec)
    x = torch.randn(3, 1, 16, 16)
    for name, module in (("sub", sub), ("teacher", teacher)):
        path = export_onnx(module, [x[:1]], tmp_path / f"{name}.onnx", ["pixels"], ["out"])
        ops = {n.op_type for n in onnx.load(path).graph.node}
        assert "Sqrt" not in ops and "Softmax" in ops, (name, sorted(ops))
        assert check_parity(module, path, [x], ["pixels"], tolerance=1e-5) <= 1e-5
        fused = [m.fused_attn for m in module.modules() if hasattr(m, "fused_attn")]
        assert fused and all(fused), name
    assert shape.num_layers >= 2


@pytest.mark.parametrize("name, kwargs, size", [
    ("vit_small_patch16_224", {"depth": 2}, 224),  # class token, qkv bias
    ("vit_small_patch16_224", {"depth": 2, "qkv_bias": False}, 224),
    ("vit_base_patch16_gap_224", {"depth": 1}, 224),  # average pooling, no class token
    ("vit_base_patch32_384", {"depth": 1}, 384),  # another patch and image size
    ("deit_tiny_distilled_patch16_224", {"depth": 2}, 224),  # class and distillation tokens
    ("deit3_small_patch16_224", {"depth": 2}, 224),  # layer scale, no class-token position
])
def test_real_timm_configs_are_reproduced_exactly_by_a_full_spec(name, kwargs, size):
    """Random-init models from timm's real configs (depth reduced): every variant a user's
    pretrained ViT or DeiT can be in."""
    import timm

    torch.manual_seed(0)
    teacher = _randomised(timm.create_model(name, pretrained=False, **kwargs).eval())
    adapter = adapter_for(teacher)
    sub = adapter.slice(teacher, SubModelSpec.full(adapter.read_shape(teacher)))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert (sub(x) - adapter.teacher_features(teacher, x)).abs().max().item() <= 1e-5
        assert (adapter.teacher_head(teacher)(sub(x)) - teacher(x)).abs().max().item() <= 1e-5
