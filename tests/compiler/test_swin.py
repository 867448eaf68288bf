"""Swin (v1): per-stage decomposition of timm's SwinTransformer, from its real configs."""

import pytest
import torch

from coformer.compiler.cost import submodel_cost
from coformer.compiler.families import adapter_for
from coformer.compiler.lower import check_parity, export_onnx
from coformer.compiler.policy import check_policy, heuristic_policy
from coformer.compiler.profile_kit import sample_configs, uniform_spec
from coformer.compiler.search import Decoder
from coformer.compiler.specs import DeviceSpec, Policy, SubModelSpec
from coformer.runtime.errors import CoFormerError


def _swin(name="swin_tiny_patch4_window7_224", **kwargs):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():  # stock init leaves biases, norms and bias tables at 0/1: perturb so slicing errors show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _small(**kwargs):
    """A small Swin whose last stage's grid (4x4) is smaller than the window: windows shrink,
    shifts vanish, and patch merging pads an odd grid (7x7 -> 4x4)."""
    cfg = dict(img_size=112, embed_dim=32, depths=(1, 2, 1, 1), num_heads=(2, 4, 4, 8), num_classes=5)
    cfg.update(kwargs)
    return _swin(**cfg)


def _partial():
    return SubModelSpec(layers=(0, 2, 4), channels=tuple(range(0, 32, 2)), heads=((1,), (0, 2, 3), ()),
                        neurons=((3, 4), (), tuple(range(50))),
                        stage_channels=(tuple(range(10)), tuple(range(5, 60)), tuple(range(0, 256, 3))))


@pytest.mark.parametrize("name, kwargs, size", [
    ("swin_tiny_patch4_window7_224", {"depths": (2, 2, 2, 2)}, 224),  # the real config, depth reduced
    ("swin_small_patch4_window7_224", {"depths": (1, 1, 2, 1)}, 224),
])
def test_full_spec_reproduces_the_teachers_features_and_logits(name, kwargs, size):
    teacher = _swin(name, **kwargs)
    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher)
    assert adapter.name == "swin" and shape.stage_dims == (96, 192, 384, 768)
    sub = adapter.slice(teacher, SubModelSpec.full(shape))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = adapter.teacher_features(teacher, x)
        got = sub(x)
        assert got.shape == expected.shape == (2, 768)
        assert (got - expected).abs().max().item() <= 1e-5
        assert (adapter.teacher_head(teacher)(got) - teacher(x)).abs().max().item() <= 1e-5


def test_small_windows_and_odd_grids_are_exact_too():
    teacher = _small()
    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher)
    assert shape.extras["stage_res"][-1] == [4, 4] and shape.extras["windows"][-1] == [4, 4]
    sub = adapter.slice(teacher, SubModelSpec.full(shape))
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        assert (sub(x) - adapter.teacher_features(teacher, x)).abs().max().item() <= 1e-5


def test_cost_model_matches_flop_counter_and_parameter_count():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    teacher = _small(num_heads=(2, 4, 8, 8))  # head widths differ by stage: 16, 16, 16, 32
    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher)
    for spec in (SubModelSpec.full(shape), _partial()):
        sub = adapter.slice(teacher, spec)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            sub(torch.randn(1, 3, 112, 112))
        cost = submodel_cost(spec, shape)
        assert cost.flops == counter.get_total_flops()
        assert cost.params == sum(p.numel() for p in sub.parameters())


def test_a_partial_spec_is_smaller_exports_to_onnx_and_keeps_parity(tmp_path):
    teacher = _small()
    adapter = adapter_for(teacher)
    spec = _partial()
    sub = adapter.slice(teacher, spec)
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        assert sub(x).shape == (3, 86)  # the last stage's kept channels
    path = export_onnx(sub, [x[:1]], tmp_path / "sub.onnx", ["pixels"], ["features"])
    assert check_parity(sub, path, [x], ["pixels"], tolerance=1e-5) <= 1e-5  # batch 3 through a batch-1 export
    assert adapter.feature_index(teacher, spec) == list(range(0, 256, 3))
    assert all(m.fused_attn for m in sub.modules() if hasattr(m, "fused_attn"))


def test_bad_stage_channels_are_named():
    teacher = _small()
    adapter = adapter_for(teacher)
    spec = SubModelSpec((0,), (0, 1), ((0,),), ((0,),), stage_channels=((0,), (0, 200), (0,)))
    with pytest.raises(CoFormerError, match=r"channels of stage 2 indices \[200\] are outside 0..127"):
        adapter.slice(teacher, spec)
    with pytest.raises(CoFormerError, match="channels given for 1 stages, the teacher has 4"):
        adapter.slice(teacher, SubModelSpec((0,), (0, 1), ((0,),), ((0,),)))


