"""The emulated cluster on this host: real namespaces, tc token buckets and cgroups.

Each test's testbed has its own slot and state folder: a bench running on the host is left alone.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from coformer.compiler.specs import DeviceSpec
from coformer.runtime.errors import CoFormerError

pytestmark = pytest.mark.testbed


def _why_not() -> str:
    if os.geteuid() != 0:
        return "needs root for network namespaces, tc and cgroups"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "needs iproute2 (ip, tc)"
    from coformer.tools import testbed

    try:
        testbed.check_can_run()
    except CoFormerError as e:
        return str(e)
    return ""


if _why_not():
    pytest.skip(_why_not(), allow_module_level=True)

from coformer.tools import testbed  # noqa: E402

DEVICES = [
    DeviceSpec("hub", 1 << 30, 10**9, 1000.0, 1.0),
    DeviceSpec("slow", 1 << 30, 10**9, 4.0, 0.5),
    DeviceSpec("fast", 64 << 20, 10**9, 16.0, 0.5),
]

SERVER = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1); print("ready", flush=True)
    c, _ = s.accept(); n = 0; t0 = None
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        t0 = t0 or time.perf_counter(); n += len(b)
    print(n, time.perf_counter() - t0, flush=True)
""")
CLIENT = "import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2]))); " \
         "s.sendall(b'x' * int(sys.argv[3])); s.close()"
BURN = "import time; c = time.process_time(); t = time.perf_counter()\n" \
       "while time.process_time() - c < 0.25: pass\nprint(time.perf_counter() - t)"


@pytest.fixture
def bed(tmp_path, monkeypatch):
    monkeypatch.setattr(testbed, "STATE_DIR", tmp_path / "testbeds")
    b = testbed.up(DEVICES)
    yield b
    b.down()


