import json

import numpy as np
import pytest

from coformer.runtime.errors import CoFormerError
from coformer.runtime.timing import benchmark_engine, summarise
from coformer.runtime.trtexec import load_trtexec_times


def test_statistics_on_a_planted_distribution():
    # 1..100 ms: median 50.5, p90 90.1, p99 99.01 (linear interpolation, numpy's default;
    # trtexec takes the nearest rank instead, which these statistics do not claim to match)
    s = summarise(list(range(1, 101)))
    assert s["count"] == 100 and s["median"] == 50.5 and s["mean"] == 50.5
    assert s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)
    assert (s["min"], s["max"]) == (1.0, 100.0)
    assert summarise([]) == {"count": 0}


def test_trtexec_export_times_are_read(tmp_path):
    records = [{"startEnqMs": 10.0 * i, "endEnqMs": 10.0 * i + 0.1, "startH2dMs": 10.0 * i,
                "endH2dMs": 10.0 * i + 0.5, "startComputeMs": 10.0 * i + 0.5, "endComputeMs": 10.0 * i + 2.5 + i,
                "startD2hMs": 10.0 * i + 2.5 + i, "endD2hMs": 10.0 * i + 2.75 + i, "latencyMs": 2.75 + i}
               for i in range(5)]
    f = tmp_path / "times.json"
    f.write_text(json.dumps(records))
    t = load_trtexec_times(f)
    assert t["compute_ms"]["median"] == pytest.approx(4.0)  # 2, 3, 4, 5, 6
    assert t["host_ms"]["median"] == pytest.approx(0.75)
    assert t["latency_ms"]["max"] == pytest.approx(6.75)
    assert t["iterations"] == 5
    f.write_text("[]")
    with pytest.raises(CoFormerError, match="non-empty JSON list"):
        load_trtexec_times(f)


def test_benchmark_runs_at_least_n_iterations_and_t_seconds(tmp_path):
    torch = pytest.importorskip("torch")
    from coformer.compiler.lower import export_onnx

    path = export_onnx(torch.nn.Linear(64, 64), [torch.zeros(1, 64)], tmp_path / "m.onnx", ["x"], ["y"])
    t = benchmark_engine(path, warmup_ms=20, iterations=50, duration_s=0.0)
    assert t.iterations == 50 and t.latency_ms["count"] == 50
    t = benchmark_engine(path, warmup_ms=0, iterations=1, duration_s=0.2)
    assert t.total_s >= 0.2 and t.iterations > 1
    assert t.compute_ms["median"] <= t.latency_ms["median"]
    assert t.environment["backend"] == "onnxruntime" and t.environment["threads"] == 1
    assert t.throughput_qps == pytest.approx(t.iterations / t.total_s)
    with pytest.raises(CoFormerError, match="iterations 0"):
        benchmark_engine(path, iterations=0)
    np.testing.assert_equal(json.loads(json.dumps(t.to_dict()))["iterations"], t.iterations)
