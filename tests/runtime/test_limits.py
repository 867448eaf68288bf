import os
import time

import pytest

from coformer.runtime.errors import CoFormerError
from coformer.runtime.limits import DeviceLimits, Throttle, parse_cores


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


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to tell a pinned thread from a free one")
def test_threads_started_before_the_limits_are_pinned_too():
    """ZeroMQ starts its I/O thread when the first socket is made, before a central node
    applies its device's limits; that thread's messages are the device's work too."""
    import subprocess
    import sys

    code = ("import os, zmq; from coformer.runtime.limits import DeviceLimits, apply_limits\n"
            "ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind_to_random_port('tcp://127.0.0.1')\n"
            "apply_limits(DeviceLimits(cpu_affinity=(1,), mode='none'), 'test')\n"
            "for t in sorted(os.listdir('/proc/self/task')):\n"
            "    name = open(f'/proc/self/task/{t}/comm').read().strip()\n"
            "    print(name.replace(' ', '_'), sorted(os.sched_getaffinity(int(t))))\n"
            "s.close(0); ctx.term()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    threads = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert any(name.startswith("ZMQbg") for name in threads), out
    assert set(threads.values()) == {"[1]"}, out


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


def test_time_queued_behind_a_neighbour_counts_as_device_time():
    t = Throttle(DeviceLimits(cpu_share=0.25), "duty-cycle")
    # 4 ms of CPU at a quarter of a core is 16 ms of device time; 5 ms of it were spent
    # waiting for the core after the request arrived, 4 ms computing: 7 ms are left to idle
    assert t.after_compute(0.004, cpu_s=0.004, sleep=False, queued_s=0.005) == pytest.approx(0.007)
    assert t.after_compute(0.004, cpu_s=0.004, sleep=False, queued_s=0.020) == 0.0


def test_two_devices_woken_together_on_one_core_report_their_queueing():
    """Two emulated devices on one core get a request at the same moment (as the central
    node's two workers do): each waits while the other computes, and says so."""
    import subprocess
    import sys

    from coformer.runtime.limits import run_delay_s

    if run_delay_s() is None:
        pytest.skip("this kernel keeps no per-thread run delay (/proc/thread-self/schedstat)")
    core = max(os.sched_getaffinity(0))
    code = ("import sys, time; from coformer.runtime.limits import DeviceLimits, apply_limits\n"
            f"t = apply_limits(DeviceLimits(cpu_share=0.5, cpu_affinity=({core},), mode='duty-cycle'), 'q')\n"
            "for _ in range(5):\n"
            "    t.waiting(); sys.stdin.readline()\n"
            "    c0 = time.process_time()\n"
            "    while time.process_time() - c0 < 0.003: pass\n"  # 3 ms of compute
            "    print(t.queued_s(), flush=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    queued: list[list[float]] = [[], []]
    try:
        time.sleep(1.0)  # both started and waiting
        for _ in range(5):
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            for q, p in zip(queued, procs):
                q.append(float(p.stdout.readline()))
            time.sleep(0.05)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    # while one computes the other waits: together at least one compute's 3 ms a request (the
    # scheduler may also slice them, then each waits for the other's 3 ms)
    total = sorted(a + b for a, b in zip(*queued))[2]
    assert 1e-3 < total < 0.02, queued
