import numpy as np
import pytest

from coformer.compiler.predictor import LatencyPredictor, fit_predictor
from coformer.runtime.errors import CoFormerError


def _profile(n=40, noise=0.0, seed=0, cliff_mparams=None):
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(n):
        l, d, h, D = int(rng.integers(1, 13)), int(rng.integers(8, 769)), int(rng.integers(1, 25)), int(rng.integers(8, 3073))
        flops = l * 17 * (2 * d * 3 * h * 32 + 2 * h * 32 * d + 4 * d * D)
        params = l * (4 * h * 32 * d + 2 * d * D)
        ms = 0.3 + 0.02 * l + 18.0 * flops / 1e9 + 0.05 * params / 1e6
        if cliff_mparams is not None and params / 1e6 > cliff_mparams:
            ms += 0.2 * params / 1e6  # weights no longer fit the cache: every one comes from memory
        ms *= 1 + noise * rng.standard_normal()
        entries.append({"id": i, "config": [l, d, h, D], "flops": flops, "params": params,
                        "latency_ms": {"median": ms}})
    return {"device": "planted", "entries": entries}


def test_predictor_recovers_a_planted_latency_law_and_round_trips(tmp_path):
    pred, report = fit_predictor(_profile())
    assert report["within_10pct"] >= 0.9 and report["mape"] < 0.05
    assert report["n_train"] + report["n_test"] == 40 and report["chosen"] in ("mlp", "analytic")
    pred.save(tmp_path / "p.json")
    again = LatencyPredictor.load(tmp_path / "p.json")
    rows = _profile(5, seed=1)["entries"]
    np.testing.assert_allclose(again.predict(rows), pred.predict(rows))


@pytest.mark.parametrize("kind", ["mlp", "analytic"])
def test_each_kind_saves_and_loads(kind, tmp_path):
    pred, _ = fit_predictor(_profile(30), kinds=[kind])
    pred.save(tmp_path / "p.json")
    rows = _profile(3, seed=2)["entries"]
    np.testing.assert_allclose(LatencyPredictor.load(tmp_path / "p.json").predict(rows), pred.predict(rows))


def test_too_small_profile_and_bad_file_are_named(tmp_path):
    with pytest.raises(CoFormerError, match="at least"):
        fit_predictor(_profile(4))
    (tmp_path / "x.json").write_text('{"kind": "magic"}')
    with pytest.raises(CoFormerError, match="not a CoFormer latency predictor"):
        LatencyPredictor.load(tmp_path / "x.json")


def test_analytic_predictor_finds_a_planted_cache_cliff():
    # Latency per parameter jumps once the weights exceed the cache (LRU
    # thrashing): a hinge alone bends too late and misses entries just past it.
    profile = _profile(60, noise=0.01, seed=3, cliff_mparams=20.0)
    pred, report = fit_predictor(profile, kinds=["analytic"])
    assert report["within_10pct"] >= 0.9, report
    assert 10.0 < pred.params["cache_mparams"] < 30.0


def test_served_factor_follows_the_size_of_the_sub_model(tmp_path):
    # Planted: after an idle gap every run pays 0.5 ms more (caches refilled), so small
    # sub-models slow down by far more than large ones; one profile-wide factor fits neither.
    profile = _profile(40, seed=4)
    for e in profile["entries"]:
        e["gap_ratio"] = 1 + 0.5 / e["latency_ms"]["median"]
    profile["served_factor"] = float(np.median([e["gap_ratio"] for e in profile["entries"]]))
    pred, _ = fit_predictor(profile, kinds=["analytic"])
    lat = sorted(e["latency_ms"]["median"] for e in profile["entries"])
    small, large = lat[2], lat[-3]
    assert pred.served_factor_at(small) == pytest.approx(1 + 0.5 / small, rel=0.25)
    assert pred.served_factor_at(large) == pytest.approx(1 + 0.5 / large, rel=0.05)
    assert pred.served_factor_at(small) > pred.served_factor > pred.served_factor_at(large)
    row = next(e for e in profile["entries"] if e["latency_ms"]["median"] == small)
    t = pred.predict_one(row["config"], row["flops"], row["params"])
    assert pred.predict_served(row["config"], row["flops"], row["params"]) == pytest.approx(t + 0.5, rel=0.2)
    pred.save(tmp_path / "p.json")
    assert LatencyPredictor.load(tmp_path / "p.json").served_factor_at(small) == pred.served_factor_at(small)
    # a predictor fitted on a profile without per-entry ratios keeps the profile-wide factor
    bare = LatencyPredictor(pred.kind, {k: v for k, v in pred.params.items() if k != "served_points"})
    assert bare.served_factor_at(small) == bare.served_factor_at(large) == pred.served_factor


