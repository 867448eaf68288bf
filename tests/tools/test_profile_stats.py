"""`coformer profile-stats` on planted profiles, as a user runs it: a subprocess, JSON out."""

import json
import subprocess
import sys

import numpy as np
import pytest

from coformer.runtime.profile import latency_estimate
from coformer.runtime.timing import summarise


def _law(l, d, h, D):
    flops = l * 17 * (2 * d * 3 * h * 32 + 2 * h * 32 * d + 4 * d * D)
    params = l * (4 * h * 32 * d + 2 * d * D)
    return flops, params, 0.3 + 0.02 * l + 18.0 * flops / 1e9 + 0.05 * params / 1e6


def _profile(device, seed, slow_entry=None, disturbed=0.0):
    """A 40-entry kit (same configs for every seed) timed in seven rounds of ten runs with 1% noise;
    a share ``disturbed`` of the rounds run 10-60% slow, and as large a share of the runs in every
    round up to 50% slow; ``slow_entry`` is 1.3x slow in every run (a shape the analytic model
    cannot express: systematic, the same in every profile)."""
    configs = np.random.default_rng(0)
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(40):
        cfg = [int(configs.integers(1, 13)), int(configs.integers(8, 769)), int(configs.integers(1, 25)),
               int(configs.integers(8, 3073))]
        flops, params, ms = _law(*cfg)
        if i == slow_entry:
            ms *= 1.3
        session = np.where(rng.random((7, 1)) < disturbed, rng.uniform(1.1, 1.6, (7, 1)), 1.0)
        run = np.where(rng.random((7, 10)) < disturbed, rng.uniform(1.0, 1.5, (7, 10)), 1.0)
        runs = ms * session * run * (1 + 0.01 * np.abs(rng.standard_normal((7, 10))))
        latency = summarise(runs.ravel())
        entries.append({"id": i, "config": cfg, "flops": flops, "params": params,
                        "round_medians_ms": np.median(runs, 1).tolist(), "latency_ms": latency,
                        "latency_estimate_ms": latency_estimate(latency), "gap_ratio": 1 + 0.5 / ms})
    return {"version": 1, "device": device, "entries": entries}


def run(*args):
    return subprocess.run([sys.executable, "-m", "coformer.tools.cli", "profile-stats", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_a_systematic_miss_is_told_from_noise_across_profiles(tmp_path):
    paths = []
    for i, (device, disturbed) in enumerate((("a", 0.0), ("a", 1 / 3), ("b", 0.0))):
        paths.append(tmp_path / f"{device}{i}.json")
        paths[-1].write_text(json.dumps(_profile(device, seed=i + 1, slow_entry=5, disturbed=disturbed)))
    done = run(*paths, "--report-json", tmp_path / "stats.json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "stats.json").read_text())
    (kit,) = report["kits"]
    # pairs of profiles of one device only: a0 against a1, not either against b2
    assert [(p["a"], p["b"]) for p in kit["pairs"]] == [(str(paths[0]), str(paths[1]))]
    top = kit["systematic"][0]
    assert top["config"] == _profile("x", 0)["entries"][5]["config"] and top["misses"] == 3
    assert top["mean_error"] == pytest.approx(-0.3 / 1.3, abs=0.05) and top["sd"] < 0.05
    # taking the planted shape's own error out leaves every prediction within 10%
    assert kit["within_10pct"] < 1.0 and kit["within_10pct_without_systematic"] == 1.0
    quiet, busy = report["profiles"][0], report["profiles"][1]
    assert 0.9 <= quiet["all_entries"]["within_10pct"] < 1.0
    # on the disturbed profile the profiler's estimate (the fastest run) beats the median of 3 rounds
    est = busy["estimates_within_10pct"]
    assert est["minimum of all samples (the profiler's)"] > est["median of the first 3 rounds"], est
    # the served slow-down, a fixed 0.5 ms here, is largest on the smallest sub-models
    bands = quiet["gap_ratio"]
    assert bands["below 1 ms"]["median"] > bands["1-5 ms"]["median"] > bands["5 ms and above"]["median"] > 1
    assert "once each entry's mean error (systematic) is taken out" in done.stdout


def test_a_predictor_file_or_a_missing_profile_is_named(tmp_path):
    (tmp_path / "p.predictor.json").write_text(json.dumps({"version": 2, "kind": "analytic", "params": {}}))
    done = run(tmp_path / "p.predictor.json")
    assert done.returncode != 0 and "p.predictor.json is not a device profile" in done.stderr
    done = run(tmp_path / "missing.json")
    assert done.returncode != 0 and "missing.json does not exist" in done.stderr
