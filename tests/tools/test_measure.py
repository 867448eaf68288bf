"""The latency predicted for a policy served on this machine."""

import pytest

from coformer.compiler.specs import DeviceSpec
from coformer.runtime.errors import CoFormerError
from coformer.tools.measure import interpolate, predict_served_here, probe_layer_counts, served_compute_ms

DEVICES = [DeviceSpec("a", 1 << 30, 10**9, 1000.0, 1.0), DeviceSpec("b", 1 << 30, 10**9, 1000.0, 0.6),
           DeviceSpec("c", 1 << 30, 10**9, 1000.0, 0.4)]
# as a served measurement records them (served["placements"])
SHARED = {"a": {"cores": [0], "cpu_share": 1.0}, "b": {"cores": [1], "cpu_share": 0.6},
          "c": {"cores": [1], "cpu_share": 0.4}}
APART = {d.name: {"cores": [i], "cpu_share": d.cpu_share} for i, d in enumerate(DEVICES)}


def test_devices_sharing_a_core_carry_their_neighbours_compute():
    out = served_compute_ms([1.0, 2.0, 1.5], 0.1, DEVICES, SHARED)
    # b waits for what c computes (1.5 ms at 0.4 of the core: 0.6 ms of it), c for b's 1.2 ms
    assert out["colocated"] == pytest.approx([0.0, 0.6, 1.2])
    assert out["slowest_device"] == "c"
    assert out["compute_ms"] == pytest.approx(1.5 + 1.2 + 0.1)
    # each device on a core of its own: eq. 3's max
    apart = served_compute_ms([1.0, 2.0, 1.5], 0.1, DEVICES, APART)
    assert apart["compute_ms"] == pytest.approx(2.1) and apart["slowest_device"] == "b"


def test_interpolation_is_piecewise_linear_and_extends_its_ends():
    pts = [(4.0, 10.0), (0.0, 1.0), (1.0, 2.0), (1.0, 4.0)]  # unsorted; two at x=1 (mean 3)
    assert interpolate(0.5, pts) == pytest.approx(2.0)
    assert interpolate(2.5, pts) == pytest.approx(3.0 + 1.5 * 7.0 / 3.0)
    assert interpolate(6.0, pts) == pytest.approx(10.0 + 2.0 * 7.0 / 3.0)  # beyond: the last segment
    assert interpolate(-1.0, pts) == pytest.approx(-1.0)  # before: the first
    assert interpolate(3.0, [(1.0, 2.0)]) == pytest.approx(4.0)
    with pytest.raises(CoFormerError, match="no points"):
        interpolate(1.0, [])


def _probes(served_device, runtime, sizes):
    """Probes measured on a planted machine: device n serves t1 as served_device(n, t1);
    the round trip is runtime(C) of the critical path's served compute C."""
    probes = {}
    for name, t1 in sizes.items():
        dev = [served_device(n, t) for n, t in enumerate(t1)]
        c = served_compute_ms(dev, 0.01, DEVICES, SHARED)["compute_ms"]
        probes[name] = {"t1_ms": t1, "t3_ms": 0.01, "device_ms": dev, "measured_ms": runtime(c)}
    return probes


def test_prediction_recovers_a_machine_that_is_piecewise_linear_in_the_probes():
    # served compute: a fixed cost per request over the share, then 1.5x up to 1 ms and 1.1x beyond
    def dev(n, t):
        base = 0.05 / DEVICES[n].cpu_share
        return base + (1.5 * t if t <= 1.0 else 1.5 + 1.1 * (t - 1.0))

    def rt(c):  # the round trip: 1 ms of runtime, the compute, and runtime that grows with it
        return 1.0 + c + 0.3 * c

    sizes = {"small": [0.02, 0.04, 0.05], "uniform-l1": [1.0, 1.0, 1.0], "uniform": [4.0, 5.0, 6.0]}
    probes = _probes(dev, rt, sizes)
    t1 = [0.5, 0.8, 0.3]
    out = predict_served_here(t1, 0.01, DEVICES, SHARED, probes)
    # every device lies between two probes on a straight stretch of the law: recovered exactly
    terms = out["terms_ms"]
    assert terms["t1_served"] == pytest.approx([dev(n, t) for n, t in enumerate(t1)])
    assert terms["t1"] == t1 and set(terms["probes"]) == set(sizes)
    truth = rt(served_compute_ms([dev(n, t) for n, t in enumerate(t1)], 0.01, DEVICES, SHARED)["compute_ms"])
    assert out["predicted_ms"] == pytest.approx(truth)
    # the uncalibrated prediction (runtime + predicted compute) misses this machine by far more
    plain = 1.0 + served_compute_ms(t1, 0.01, DEVICES, SHARED)["compute_ms"]
    assert abs(plain / truth - 1) > 0.2
    # a policy equal to a probe is predicted at that probe's measurement
    assert predict_served_here(sizes["uniform-l1"], 0.01, DEVICES, SHARED, probes)["predicted_ms"] == \
        pytest.approx(probes["uniform-l1"]["measured_ms"])


def test_no_probes_is_an_error():
    with pytest.raises(CoFormerError, match="no probe measurements"):
        predict_served_here([1.0, 1.0, 1.0], 0.0, DEVICES, APART, {})


def test_probe_ladder_doubles_layers_and_ends_at_the_teacher():
    assert probe_layer_counts(7) == [1, 2, 4, 7]
    assert probe_layer_counts(12) == [1, 2, 4, 8, 12]
    assert probe_layer_counts(8) == [1, 2, 4, 8]
    assert probe_layer_counts(1) == [1]


def test_served_bench_names_a_directory_that_is_not_a_quickstart_output(tmp_path, capsys):
    from coformer.tools.served_bench import main

    (tmp_path / "profiles").mkdir()  # a bundle is missing
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "bundle" / "manifest.json") in err and "not a quickstart output" in err
    assert main([str(tmp_path), "--repeats", "0"]) == 2
    assert "--repeats 0" in capsys.readouterr().err
