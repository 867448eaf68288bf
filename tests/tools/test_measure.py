"""The latency predicted for a policy served on this machine."""

import pytest

from coformer.compiler.specs import DeviceSpec
from coformer.tools.measure import predict_served_here


def test_devices_sharing_a_core_carry_their_neighbours_compute():
    devices = [DeviceSpec("a", 1 << 30, 10**9, 1000.0, 1.0), DeviceSpec("b", 1 << 30, 10**9, 1000.0, 0.6),
               DeviceSpec("c", 1 << 30, 10**9, 1000.0, 0.4)]
    # as a served measurement records them (served["placements"])
    placements = {"a": {"cores": [0], "cpu_share": 1.0}, "b": {"cores": [1], "cpu_share": 0.6},
                  "c": {"cores": [1], "cpu_share": 0.4}}
    out = predict_served_here([1.0, 2.0, 1.5], 0.1, devices, placements, overhead_ms=2.0)
    terms = out["terms_ms"]
    # b waits for what c computes (1.5 ms at 0.4 of the core: 0.6 ms of it), c for b's 1.2 ms
    assert terms["colocated"] == pytest.approx([0.0, 0.6, 1.2])
    assert terms["slowest_device"] == "c"
    assert out["predicted_ms"] == pytest.approx(2.0 + 1.5 + 1.2 + 0.1)
    # each device on a core of its own: eq. 3's max plus the runtime's cost
    apart = {d.name: {"cores": [i], "cpu_share": d.cpu_share} for i, d in enumerate(devices)}
    assert predict_served_here([1.0, 2.0, 1.5], 0.1, devices, apart, 2.0)["predicted_ms"] == pytest.approx(4.1)
