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


def test_trtexec_percentiles_and_median_match_its_own_definitions():
    """Hand-computed from trtexec's findPercentile / findMedian (samples/common/sampleReporting.cpp):
    exclude = int((1 - p/100) * n) in float32, value = sorted[max(n - 1 - exclude, 0)]."""
    from coformer.runtime.trtexec import trtexec_median, trtexec_percentile

    hundred = list(range(100, 0, -1))  # 1..100 ms, unsorted
    # p99 of 100: (1 - 0.99f) * 100 = 0.99999905 -> 0 excluded -> the largest (numpy interpolates: 99.01)
    assert trtexec_percentile(hundred, 99) == 100.0 and np.percentile(hundred, 99) == pytest.approx(99.01)
    assert trtexec_percentile(hundred, 95) == 95.0   # (1 - 0.95f) * 100 = 5.0000012 -> 5 -> sorted[94]
    assert trtexec_percentile(hundred, 90) == 90.0   # 10.000002 -> 10 -> sorted[89]
    assert trtexec_percentile([3.0, 1.0, 2.0], 50) == 2.0  # int(0.5 * 3) = 1 -> sorted[1]
    assert trtexec_percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0  # int(2.0) = 2 -> sorted[1]
    assert trtexec_percentile([5.0], 0) == 5.0 and trtexec_percentile([1.0, 9.0], 100) == 9.0
    assert trtexec_median([4.0, 1.0, 3.0, 2.0]) == 2.5 and trtexec_median([3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(CoFormerError, match="percentile 101"):
        trtexec_percentile([1.0], 101)


def test_a_trace_is_summarised_in_trtexec_words_and_round_trips_through_export_times(tmp_path):
    from coformer.runtime.trtexec import format_summary, trace_summary, write_export_times

    # four queries: H2D 0.1 ms, compute 1/2/3/4 ms, D2H 0.2 ms, back to back from t = 0
    trace, t = [], 0.0
    for c in (1.0, 2.0, 3.0, 4.0):
        trace.append({"startEnqMs": t, "endEnqMs": t + 0.05, "startH2dMs": t, "endH2dMs": t + 0.1,
                      "startComputeMs": t + 0.1, "endComputeMs": t + 0.1 + c, "startD2hMs": t + 0.1 + c,
                      "endD2hMs": t + 0.3 + c})
        t += 0.3 + c
    s = trace_summary(trace)
    assert s["queries"] == 4 and s["Total Host Walltime"] == pytest.approx(t / 1000)
    assert s["Throughput"] == pytest.approx(4 / t * 1000)
    assert s["GPU Compute Time"]["median"] == pytest.approx(2.5) and s["GPU Compute Time"]["mean"] == pytest.approx(2.5)
    assert s["GPU Compute Time"]["percentiles"]["99"] == pytest.approx(4.0)
    assert s["Latency"]["min"] == pytest.approx(1.3) and s["H2D Latency"]["max"] == pytest.approx(0.1)
    assert s["D2H Latency"]["median"] == pytest.approx(0.2) and s["Enqueue Time"]["mean"] == pytest.approx(0.05)
    assert s["Total GPU Compute Time"] == pytest.approx(0.010)
    text = format_summary(s)
    assert "=== Performance summary ===" in text and "GPU Compute Time: min = 1 ms" in text
    path = write_export_times(trace, tmp_path / "times.json")
    records = json.loads(path.read_text())
    assert list(records[0]) == ["startEnqMs", "endEnqMs", "startH2dMs", "endH2dMs", "startComputeMs", "endComputeMs",
                                "startD2hMs", "endD2hMs", "h2dMs", "computeMs", "d2hMs", "latencyMs"]
    assert records[3]["computeMs"] == pytest.approx(4.0) and records[0]["latencyMs"] == pytest.approx(1.3)
    back = load_trtexec_times(path)  # what `coformer-runtime profile --trtexec` imports
    assert back["compute_ms"]["max"] == pytest.approx(4.0) and back["iterations"] == 4
    assert back["throughput_qps"] == pytest.approx(s["Throughput"])
    with pytest.raises(CoFormerError, match="lacks"):
        trace_summary([{"startEnqMs": 0.0}])


def test_the_benchmark_keeps_a_trtexec_trace_on_onnx_runtime_cpu(tmp_path):
    torch = pytest.importorskip("torch")
    from coformer.compiler.lower import export_onnx
    from coformer.runtime.trtexec import write_export_times

    path = export_onnx(torch.nn.Linear(64, 64), [torch.zeros(1, 64)], tmp_path / "m.onnx", ["x"], ["y"])
    t = benchmark_engine(path, warmup_ms=5, iterations=30, duration_s=0.0, keep_trace=True)
    assert len(t.trace) == 30
    s = t.trtexec
    assert s["queries"] == 30 and s["H2D Latency"]["max"] == 0.0 and s["D2H Latency"]["max"] == 0.0
    assert s["GPU Compute Time"]["median"] > 0 and s["Throughput"] > 0
    back = load_trtexec_times(write_export_times(t.trace, tmp_path / "t.json"))
    assert back["compute_ms"]["median"] == pytest.approx(np.median([r["endComputeMs"] - r["startComputeMs"]
                                                                    for r in t.trace]))
    with pytest.raises(CoFormerError, match="keep_trace"):
        benchmark_engine(path, warmup_ms=0, iterations=2, duration_s=0.0).trtexec


def test_the_python_api_benchmarks_an_onnx_file_in_trtexec_words(tmp_path):
    torch = pytest.importorskip("torch")
    import coformer.runtime
    from coformer.compiler.lower import export_onnx

    path = export_onnx(torch.nn.Linear(32, 8), [torch.zeros(1, 32)], tmp_path / "m.onnx", ["x"], ["y"])
    s = coformer.runtime.benchmark_engine(path, backend="onnxruntime", warmup_ms=5, duration_s=0.05, iterations=20,
                                          export_times=tmp_path / "times.json")
    assert s["iterations"] >= 20 and s["backend"] == "onnxruntime" and s["Throughput"] > 0
    assert {"Latency", "Enqueue Time", "H2D Latency", "GPU Compute Time", "D2H Latency"} <= set(s)
    assert set(s["GPU Compute Time"]["percentiles"]) == {"90", "95", "99"}
    assert len(json.loads((tmp_path / "times.json").read_text())) == s["iterations"]
    with pytest.raises(CoFormerError, match="'cuda'"):
        coformer.runtime.benchmark_engine(path, backend="cuda")


def test_a_lone_onnxs_dynamic_axes_are_filled_as_its_engine_profile_is():
    """The benchmark feeds and the TensorRT profile of a lone ONNX follow one rule: the first
    dynamic axis is the batch, any other (a text model's sequence) 1. Before, the benchmark fed
    a text model [batch, batch] while its engine was built for [batch, 1]."""
    from coformer.runtime.timing import lone_shape, random_inputs

    assert lone_shape([None, None], 8) == [8, 1]
    assert lone_shape([None, 3, 16, 16], 4) == [4, 3, 16, 16]
    text = type("E", (), {"input_specs": lambda self: [("input_ids", (None, None), np.int64),
                                                       ("attention_mask", (None, None), np.int64)]})()
    feeds = random_inputs(text, batch=8)
    assert {k: v.shape for k, v in feeds.items()} == {"input_ids": (8, 1), "attention_mask": (8, 1)}
