"""The bench's baselines: built from the teacher's weights, served by the real runtime
(separate processes, ZeroMQ), and equal to the teacher."""

import numpy as np
import pytest
import torch

from coformer.compiler.baselines import build_baseline, split_by_share
from coformer.compiler.specs import DeviceSpec
from coformer.runtime.errors import CoFormerError
from coformer.runtime.manifest import load_manifest
from coformer.tools.cluster import LocalCluster
from tests.conftest import tiny_deit_distilled, tiny_vit

DEVICES = [DeviceSpec(name=n, memory_bytes=1 << 29, flops_budget=10**9, link_mbit_s=100.0, cpu_share=s)
           for n, s in (("a", 1.0), ("b", 0.6), ("c", 0.4))]


def _noisy(model):
    # timm's init leaves biases at zero and the head near zero: a wrong slice could hide there
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_split_by_share_is_proportional_and_keeps_the_minimum():
    assert split_by_share(7, [1.0, 0.6, 0.4], minimum=1) == [4, 2, 1]
    assert split_by_share(24, [1.0, 0.6, 0.4]) == [12, 7, 5]
    assert split_by_share(3, [1.0, 0.01, 0.01], minimum=1) == [1, 1, 1]
    assert sum(split_by_share(3072, [1.0, 0.6, 0.4])) == 3072
    with pytest.raises(CoFormerError, match="at least 1 of 2"):
        split_by_share(2, [1.0, 1.0, 1.0], minimum=1)


@pytest.mark.parametrize("strategy", ["teacher", "pipeline", "tensor_parallel"])
@pytest.mark.parametrize("family", ["vit", "deit_distilled"])
def test_served_baseline_equals_the_teacher(tmp_path, strategy, family):
    torch.manual_seed(1)
    teacher = _noisy(tiny_vit(depth=4) if family == "vit" else tiny_deit_distilled(depth=4))
    x = torch.randn(6, 1, 16, 16)
    with torch.no_grad():
        want = teacher(x).numpy()
    assert want.std() > 0.1  # the comparison below is not between constants
    m = build_baseline(strategy, teacher, DEVICES, x, tmp_path / strategy, [str(i) for i in range(10)], {})
    assert m.strategy == strategy and load_manifest(tmp_path / strategy).strategy == strategy
    with LocalCluster(tmp_path / strategy, throttle="none") as cluster, cluster.client() as client:
        for i in range(0, 6, 2):
            r = client.infer(x[i:i + 2].numpy())
            np.testing.assert_allclose(r.logits, want[i:i + 2], atol=2e-4)
            assert r.label_index == list(want[i:i + 2].argmax(-1))
    tokens_bytes = 17 * 48 * 4 * 2  # batch 2 of 17 tokens x 48 channels, float32
    if strategy == "teacher":
        assert r.rounds == 0 and r.wire_bytes_to_workers == 0
    elif strategy == "pipeline":
        # stage a -> b -> c: the token tensor goes out twice; c sends logits back, b tokens
        assert r.rounds == 2
        assert tokens_bytes * 2 < r.wire_bytes_to_workers < tokens_bytes * 2 + 1000
        assert tokens_bytes < r.wire_bytes_from_workers < tokens_bytes + 1000 + 2 * 10 * 4 * 2
    else:
        # every layer: attention and MLP, each a broadcast to b and c and a reduction
        assert r.rounds == 2 * 4
        assert tokens_bytes * 2 * 8 < r.wire_bytes_to_workers < (tokens_bytes + 500) * 2 * 8
    assert r.timing_ms["critical_compute"] > 0


def test_tensor_parallel_splits_heads_and_neurons_by_share(tmp_path):
    teacher = _noisy(tiny_vit(depth=2, num_heads=4))
    m = build_baseline("tensor_parallel", teacher, DEVICES, torch.randn(3, 1, 16, 16), tmp_path / "tp",
                       [str(i) for i in range(10)], {})
    plan = m.model["plan"]
    assert plan["heads_per_device"] == {"a": [2, 2], "b": [1, 1], "c": [1, 1]}
    assert [sum(v[0] for v in plan["neurons_per_device"].values())] == [192]
    # each device holds only its share of the weights
    params = {d.device: d.params for d in m.devices}
    assert params["a"] > params["b"] > params["c"] > 0


def test_baselines_refuse_what_they_cannot_build(tmp_path):
    teacher = tiny_vit(depth=2)
    with pytest.raises(CoFormerError, match="at least as many layers"):
        build_baseline("pipeline", teacher, DEVICES, torch.randn(2, 1, 16, 16), tmp_path / "p", ["0"], {})
    with pytest.raises(CoFormerError, match="not one of"):
        build_baseline("ring", teacher, DEVICES, torch.randn(2, 1, 16, 16), tmp_path / "r", ["0"], {})
    assert not (tmp_path / "p").exists()
