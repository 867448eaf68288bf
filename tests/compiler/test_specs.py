import json

import pytest

from coformer.compiler.cost import submodel_cost
from coformer.compiler.devices import load_devices
from coformer.compiler.importance import Importance
from coformer.compiler.apportion import apportion
from coformer.compiler.policy import check_policy, heuristic_policy, policy_violations
from coformer.compiler.specs import DeviceSpec, Policy, SubModelSpec, TransformerShape
from coformer.runtime.errors import CoFormerError

SHAPE = TransformerShape("vit", embed_dim=64, heads=(4,) * 4, head_dim=16, mlp_dims=(256,) * 4, num_tokens=17,
                         num_prefix_tokens=1, patch_in_features=16, num_classes=10)


def _dev(name, share=1.0, flops=10**12, mem=10**12):
    return DeviceSpec(name=name, memory_bytes=mem, flops_budget=flops, cpu_share=share)


def _spec(d, h, D, layers=(0, 1, 2, 3)):
    return SubModelSpec(layers, tuple(range(d)), tuple(tuple(range(h)) for _ in layers),
                        tuple(tuple(range(D)) for _ in layers))


def test_specs_round_trip_through_json(tmp_path):
    p = Policy((_spec(32, 2, 128), _spec(16, 1, 64)), ("a", "b"), "test")
    p.save(tmp_path / "p.json")
    assert Policy.load(tmp_path / "p.json") == p
    assert TransformerShape.from_dict(json.loads(json.dumps(SHAPE.to_dict()))) == SHAPE
    d = _dev("edge-a", 0.5)
    assert DeviceSpec.from_dict(json.loads(json.dumps(d.to_dict()))) == d


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layers=(), channels=(0,), heads=(), neurons=()), "no layer"),
        (dict(layers=(0,), channels=(), heads=((0,),), neurons=((0,),)), "no embedding channel"),
        (dict(layers=(0, 1), channels=(0,), heads=((0,),), neurons=((0,), (0,))), "2 layers but 1 head lists"),
    ],
)
def test_spec_construction_errors(kwargs, match):
    with pytest.raises(CoFormerError, match=match):
        SubModelSpec(**kwargs)


def test_spec_validation_names_bad_indices():
    with pytest.raises(CoFormerError, match=r"channels indices \[64\]"):
        SubModelSpec((0,), (3, 64), ((0,),), ((0,),)).validate(SHAPE)
    with pytest.raises(CoFormerError, match="strictly increasing"):
        SubModelSpec((1, 0), (0,), ((0,), (0,)), ((0,), (0,))).validate(SHAPE)
    with pytest.raises(CoFormerError, match=r"heads of layer 2 indices \[4\]"):
        SubModelSpec((2,), (0,), ((4,),), ((0,),)).validate(SHAPE)


def test_device_errors_name_field_and_value(tmp_path):
    with pytest.raises(CoFormerError, match="memory_bytes is -1"):
        _dev("x", mem=-1)
    with pytest.raises(CoFormerError, match="cpu_share is 2"):
        _dev("x", share=2)
    f = tmp_path / "devices.yaml"
    f.write_text("devices:\n  - name: a\n    memory_bytes: 1.0e9\n    flops_budget: 2.0e9\n    link_mbit_s: fast\n")
    with pytest.raises(CoFormerError, match=r"devices\[0\]: field 'link_mbit_s' is 'fast'"):
        load_devices(f)
    f.write_text("devices:\n  - name: a\n    memory_bytes: 1.0e9\n    flops_budget: 2.0e9\n    colour: red\n")
    with pytest.raises(CoFormerError, match=r"unknown fields \['colour'\]"):
        load_devices(f)
    f.write_text("devices:\n  - name: a\n    memory_bytes: 1.0e9\n    flops_budget: 2.0e9\n    link_mbit_s: 2\n")
    assert load_devices(f)[0].flops_budget == 2_000_000_000


def test_every_constraint_is_reported_with_numbers():
    devices = [_dev("a", flops=1000, mem=10**9), _dev("b", mem=1000)]
    p = Policy((_spec(40, 3, 200), _spec(30, 2, 100)), ("a", "b"))
    bad = "\n".join(policy_violations(p, SHAPE, devices))
    assert "C2: embedding widths 40+30 = 70 exceed the teacher's d = 64" in bad
    assert "C3: heads at layer position 0: 3+2 = 5 exceed h = 4" in bad
    assert "C4: MLP widths at layer position 0: 200+100 = 300 exceed D = 256" in bad
    assert "C5: a needs" in bad and "its budget is 1.00k" in bad
    assert "C6: b needs" in bad
    with pytest.raises(CoFormerError, match="violates the device constraints"):
        check_policy(p, SHAPE, devices)
    with pytest.raises(CoFormerError, match="not among"):
        check_policy(Policy((_spec(8, 1, 8),), ("zz",)), SHAPE, devices)


def test_apportion_is_proportional_and_never_exceeds_the_total():
    assert apportion(24, [1.0, 0.6, 0.4]) == [12, 7, 5]
    assert sum(apportion(3, [1.0, 0.6, 0.4])) <= 3 and min(apportion(3, [1.0, 0.6, 0.4])) == 1
    for total in range(0, 50):
        assert sum(apportion(total, [0.7, 0.2, 0.1])) <= total


def _importance():
    return Importance(layers=(0.4, 0.1, 0.3, 0.2), channels=tuple(float(i % 7) for i in range(64)),
                      heads=tuple((1.0, 4.0, 2.0, 3.0) for _ in range(4)),
                      neurons=tuple(tuple(float((i * 37) % 256) for i in range(256)) for _ in range(4)))


def test_heuristic_policy_is_feasible_keeps_top_units_and_trims_layers_to_budget():
    full = submodel_cost(SubModelSpec.full(SHAPE), SHAPE).flops
    devices = [_dev("a", 1.0, flops=full // 4), _dev("b", 0.6, flops=full // 30), _dev("c", 0.4)]
    p = heuristic_policy(SHAPE, _importance(), devices)
    assert not policy_violations(p, SHAPE, devices)
    a, b, c = p.submodels
    assert (a.embed_dim, b.embed_dim, c.embed_dim) == (32, 19, 13)
    assert a.heads[0] == (1, 3)  # the two most important heads
    assert b.num_layers < 4 and 1 not in b.layers  # least important layer dropped first
    assert c.num_layers == 4
    for spec, dev in zip(p.submodels, devices):
        assert submodel_cost(spec, SHAPE).flops <= dev.flops_budget
    assert heuristic_policy(SHAPE, _importance(), devices) == p  # deterministic


def test_heuristic_policy_says_which_device_cannot_fit():
    devices = [_dev("a"), _dev("tiny", 0.5, flops=10)]
    with pytest.raises(CoFormerError, match="device 'tiny' cannot hold even one layer"):
        heuristic_policy(SHAPE, _importance(), devices)