def test_a_profile_whose_runs_are_disturbed_still_gives_the_latency_law():
    """Planted: half of the timing rounds (sessions) run 10-60% slow, and within every round half
    of the runs are up to 50% slow (another tenant on the shared cache, a descheduled vCPU; such
    disturbances only add time). The profiler's estimate, the fastest of ten runs in each of seven
    rounds, still lets the predictor recover the law; the lower quartile of the seven round medians
    (the estimate before) does less well, and the median of three rounds (the one before that)
    worse still."""
    from coformer.runtime.profile import latency_estimate
    from coformer.runtime.timing import summarise

    rng = np.random.default_rng(5)
    truth = _profile(40, seed=5)
    estimates = {"min of all runs": lambda runs: latency_estimate(summarise(runs.ravel())),
                 "q25 of round medians": lambda runs: float(np.quantile(np.median(runs, 1), 0.25)),
                 "median of 3 rounds": lambda runs: float(np.median(np.median(runs[:3], 1)))}
    profiles = {name: {"device": "planted", "entries": []} for name in estimates}
    for e in truth["entries"]:
        ms = e["latency_ms"]["median"]
        session = np.where(rng.random((7, 1)) < 0.5, rng.uniform(1.1, 1.6, (7, 1)), 1.0)
        run = np.where(rng.random((7, 10)) < 0.5, rng.uniform(1.0, 1.5, (7, 10)), 1.0)
        runs = ms * session * run * (1 + 0.005 * np.abs(rng.standard_normal((7, 10))))
        for name, f in estimates.items():
            profiles[name]["entries"].append({**e, "latency_estimate_ms": f(runs)})
    fits = {name: fit_predictor(profile, kinds=["analytic"]) for name, profile in profiles.items()}
    rows = truth["entries"]
    actual = np.asarray([e["latency_ms"]["median"] for e in rows])
    on_law = {name: float(np.mean(np.abs(pred.predict(rows) / actual - 1) <= 0.10))
              for name, (pred, _) in fits.items()}
    held_out = {name: report["within_10pct"] for name, (_, report) in fits.items()}
    # against the undisturbed law, over all 40 entries
    assert on_law["min of all runs"] >= 0.95 > on_law["q25 of round medians"] > on_law["median of 3 rounds"], on_law
    # the criterion a user reads: held-out entries (8 of them), judged against their own measurement
    assert held_out["min of all runs"] >= 0.875, held_out


def test_every_entry_is_predicted_without_it_and_a_planted_miss_is_named():
    """The all-entries report refits once per entry (leave-one-out for the analytic model): on a
    law the model can express, an entry planted 1.3x slow is predicted about a quarter low by a
    fit on the others and is named among the worst. (It also drags a fit or two: FLOPs and
    parameters are nearly collinear, so one outlier can move weight between them and cost an
    entry of extreme shape, here [11, 14, 24, 3007], 25%.)"""
    from coformer.compiler.predictor import all_entries_report

    profile = _profile(40, noise=0.01, seed=6)
    profile["entries"][7]["latency_ms"]["median"] *= 1.3
    _, report = fit_predictor(profile, kinds=["analytic"], all_entries=True)
    every = report["all_entries"]
    assert every["kind"] == "analytic" and every["folds"] == every["n"] == 40
    planted = next(w for w in every["worst"][:2] if w["id"] == 7)
    assert planted["config"] == profile["entries"][7]["config"]
    assert planted["error"] == pytest.approx(-0.3 / 1.3, abs=0.05)
    assert 0.9 <= every["within_10pct"] < 1.0
    assert "errors" not in every
    errors = all_entries_report(profile, "analytic", keep_errors=True)["errors"]
    assert len(errors) == 40 and errors[7] == planted["error"]
    # the MLP is refitted ten times, not forty (seconds a fit)
    assert all_entries_report(_profile(20, seed=7), "mlp")["folds"] == 10


