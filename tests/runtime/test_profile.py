import json

import numpy as np
import pytest

from coformer.runtime.errors import CoFormerError
from coformer.runtime.profile import profile_kit
from tests.conftest import tiny_vit


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    from coformer.compiler.profile_kit import write_kit

    out = tmp_path_factory.mktemp("kit")
    write_kit(tiny_vit(), [(1, 16, 1, 16), (3, 48, 4, 192), (2, 32, 2, 64)], out, progress=False)
    return out


def test_profile_times_every_entry_in_rounds_and_merges_trtexec(kit, tmp_path):
    from coformer.compiler.predictor import entry_latency_ms

    times = tmp_path / "times.json"
    times.write_text(json.dumps([{"latencyMs": 7.0 + i, "startComputeMs": 0.0, "endComputeMs": 6.0 + i}
                                 for i in range(3)]))
    out = tmp_path / "device.json"
    prof = profile_kit(kit, "dev", warmup_ms=5, iterations=5, duration_s=0.02, rounds=2, trtexec={2: times},
                       progress=False, out=out, extra_rounds=0)
    assert json.loads(out.read_text()) == prof
    assert [e["id"] for e in prof["entries"]] == [0, 1, 2] and prof["rounds"] == 2
    small, big, imported = prof["entries"]
    for e in (small, big):
        assert e["source"] == "benchmark_engine" and len(e["round_medians_ms"]) == 2
        assert e["latency_ms"]["count"] >= 10  # at least `iterations` in each round
        # the latency the predictor fits: the fastest of all runs (disturbances only add time)
        assert entry_latency_ms(e) == e["latency_estimate_ms"] == e["latency_ms"]["min"]
        assert e["latency_estimate_ms"] <= min(e["round_medians_ms"])
    assert prof["estimate"] == "min"
    assert entry_latency_ms(big) > entry_latency_ms(small)  # 3 wide layers vs one narrow one
    # the extra gapped runs give each timed entry a ratio and the profile its served factor
    assert "gap_ratio" in small and "gap_ratio" not in imported
    assert prof["served_factor"] == pytest.approx(np.median([small["gap_ratio"], big["gap_ratio"]]))
    assert imported["source"].startswith("trtexec") and imported["latency_ms"]["median"] == pytest.approx(8.0)
    assert entry_latency_ms(imported) == pytest.approx(7.0)  # the fastest latencyMs, as for timed entries


def test_profile_refuses_unknown_trtexec_ids_and_bad_rounds(kit, tmp_path):
    with pytest.raises(CoFormerError, match=r"ids \[9\]"):
        profile_kit(kit, trtexec={9: tmp_path / "t.json"}, progress=False)
    with pytest.raises(CoFormerError, match="rounds 0"):
        profile_kit(kit, rounds=0, progress=False)
    with pytest.raises(CoFormerError, match="not a profile kit"):
        profile_kit(tmp_path, progress=False)


def test_entries_whose_rounds_disagree_are_timed_again(kit, tmp_path):
    """With a zero tolerance no majority of round medians agrees, so every entry gets the extra rounds; with a
    generous one none does. Real timings either way; the latency stays the fastest of all runs."""
    from coformer.compiler.predictor import entry_latency_ms

    strict = profile_kit(kit, "dev", warmup_ms=5, iterations=5, duration_s=0.02, rounds=2, gap_iterations=0,
                         progress=False, extra_rounds=2, tolerance=0.0)
    assert all(len(e["round_medians_ms"]) == 4 for e in strict["entries"])
    st = strict["stability"]
    assert st["extra_rounds"] == 2 and st["entries_retimed"] == 3
    for e in strict["entries"]:
        assert entry_latency_ms(e) == e["latency_ms"]["min"] <= min(e["round_medians_ms"])
    lax = profile_kit(kit, "dev", warmup_ms=5, iterations=5, duration_s=0.02, rounds=2, gap_iterations=0,
                      progress=False, extra_rounds=2, tolerance=100.0)
    assert all(len(e["round_medians_ms"]) == 2 for e in lax["entries"])
    assert lax["stability"] == {"tolerance": 100.0, "within_tolerance_before": 1.0, "within_tolerance": 1.0,
                                "extra_rounds": 0, "entries_retimed": 0}


@pytest.mark.parametrize("rounds", [None, 2])
def test_runtime_cli_profiles_with_the_profilers_default_rounds(kit, tmp_path, rounds):
    """`coformer-runtime profile` without --rounds uses the profiler's DEFAULT_ROUNDS (one value,
    not a copy in the parser); with it, the count given."""
    import subprocess
    import sys

    from coformer.runtime.profile import DEFAULT_ROUNDS

    args = [sys.executable, "-m", "coformer.runtime.cli", "profile", str(kit), "--out", str(tmp_path / "d.json"),
            "--warmup", "5", "--iterations", "3", "--duration", "0.01", "--gap", "0", "--extra-rounds", "0",
            "--no-progress"] + ([] if rounds is None else ["--rounds", str(rounds)])
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    prof = json.loads((tmp_path / "d.json").read_text())
    want = DEFAULT_ROUNDS if rounds is None else rounds
    assert prof["rounds"] == want and all(len(e["round_medians_ms"]) == want for e in prof["entries"])
