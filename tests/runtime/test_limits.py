import os

import pytest

from coformer.runtime.errors import CoFormerError
from coformer.runtime.limits import DeviceLimits, Throttle, apply_limits, parse_cores


def test_duty_cycle_idles_so_work_runs_at_the_share():
    t = Throttle(DeviceLimits(cpu_share=0.25), "duty-cycle")
    assert t.after_compute(0.004) == pytest.approx(0.012)
    # CPU time counts, not wall time: contention from a neighbour is not charged twice
    assert t.after_compute(0.010, cpu_s=0.004) == pytest.approx(0.006)
    assert t.after_compute(0.020, cpu_s=0.004) == 0.0
    assert Throttle(DeviceLimits(cpu_share=1.0), "duty-cycle").after_compute(0.01) == 0.0


def test_bad_limits_are_named():
    with pytest.raises(CoFormerError, match="cpu_share 1.5"):
        DeviceLimits(cpu_share=1.5)
    with pytest.raises(CoFormerError, match="cores must be in"):
        DeviceLimits(cpu_affinity=(999,))
    with pytest.raises(CoFormerError, match="'x,y'"):
        parse_cores("x,y")
    assert parse_cores("0-2,5") == (0, 1, 2, 5)


def test_affinity_is_applied_in_a_child(tmp_path):
    import subprocess
    import sys

    code = ("import os; from coformer.runtime.limits import DeviceLimits, apply_limits; "
            "t = apply_limits(DeviceLimits(cpu_share=0.5, cpu_affinity=(0,), mode='duty-cycle'), 'test'); "
            "print(sorted(os.sched_getaffinity(0)), t.mode)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[0]", "duty-cycle"]


@pytest.mark.testbed
@pytest.mark.skipif(os.geteuid() != 0, reason="cgroup quotas need root")
def test_cgroup_quota_is_created_and_removed():
    import subprocess
    import sys

    code = ("from coformer.runtime.limits import DeviceLimits, apply_limits; "
            "t = apply_limits(DeviceLimits(cpu_share=0.3, mode='cgroup'), 'quota-test'); "
            "g = t.cgroup; print(g); t.release(); print(g.exists())")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    except subprocess.CalledProcessError as e:
        pytest.skip(f"no writable cgroup cpu controller here: {e.stderr.strip()[-200:]}")
    assert "coformer" in out[0] and out[1] == "False"