def _transfer_s(bed, device, nbytes, port):
    server = bed.popen("hub", [sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        client = bed.run(device, [sys.executable, "-c", CLIENT, bed.central_address(device), str(port), str(nbytes)],
                         capture_output=True, text=True, timeout=60)
        assert client.returncode == 0, client.stderr
        received, seconds = server.communicate(timeout=60)[0].split()
    finally:
        server.kill()
    assert int(received) == nbytes
    return float(seconds)


def test_links_carry_data_at_their_rate(bed):
    # 200 KB at 4 Mbit/s takes at least 0.4 s; 400 KB at 16 Mbit/s at least 0.2 s. The bound is
    # one-sided: a shaped link can never be faster, while a busy machine only makes it slower (an
    # unshaped veth moves these bytes in milliseconds). The rate itself is docs/benchmarks.md's.
    for device, nbytes, mbit in (("slow", 200_000, 4.0), ("fast", 400_000, 16.0)):
        expected = nbytes * 8 / (mbit * 1e6)
        assert _transfer_s(bed, device, nbytes, 9100 + bed.device(device).index) >= 0.8 * expected


def test_cpu_share_and_memory_limit_are_enforced(bed):
    # 0.25 s of CPU work at half a core cannot finish in under 0.5 s of wall time (0.4: the quota of
    # the period it starts in may be whole). One-sided: another process busy on the machine only
    # makes it slower, and without the quota it takes 0.25 s.
    done = bed.run("slow", [sys.executable, "-c", BURN], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) >= 0.4
    pinned = bed.run("slow", [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                     capture_output=True, text=True)
    assert pinned.stdout.strip() == str(list(bed.device("slow").cores))
    # "fast" has 64 MiB: a process that touches 256 MiB is killed by the kernel, not left to hang
    hog = bed.run("fast", [sys.executable, "-c", "b = bytearray(256 << 20); print('survived')"],
                  capture_output=True, text=True, timeout=60)
    assert hog.returncode == -9 and "survived" not in hog.stdout


def test_down_leaves_nothing_even_with_processes_running_and_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setattr(testbed, "STATE_DIR", tmp_path / "testbeds")
    bed = testbed.up(DEVICES)
    assert len(testbed.leftovers(bed.slot)["namespaces"]) == 3 and testbed.status()["up"]
    orphan = bed.popen("slow", ["sleep", "300"])  # as if a bench was killed mid-run
    time.sleep(0.2)
    removed = bed.down()
    assert len(removed["namespaces"]) == 3
    assert testbed.leftovers(bed.slot) == {"namespaces": [], "links": [], "cgroups": []}
    assert orphan.wait(timeout=10) != 0  # killed by the teardown
    assert not testbed.status()["up"]
    bed.down()  # again: nothing to do, no error
    with pytest.raises(CoFormerError, match="no testbed is up"):
        testbed.load()


def test_two_testbeds_at_once_do_not_touch_each_other(tmp_path, monkeypatch):
    """Two benches (or a bench and this suite) each take a slot; taking one down leaves the
    other carrying data, and `coformer testbed down` leaves a live owner's testbed alone but
    clears one whose owner died."""
    monkeypatch.setattr(testbed, "STATE_DIR", tmp_path / "testbeds")
    first = testbed.up(DEVICES)
    second = testbed.up(DEVICES)
    try:
        assert first.slot != second.slot
        assert not set(d.namespace for d in first.devices) & set(d.namespace for d in second.devices)
        assert first.client_address != second.client_address
        assert testbed.load(second.slot).slot == second.slot
        with pytest.raises(CoFormerError, match="2 testbeds are up"):
            testbed.load()
        first.down()
        assert testbed.leftovers(first.slot) == {"namespaces": [], "links": [], "cgroups": []}
        assert _transfer_s(second, "slow", 100_000, 9150) >= 0.16  # still shaped (at least 0.2 s)
        # this process owns `second` and is alive: a plain `down` leaves it
        testbed.down()
        assert len(testbed.leftovers(second.slot)["namespaces"]) == 3
        # a testbed whose owner died without taking it down: `down` removes it, and so would `up`
        env = {**os.environ, "COFORMER_TESTBED_STATE": str(tmp_path / "testbeds")}
        code = ("import os; from coformer.compiler.specs import DeviceSpec as D; from coformer.tools import testbed as t;"
                " b = t.up([D('hub', 1 << 30, 10**9, 100.0, 1.0), D('w', 1 << 30, 10**9, 10.0, 0.5)]);"
                " print(b.slot, flush=True); os._exit(0)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        orphan = int(done.stdout)
        assert len(testbed.leftovers(orphan)["namespaces"]) == 2
        removed = testbed.down()
        assert sorted(removed["namespaces"]) == [f"cf-tb{orphan}-0", f"cf-tb{orphan}-1"]
        assert len(testbed.leftovers(second.slot)["namespaces"]) == 3
    finally:
        first.down()
        second.down()


def test_bad_device_names_are_refused_before_touching_the_host():
    with pytest.raises(CoFormerError, match="device name 'a b'"):
        testbed.plan([DeviceSpec("a b", 1 << 30, 10**9, 10.0, 1.0)])


def test_a_bundle_served_inside_the_testbed_answers_like_the_ensemble(tmp_path, monkeypatch):
    import numpy as np
    import torch

    from coformer.calibration.booster import BoostConfig
    from coformer.calibration.data import load_digits_dataset
    from coformer.compiler.pipeline import compile_bundle
    from coformer.tools.cluster import LocalCluster
    from tests.conftest import tiny_vit

    monkeypatch.setattr(testbed, "STATE_DIR", tmp_path / "testbeds")
    data = load_digits_dataset(size=16)
    result = compile_bundle(tiny_vit(num_heads=6), DEVICES, data, tmp_path / "bundle", boost=BoostConfig(epochs=0),
                            aggregator_epochs=1, progress=False)
    bed = testbed.up(DEVICES)
    try:
        with LocalCluster(result.bundle_dir, testbed=bed, timeout_s=5.0) as cluster:
            assert cluster.endpoints["front"].startswith(f"tcp://{bed.client_address}:")
            for name, proc in cluster.procs.items():  # every process in its own device
                assert bed.contains(name.split("-", 1)[1], proc.pid), name
            x = data.test.x[:4]
            with torch.no_grad():
                expected = result.aggregator(*[s(x) for s in result.submodels]).numpy()
            with cluster.client() as client:
                for i in range(len(x)):
                    np.testing.assert_allclose(client.infer(x[i: i + 1].numpy()).logits[0], expected[i], atol=1e-4)
    finally:
        bed.down()
