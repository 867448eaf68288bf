"""Decomposition structures (issue 37): which units each device keeps, for every family.

A partition gives no unit to two devices and its sub-models slice and run; a policy that
shares a unit is refused under a partitioning structure with the units named; a shared core
is held by every device and the rest is dealt apart."""

import random

import pytest
import torch

from coformer.compiler.decomposition import deal, overlaps
from coformer.compiler.families import adapter_for
from coformer.compiler.importance import Importance
from coformer.compiler.policy import check_policy, heuristic_policy, policy_violations
from coformer.compiler.search import Decoder
from coformer.compiler.specs import DeviceSpec, Policy
from coformer.runtime.errors import CoFormerError
from tests.conftest import tiny_deit_distilled, tiny_vit

DEVICES = [DeviceSpec("a", 1 << 30, 10**12, cpu_share=1.0), DeviceSpec("b", 1 << 30, 10**12, cpu_share=0.6),
           DeviceSpec("c", 1 << 30, 10**12, cpu_share=0.4)]


def _swin():
    import timm

    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=112, embed_dim=32,
                             depths=(1, 2, 1, 1), num_heads=(2, 4, 4, 8), num_classes=5).eval()


def _text(kind):
    from coformer.compiler.hf import wrap_hf
    from tests.text_models import build

    return lambda tok: wrap_hf(build(kind), max_length=16, tokenizer=tok)


FAMILIES = {"vit": lambda tok: tiny_vit(embed_dim=48, num_heads=6), "deit": lambda tok: tiny_deit_distilled(),
            "swin": lambda tok: _swin(), "bert": _text("bert"), "gpt2": _text("gpt2"), "t5": _text("t5")}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.text_models import word_tokenizer

    return word_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _importance(shape, seed=0):
    """Scores as plain data (what a family's scorer returns), shuffled so ranks are not index order."""
    rng = random.Random(seed)

    def scores(n):
        return tuple(rng.random() for _ in range(n))

    return Importance(scores(shape.num_layers), scores(shape.embed_dim), tuple(scores(h) for h in shape.heads),
                      tuple(scores(D) for D in shape.mlp_dims),
                      stage_channels=tuple(scores(w) for w in shape.widths[1:]))


def _example(teacher, adapter):
    if hasattr(teacher, "tokenizer_file"):
        x = torch.randint(4, 40, (2, 2, 16))
        x[:, 1] = 1  # attention mask
        return x
    return torch.randn(2, *adapter.input_shape(teacher))


def test_a_partition_deals_every_device_its_share_of_the_important_units_and_no_unit_twice():
    scores = [12 - i for i in range(12)]  # unit 0 the most important
    a, b, c = deal(scores, [6, 4, 2], "partition")
    assert (len(a), len(b), len(c)) == (6, 4, 2) and not (set(a) & set(b) or set(a) & set(c) or set(b) & set(c))
    assert 0 in a and 1 in b and 2 in c  # the top three units go one to each device
    nested = deal(scores, [6, 4, 2], "nested")
    assert set(nested[2]) <= set(nested[1]) <= set(nested[0])
    core = deal(scores, [6, 4, 2], "core")
    assert all(0 in kept for kept in core)  # the core (half the smallest quota: 1 unit) on every device
    rest = [set(k) - {0} for k in core]
    assert not (rest[0] & rest[1] or rest[0] & rest[2] or rest[1] & rest[2])
    with pytest.raises(CoFormerError, match="cannot give 6\\+4\\+4"):
        deal(scores, [6, 4, 4], "partition")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_slices_a_partition_and_refuses_a_shared_unit_by_name(family, tokenizer):
    teacher = FAMILIES[family](tokenizer)
    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher)
    imp = _importance(shape)
    policy = heuristic_policy(shape, imp, DEVICES, decomposition="partition")
    assert policy.decomposition == "partition" and policy_violations(policy, shape, DEVICES) == []
    for st in range(len(shape.widths)):  # C2 on the union: every stage's channels, each on one device
        kept = [set(s.all_channels[st]) for s in policy.submodels]
        assert sum(map(len, kept)) == len(set().union(*kept))
    x = _example(teacher, adapter)
    with torch.no_grad():
        for spec in policy.submodels:  # the dealt (not top-ranked) units slice into working sub-models
            out = adapter.slice(teacher, spec)(x)
            assert out.shape[0] == 2 and torch.isfinite(out).all()
    for point in ([0.9, 0.6, 0.5, 0.5, 0.5, 0.4, 0.3, 0.3, 0.3, 0.3, 0.2, 0.2], [1.0] * 12):
        decoded = Decoder(shape, imp, DEVICES, decomposition="partition").decode(point)  # asserts C1-C6
        assert policy_violations(decoded, shape, DEVICES) == []
    nested = heuristic_policy(shape, imp, DEVICES)  # the same counts, every device the top of one ranking
    assert nested.decomposition == "nested"
    relabelled = Policy(nested.submodels, nested.devices, decomposition="partition")
    with pytest.raises(CoFormerError, match=r"C2-C4 \(partition\): channels [\d, ]+ on a and b") as e:
        check_policy(relabelled, shape, DEVICES)
    assert "heads of layer" in str(e.value) and "MLP neurons of layer" in str(e.value)
    check_policy(Policy(nested.submodels, nested.devices, decomposition="core"), shape, DEVICES)  # counts only


def test_overlaps_name_the_units_and_the_devices_that_share_them():
    lines = overlaps([(1, 2, 3), (3, 4), (1, 5)], ["a", "b", "c"], "heads of layer 0:")
    assert lines == ["heads of layer 0: 1 on a and c", "heads of layer 0: 3 on a and b"]
    assert overlaps([tuple(range(20)), tuple(range(20))], ["a", "b"], "channels")[0].endswith(
        "11 and 8 more on a and b")


def test_a_policy_file_keeps_its_decomposition_and_an_unknown_one_is_refused(tmp_path):
    shape = adapter_for(tiny_vit()).read_shape(tiny_vit())
    policy = heuristic_policy(shape, _importance(shape), DEVICES[:2], decomposition="core")
    policy.save(tmp_path / "p.json")
    assert Policy.load(tmp_path / "p.json") == policy
    with pytest.raises(CoFormerError, match="--decomposition 'disjoint' is not one of"):
        Policy(policy.submodels, policy.devices, decomposition="disjoint")