def _language_profile(n=60, seed=0):
    """A planted law in which latency grows with the sequence length T (per token, and
    attention's T^2), FLOPs counted at each entry's T, as a language kit's are."""
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(n):
        l, d, h, D, T = (int(rng.integers(1, 7)), int(rng.integers(8, 257)), int(rng.integers(1, 9)),
                         int(rng.integers(8, 1025)), int(rng.integers(8, 129)))
        flops = l * (2 * T * d * 3 * h * 32 + 4 * T * T * h * 32 + 2 * T * h * 32 * d + 4 * T * d * D)
        params = l * (4 * h * 32 * d + 2 * d * D)
        ms = 0.05 + 0.01 * l + 20.0 * flops / 1e9
        entries.append({"id": i, "config": [l, d, h, D, T], "tokens": T, "flops": flops, "params": params,
                        "latency_ms": {"median": ms}})
    return {"device": "planted", "entries": entries}


def test_a_language_profile_gives_a_length_aware_predictor_that_follows_the_length():
    from coformer.compiler.search import predictor_inputs
    from coformer.compiler.specs import SubModelSpec, TransformerShape

    pred, report = fit_predictor(_language_profile())
    assert pred.length_aware and pred.params["tokens_range"][0] >= 8 and report["mape"] < 0.1
    shape = TransformerShape(family="bert", embed_dim=256, heads=(8,) * 6, head_dim=32, mlp_dims=(1024,) * 6,
                             num_tokens=128, num_prefix_tokens=0, patch_in_features=0, num_classes=2)
    spec = SubModelSpec.full(shape)
    short = pred.predict_one(*predictor_inputs(spec, shape, pred, 16))
    full = pred.predict_one(*predictor_inputs(spec, shape, pred, 128))
    assert full > 4 * short  # the planted law: 8x the tokens, more than 8x attention
    features, flops, _ = predictor_inputs(spec, shape, pred, 16)
    assert features[-1] == 16 and len(features) == 5
    with pytest.raises(CoFormerError, match="language kit"):
        predictor_inputs(spec, shape, pred, None)  # an image teacher has no length to ask at
    if pred.kind == "mlp":
        with pytest.raises(CoFormerError, match="takes 5 features"):
            pred.predict_one([1, 8, 1, 8], 1000, 100)


def test_a_language_kit_samples_the_length_as_a_fifth_axis():
    from coformer.compiler.profile_kit import refine_configs, sample_configs
    from coformer.compiler.specs import TransformerShape

    text = TransformerShape(family="bert", embed_dim=64, heads=(4,) * 3, head_dim=16, mlp_dims=(256,) * 3,
                            num_tokens=48, num_prefix_tokens=0, patch_in_features=0, num_classes=2)
    configs = sample_configs(text, 20, seed=1)
    assert all(len(c) == 5 and 8 <= c[4] <= 48 for c in configs)
    assert configs[0] == (1, 8, 1, 8, 8) and configs[1] == (3, 64, 4, 256, 48)  # the corners
    assert len({c[4] for c in configs}) >= 10  # spread over the lengths, not piled at the ends
    assert all(len(c) == 5 and 8 <= c[4] <= 48 for c in refine_configs(text, configs[:3]))
    image = TransformerShape(family="vit", embed_dim=64, heads=(4,) * 3, head_dim=16, mlp_dims=(256,) * 3,
                             num_tokens=17, num_prefix_tokens=1, patch_in_features=48, num_classes=10)
    assert all(len(c) == 4 for c in sample_configs(image, 10))