def test_importance_finds_planted_units_in_every_stage():
    teacher = _small()
    blocks = [b for s in teacher.layers for b in s.blocks]
    with torch.no_grad():
        blk = blocks[2]  # stage 1, its second block (shifted windows)
        hd = blk.attn.qkv.out_features // 3 // blk.attn.num_heads
        blk.attn.proj.weight[:, 1 * hd: 2 * hd] = 0.0  # head 1 contributes nothing
        blk.attn.proj.weight[:, 3 * hd: 4 * hd] *= 20.0  # head 3 dominates
        blk.mlp.fc2.weight[:, 7] *= 50.0
        blocks[4].mlp.fc2.weight[40] *= 60.0  # stage 3's channel 40 carries the most signal
        for m in (blocks[3].attn.proj, blocks[3].mlp.fc2):  # stage 2's only block changes nothing
            m.weight.zero_()
            m.bias.zero_()
    adapter = adapter_for(teacher)
    imp = adapter.importance(teacher, [torch.randn(4, 3, 112, 112)])
    imp.check(adapter.read_shape(teacher))
    assert imp.heads[2].index(min(imp.heads[2])) == 1 and imp.heads[2].index(max(imp.heads[2])) == 3
    assert imp.neurons[2].index(max(imp.neurons[2])) == 7
    assert imp.layers.index(min(imp.layers)) == 3
    assert len(imp.stage_channels) == 3 and len(imp.stage_channels[2]) == 256
    assert imp.stage_channels[2].index(max(imp.stage_channels[2])) == 40


def test_policies_keep_channels_per_stage_within_the_constraints():
    teacher = _small()
    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher)
    imp = adapter.importance(teacher, [torch.randn(2, 3, 112, 112)])
    devices = [DeviceSpec("a", 1 << 30, 10**10, cpu_share=1.0), DeviceSpec("b", 1 << 30, 10**10, cpu_share=0.5)]
    heuristic = heuristic_policy(shape, imp, devices)
    a, b = (s.stage_widths for s in heuristic.submodels)
    for width, da, db in zip(shape.stage_dims, a, b):  # every stage's channels shared out by compute share
        assert da + db == width and abs(da - 2 * width / 3) <= 1
    decoder = Decoder(shape, imp, devices)
    for x in ([0.7, 0.5, 0.5, 0.5] * 2, decoder.uniform_point(), [0.05] * 8):
        policy = decoder.decode(x)  # the decoder asserts C1-C6
        for spec in policy.submodels:
            spec.validate(shape)
            for layer, heads in zip(spec.layers, spec.heads):  # a fraction of each layer's own heads
                assert len(heads) <= shape.heads[layer]
    overlap = [SubModelSpec((0,), (0,), ((0, 1),), ((0,),), ((0,), (0,), (0,))),
               SubModelSpec((0, 4), (1,), ((1,), (0,)), ((1,), (1,)), ((1,), (1,), (1,)))]
    with pytest.raises(CoFormerError, match=r"C3: heads of layer 0: 2\+1 = 3 exceed its h = 2"):
        check_policy(Policy(tuple(overlap), ("a", "b")), shape, devices)  # stage 0 has 2 heads, not stage 3's 8
    wide = [SubModelSpec.full(shape), SubModelSpec.full(shape)]
    with pytest.raises(CoFormerError, match="C2: embedding widths 32\\+32 = 64 exceed.*\n.*C2: channel widths of stage 1"):
        check_policy(Policy(tuple(wide), ("a", "b")), shape, devices)


def test_profile_kit_entries_span_every_stage():
    teacher = _swin(depths=(2, 2, 6, 2))
    shape = adapter_for(teacher).read_shape(teacher)
    configs = sample_configs(shape, 12, seed=0)
    specs = [uniform_spec(shape, c) for c in configs]
    assert specs[0].num_layers == 1 and specs[1] == SubModelSpec.full(shape)  # both corners
    for c, spec in zip(configs, specs):
        spec.validate(shape)
        l, d, h, D = c
        assert spec.num_layers == l and spec.embed_dim == d
        assert spec.stage_widths[-1] == min(768, round(d * 8))  # widths scale with each stage's
    three = uniform_spec(shape, (3, 48, 2, 192))
    assert three.layers == (0, 6, 11)  # spread over the stages, not the first three blocks
    assert three.head_counts == (2, 8, 16) and three.mlp_dims == (192, 768, 1536)


def test_unsupported_swin_variants_are_refused_by_name():
    teacher = _small(global_pool="max")
    with pytest.raises(CoFormerError, match="global_pool='max'"):
        adapter_for(teacher).read_shape(teacher)
