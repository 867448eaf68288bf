"""The one serving-and-measuring loop (coformer.tools.served): real bundles, processes and sockets."""

import json
import shutil

import numpy as np
import pytest
import torch

from coformer.calibration.booster import BoostConfig
from coformer.calibration.data import load_digits_dataset
from coformer.compiler.pipeline import compile_bundle
from coformer.compiler.specs import DeviceSpec
from coformer.runtime.errors import CoFormerError
from coformer.tools.served import measure_bundles, passes_for
from tests.conftest import tiny_vit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("served") / "bundle"
    data = load_digits_dataset(size=16)
    devices = [DeviceSpec(name=n, memory_bytes=1 << 30, flops_budget=10**10, cpu_share=s)
               for n, s in (("edge-a", 1.0), ("edge-b", 0.5))]
    result = compile_bundle(tiny_vit(), devices, data, out, boost=BoostConfig(epochs=1), aggregator_epochs=3,
                            progress=False)
    x = data.test.x[:24]
    with torch.no_grad():
        expected = result.aggregator(*[s(x) for s in result.submodels]).argmax(-1).numpy()
    return result, x.numpy(), data.test.y[:24].numpy(), expected


def test_side_by_side_every_sample_once_to_every_bundle_with_the_served_answers(compiled, tmp_path):
    result, x, y, expected = compiled
    copy = tmp_path / "copy"
    shutil.copytree(result.bundle_dir, copy)
    out = measure_bundles({"a": result.bundle_dir, "b": copy}, x, warmup=2, throttle="none",
                          log_dir=tmp_path / "logs")
    assert set(out) == {"a", "b"}
    for name, m in out.items():
        s = m.summary(y)
        assert m.ok and m.status == "ok" and s["samples"] == len(x) and s["passes"] == passes_for(len(x)) == 2
        assert s["indices"].tolist() == list(range(len(x)))
        assert s["predictions"].tolist() == expected.tolist()  # sorted back into the inputs' order
        assert s["accuracy"] == pytest.approx(float(np.mean(expected == y)))
        assert s["latency_ms"]["count"] == len(x) and 0 < s["latency_ms"]["min"] <= s["latency_ms"]["median"]
        assert set(s["breakdown_ms"]) == {"compute", "transfer", "aggregation", "other"}
        assert s["breakdown_ms"]["compute"] > 0 and "worker_compute.edge-b" in s["breakdown_ms_median"]
        # the image goes to the worker (one 16x16 float32 and a header); its features come back
        assert 4 * 16 * 16 < s["bytes_to_devices"] < 4 * 16 * 16 + 400
        feature = 4 * result.manifest.workers[0].feature_dim
        assert feature < s["bytes_from_devices"] < feature + 400
        # medians of the sum and sum of the medians: headers vary by a digit or two
        assert s["bytes_per_inference"] == pytest.approx(s["bytes_to_devices"] + s["bytes_from_devices"], abs=8)
        assert set(s["placements"]) == {"edge-a", "edge-b"}
        assert (tmp_path / "logs" / name).is_dir()


def test_alone_in_passes_with_local_inputs_and_a_hook_before_it_stops(compiled, tmp_path):
    result, x, y, expected = compiled
    np.save(tmp_path / "x.npy", x)
    seen = []

    def after(name, client):
        seen.append(name)
        return client.infer(x[:1]).label_index

    turns = []
    out = measure_bundles({"local": result.bundle_dir, "sent": result.bundle_dir}, x, indices=range(3, 15),
                          passes=3, alone=True, warmup=1, throttle="none",
                          local_inputs={"local": tmp_path / "x.npy"}, on_turn=lambda *a: turns.append(a), after=after)
    assert turns == [(n, p, 3) for p in range(3) for n in ("local", "sent")]
    assert seen == ["local", "sent"] and out["local"].after == [int(expected[0])]
    local, sent = out["local"].summary(), out["sent"].summary()
    for s in (local, sent):
        assert s["passes"] == 3 and s["indices"].tolist() == list(range(3, 15))
        assert s["predictions"].tolist() == expected[3:15].tolist()
    assert local["bytes_to_devices"] < 300 < 4 * 16 * 16 < sent["bytes_to_devices"]  # an index, not the image


