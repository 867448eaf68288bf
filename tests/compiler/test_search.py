import pytest

from coformer.calibration.data import load_digits_dataset
from coformer.compiler.families import adapter_for
from coformer.compiler.evaluate import validation_loss
from coformer.compiler.policy import policy_violations
from coformer.compiler.predictor import LatencyPredictor
from coformer.compiler.search import Decoder, LatencyModel, run_search
from coformer.compiler.specs import DeviceSpec
from coformer.compiler.cost import teacher_cost
from tests.conftest import tiny_vit


@pytest.fixture(scope="module")
def setup():
    teacher = tiny_vit(num_heads=6, depth=4)
    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher)
    full = teacher_cost(shape).flops
    devices = [DeviceSpec("a", 10**9, full // 2, 1000.0, 1.0), DeviceSpec("b", 10**9, full // 4, 2.0, 0.6),
               DeviceSpec("c", 400_000, full // 6, 2.0, 0.4)]
    data = load_digits_dataset(size=16)
    imp = adapter.importance(teacher, [data.train.x[:64]])
    decoder = Decoder(shape, imp, devices)
    # A planted per-device latency law: ms = FLOPs / (share * 1 GFLOP/s) + 0.1 per layer.
    preds = [LatencyPredictor("analytic", {"coef": [1e3 / d.cpu_share, 0, 0, 0, 0.1, 0, 0, 0, 0.05], "cache_mparams": 0.0})
             for d in devices]
    latency = LatencyModel(shape, devices, preds, 1e6, lambda s: s.embed_dim)
    return teacher, shape, devices, decoder, latency, validation_loss(teacher, data)


def test_every_decoded_policy_satisfies_c1_to_c6(setup):
    import random

    _, shape, devices, decoder, _, _ = setup
    rng = random.Random(0)
    for _ in range(200):
        x = [rng.uniform(0.0, 1.2) for _ in range(decoder.dims)]
        assert policy_violations(decoder.decode(x), shape, devices) == []


def test_search_is_deterministic_under_a_seed_and_logs_every_evaluation(setup, tmp_path):
    _, _, _, decoder, latency, l_val = setup
    a = run_search("bo", decoder, latency, l_val, 0.05, initial=4, iterations=4, seed=7, log_path=tmp_path / "log")
    b = run_search("bo", decoder, latency, l_val, 0.05, initial=4, iterations=4, seed=7)
    assert [e.x for e in a.evaluations] == [e.x for e in b.evaluations]
    assert a.best_objective == b.best_objective == min(e.psi for e in a.evaluations)
    lines = (tmp_path / "log").read_text().splitlines()
    assert len(lines) == 8
    for e in a.evaluations:
        assert e.psi == pytest.approx(e.l_val + 0.05 * e.latency_ms)
        assert e.latency_ms == pytest.approx(max(x + y for x, y in zip(e.t1_ms, e.t2_ms)) + e.t3_ms)


def test_search_resumes_from_its_log_without_re_evaluating(setup, tmp_path):
    _, _, _, decoder, latency, l_val = setup
    calls = []

    def counting(policy):
        calls.append(1)
        return l_val(policy)

    first = run_search("random", decoder, latency, counting, 0.05, initial=3, iterations=2, seed=1,
                       log_path=tmp_path / "log")
    assert len(calls) == 5
    again = run_search("random", decoder, latency, counting, 0.05, initial=3, iterations=2, seed=1,
                       log_path=tmp_path / "log")
    assert len(calls) == 5 and again.best_objective == first.best_objective


def test_uniform_baseline_is_one_equal_split(setup):
    _, _, _, decoder, latency, l_val = setup
    res = run_search("uniform", decoder, latency, l_val, 0.05)
    widths = [s.embed_dim for s in res.best.policy.submodels]
    assert len(res.evaluations) == 1 and widths[0] == widths[1]


@pytest.mark.parametrize("method", ["bo", "random"])
def test_search_starts_from_the_heuristic_policy_and_never_returns_worse(setup, method):
    """The warm start: the first evaluation is the policy a compile without search takes, so a
    search whose proxy cannot tell the other points apart still returns nothing worse in Psi."""
    from coformer.compiler.policy import heuristic_policy

    teacher, shape, devices, decoder, latency, l_val = setup
    heuristic = heuristic_policy(shape, decoder.imp, devices)
    res = run_search(method, decoder, latency, l_val, 0.05, initial=3, iterations=3, seed=3)
    assert len(res.evaluations) == 6
    assert res.evaluations[0].policy.submodels == heuristic.submodels
    assert res.best_objective <= res.evaluations[0].psi
    # the other initial points are still drawn, not copies of the first
    assert len({tuple(e.x) for e in res.evaluations}) == 6