def test_throughput_under_concurrent_clients_counts_every_answer_and_checks_it(compiled, tmp_path):
    result, x, _, expected = compiled
    np.save(tmp_path / "x.npy", x)
    out = measure_bundles({"local": result.bundle_dir, "sent": result.bundle_dir}, x, passes=2, alone=True,
                          warmup=1, throttle="none", local_inputs={"local": tmp_path / "x.npy"},
                          throughput=(1, 4), throughput_s=1.0)
    for m in out.values():
        t = m.summary()["throughput"]
        assert set(t) == {"1", "4"}
        for k, v in t.items():
            assert v["clients"] == int(k) and v["errors"] == 0 and v["mismatched"] == 0
            assert v["answers"] >= int(k)  # every client answered inside the window
            assert 1.0 <= v["seconds"] < 5.0 and v["answers_per_s"] == pytest.approx(v["answers"] / v["seconds"])
            assert 0 < v["p50_ms"] <= v["p99_ms"]
    with pytest.raises(CoFormerError, match="throughput clients"):
        measure_bundles({"b": result.bundle_dir}, x, throughput=(0,))


def test_a_time_budget_stops_each_turn_after_its_share_of_the_minimum(compiled):
    result, x, _, _ = compiled
    out = measure_bundles({"b": result.bundle_dir}, x, passes=2, alone=True, warmup=0, throttle="none",
                          max_seconds=1e-6, min_samples=4)
    assert out["b"].summary()["samples"] == 4  # 2 a turn: the budget is spent, the minimum is kept


def test_more_passes_than_samples_runs_one_pass_a_sample_and_still_calls_the_hook(compiled):
    result, x, _, expected = compiled
    out = measure_bundles({"b": result.bundle_dir}, x[:2], passes=5, alone=True, warmup=0, throttle="none",
                          after=lambda name, client: name)
    assert out["b"].passes == 2 and out["b"].after == "b"
    assert out["b"].summary()["predictions"].tolist() == expected[:2].tolist()


def test_a_broken_bundle_is_recorded_and_the_others_go_on_or_it_raises(compiled, tmp_path):
    result, x, _, expected = compiled
    broken = tmp_path / "broken"
    shutil.copytree(result.bundle_dir, broken)
    m = json.loads((broken / "manifest.json").read_text())
    (broken / m["devices"][1]["artifact"]).write_bytes(b"not an onnx model")
    bundles = {"good": result.bundle_dir, "broken": broken}
    out = measure_bundles(bundles, x[:6], passes=2, alone=True, warmup=0, throttle="none", keep_going=True)
    assert out["good"].ok and out["good"].summary()["predictions"].tolist() == expected[:6].tolist()
    assert not out["broken"].ok and out["broken"].status == "failed" and out["broken"].passes == 0
    assert m["devices"][1]["artifact"] in out["broken"].error and "SHA-256" in out["broken"].error
    with pytest.raises(CoFormerError, match="no request was measured"):
        out["broken"].summary()
    with pytest.raises(CoFormerError):
        measure_bundles(bundles, x[:6], alone=True, warmup=0, throttle="none")


def test_bad_arguments_are_named():
    with pytest.raises(CoFormerError, match="nothing to measure"):
        measure_bundles({}, np.zeros((2, 1, 16, 16), np.float32))
    with pytest.raises(CoFormerError, match="passes -1"):
        measure_bundles({"b": "x"}, np.zeros((2, 1, 16, 16), np.float32), passes=-1)
    with pytest.raises(CoFormerError, match="alone=True"):
        measure_bundles({"b": "x"}, np.zeros((2, 1, 16, 16), np.float32), bed=object())
