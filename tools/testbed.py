"""A heterogeneous cluster emulated on one Linux host: ``coformer testbed up|down|status``.

Per device (the first one in the devices file is the central node):

* a network namespace ``cf-tb-<i>``; every other device's namespace is joined to
  the central node's by a veth pair (``10.87.<i>.1`` on the central side,
  ``10.87.<i>.2`` on the device's), shaped on both ends by a token bucket
  (``tc ... tbf``) at the device's ``link_mbit_s``;
* an unshaped veth from this (root) namespace to the central node's
  (``10.87.0.1`` here, ``10.87.0.2`` there), for clients;
* cgroups (v1 ``cpu``, ``cpuset``, ``memory`` controllers, or the v2 unified
  hierarchy): its cores (the central node alone on core 0, the others packed by
  share, as the local cluster does), a CFS quota of ``cpu_share`` of a core with
  a short period (1 ms of quota per period, the kernel's minimum, so a burst is
  cut within about a millisecond), and ``memory_bytes`` as a hard memory limit
  (the whole process: runtime, engine, weights, activations).

Processes run inside a device with :meth:`Testbed.popen` or ``coformer testbed
exec DEVICE -- CMD``: they join the device's cgroups, then enter its namespace.

``down`` removes everything a testbed made, found by name rather than from a
record, so it also cleans up after a crash and is safe to run twice: processes
in the testbed's cgroups and namespaces are killed, namespaces (and with them
their veth ends) deleted, cgroups removed, the state file deleted.

Link delay would need the ``netem`` qdisc, which this host's kernel lacks
(``CONFIG_NET_SCH_NETEM`` is not set); a link delay is refused with that
reason where netem is missing. A token bucket also lets a packet through an
idle link at once: bulk transfers take size / rate, but the first packet of
a message skips its serialisation (with a 1500-byte MTU a lone 1 KB message
crossed a "2 Mbit/s" link in 0.3 ms instead of 4 ms). Links below 10 Mbit/s
therefore get a 576-byte MTU, which bounds the unpaced part to one small
packet per message (2.4 ms at 2 Mbit/s; see :func:`link_mtu`). Only netem's
``rate`` models serialisation exactly; until then, small-message latencies
on slow links stay slightly optimistic. Needs root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from coformer.runtime.files import atomic_write_json
from coformer.runtime.errors import CoFormerError
from coformer.runtime.limits import cfs_quota, cores_text

NS_PREFIX = "cf-tb-"
VETH_PREFIX = "cftb"
CGROUP_NAME = "coformer-testbed"
STATE_PATH = Path(os.environ.get("COFORMER_TESTBED_STATE", "/run/coformer-testbed.json"))
CGROUP_V1 = Path("/sys/fs/cgroup")
CLIENT_NET = "10.87.0"  # .1 here (the root namespace), .2 the central node: where clients connect


@dataclass(frozen=True)
class TestbedDevice:
    """One emulated device as set up."""

    __test__ = False  # not a pytest class

    index: int
    name: str
    namespace: str
    address: str  # its address as the others see it (the central node: on every link)
    link_mbit_s: Optional[float]  # None for the central node
    cores: tuple[int, ...]
    cpu_share: float
    memory_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "namespace": self.namespace, "address": self.address,
                "link_mbit_s": self.link_mbit_s, "cores": list(self.cores), "cpu_share": self.cpu_share,
                "memory_bytes": self.memory_bytes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TestbedDevice":
        return cls(d["index"], d["name"], d["namespace"], d["address"], d["link_mbit_s"], tuple(d["cores"]),
                   d["cpu_share"], d["memory_bytes"])


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise CoFormerError(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def check_can_run() -> None:
    """Raise with the reason when this host cannot hold a testbed."""
    if os.geteuid() != 0:
        raise CoFormerError("the testbed needs root (network namespaces, tc and cgroups); run it with sudo")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise CoFormerError(f"the testbed needs `{tool}` (iproute2), which is not installed")
    if _cgroup_layout() is None:
        raise CoFormerError("the testbed needs the cpu, cpuset and memory cgroup controllers; none are mounted")


def _cgroup_layout() -> Optional[str]:
    if all((CGROUP_V1 / c).is_dir() for c in ("cpu", "cpuset", "memory")) and (
            CGROUP_V1 / "cpu" / "cpu.cfs_quota_us").exists():
        return "v1"
    controllers = CGROUP_V1 / "cgroup.controllers"
    if controllers.exists() and {"cpu", "cpuset", "memory"} <= set(controllers.read_text().split()):
        return "v2"
    return None


def _cgroup_dirs(device: Optional[str] = None) -> list[Path]:
    """The testbed's cgroup folders (one per controller in v1), or one device's."""
    layout = _cgroup_layout()
    bases = ([CGROUP_V1 / c / CGROUP_NAME for c in ("cpu", "cpuset", "memory")] if layout == "v1"
             else [CGROUP_V1 / CGROUP_NAME] if layout == "v2" else [])
    return bases if device is None else [b / device for b in bases]


def _safe(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise CoFormerError(f"device name {name!r}: the testbed needs letters, digits, '_', '.' or '-' (<= 64)")
    return name


def _netem_available() -> bool:
    probe = f"{VETH_PREFIX}probe"
    if _run("ip", "link", "add", probe, "type", "dummy", check=False).returncode != 0:
        return False
    try:
        return _run("tc", "qdisc", "add", "dev", probe, "root", "netem", "delay", "1ms", check=False).returncode == 0
    finally:
        _run("ip", "link", "del", probe, check=False)


SLOW_LINK_MBIT_S = 10.0
SLOW_LINK_MTU = 576  # the IPv4 minimum every host accepts; the historic MTU of slow serial links


def link_mtu(mbit_s: float) -> int:
    """The MTU of a testbed link: 576 bytes below 10 Mbit/s, else Ethernet's 1500.

    A token bucket sends a packet at once while it holds enough tokens, so after
    an idle moment one packet crosses unpaced: up to 1500 bytes, 6 ms of
    serialisation at 2 Mbit/s. Smaller packets on slow links bound that to
    one 576-byte packet (2.4 ms at 2 Mbit/s) per message.
    """
    return SLOW_LINK_MTU if mbit_s < SLOW_LINK_MBIT_S else 1500


def link_burst(mbit_s: float) -> int:
    """The token bucket's size: one frame (MTU + 14 bytes of Ethernet header), or 2 ms at the rate if larger."""
    return max(link_mtu(mbit_s) + 14, int(mbit_s * 1e6 / 8 * 0.002))


def _shape(namespace: Optional[str], dev: str, mbit_s: float, delay_ms: float) -> None:
    """Token bucket at ``mbit_s`` with the MTU and burst of :func:`link_mtu` / :func:`link_burst`."""
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    rate = f"{mbit_s * 1000:.0f}kbit"
    burst = link_burst(mbit_s)
    _run(*prefix, "ip", "link", "set", dev, "mtu", str(link_mtu(mbit_s)))
    if delay_ms:
        _run(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "netem", "delay",
             f"{delay_ms}ms")
        _run(*prefix, "tc", "qdisc", "replace", "dev", dev, "parent", "1:1", "handle", "10:", "tbf", "rate", rate,
             "burst", str(burst), "latency", "1s")
    else:
        _run(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", str(burst),
             "latency", "1s")


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise CoFormerError(f"cannot write {value!r} to {path}: {e.strerror}") from None


def _make_cgroups(dev: TestbedDevice) -> None:
    layout = _cgroup_layout()
    quota, period = cfs_quota(dev.cpu_share)
    cores = cores_text(dev.cores)
    if layout == "v1":
        cpu, cpuset, memory = _cgroup_dirs(dev.name)
        for d in (cpu, cpuset, memory):
            d.mkdir(parents=True, exist_ok=True)
        for level in (cpuset.parent, cpuset):  # a v1 cpuset must name its cpus and mems before use
            _write(level / "cpuset.cpus", (CGROUP_V1 / "cpuset" / "cpuset.cpus").read_text().strip()
                   if level == cpuset.parent else cores)
            _write(level / "cpuset.mems", (CGROUP_V1 / "cpuset" / "cpuset.mems").read_text().strip())
        if dev.cpu_share < 1.0:
            _write(cpu / "cpu.cfs_period_us", str(period))
            _write(cpu / "cpu.cfs_quota_us", str(quota))
        _write(memory / "memory.limit_in_bytes", str(dev.memory_bytes))
        if (memory / "memory.memsw.limit_in_bytes").exists():  # no escaping into swap either
            _write(memory / "memory.memsw.limit_in_bytes", str(dev.memory_bytes))
    else:
        base = _cgroup_dirs()[0]
        base.mkdir(exist_ok=True)
        _write(CGROUP_V1 / "cgroup.subtree_control", "+cpu +cpuset +memory")
        _write(base / "cgroup.subtree_control", "+cpu +cpuset +memory")
        group = base / dev.name
        group.mkdir(exist_ok=True)
        _write(group / "cpuset.cpus", cores)
        if dev.cpu_share < 1.0:
            _write(group / "cpu.max", f"{quota} {period}")
        _write(group / "memory.max", str(dev.memory_bytes))
        _write(group / "memory.swap.max", "0")


def join_cgroups(device: str, pid: int = 0) -> None:
    """Move process ``pid`` (0: this one) into ``device``'s cgroups."""
    pid = pid or os.getpid()
    for d in _cgroup_dirs(device):
        _write(d / "cgroup.procs", str(pid))


def _memory_dir(device: str) -> Optional[Path]:
    dirs = _cgroup_dirs(device)
    if not dirs:
        return None
    return dirs[2] if _cgroup_layout() == "v1" else dirs[0]


def reset_peak_memory(device: str) -> None:
    """Start ``device``'s peak-memory record afresh (v1: ``memory.max_usage_in_bytes``;
    v2: ``memory.peak``, resettable from Linux 6.12; older kernels keep the all-time peak)."""
    d = _memory_dir(device)
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        if d is not None and (d / name).exists():
            try:
                (d / name).write_text("0")
            except OSError:
                pass


def peak_memory(device: str) -> Optional[int]:
    """The most memory ``device``'s processes held at once since the last reset (bytes), or None."""
    d = _memory_dir(device)
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        if d is not None and (d / name).exists():
            try:
                return int((d / name).read_text().split()[0])
            except (OSError, ValueError):
                return None
    return None


def oom_kills(device: str) -> int:
    """How many processes the kernel's OOM killer has ended in ``device`` (its memory limit)."""
    d = _memory_dir(device)
    for name in ("memory.oom_control", "memory.events"):
        try:
            text = (d / name).read_text() if d is not None else ""
        except OSError:
            continue
        m = re.search(r"^oom_kill (\d+)", text, re.M)
        if m:
            return int(m.group(1))
    return 0


def _pids_in(path: Path) -> list[int]:
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _kill(pids: Sequence[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in alive):
            time.sleep(0.05)
        pids = [p for p in alive if Path(f"/proc/{p}").exists()]


class Testbed:
    """The devices of a testbed that is up (see :func:`up`)."""

    __test__ = False

    def __init__(self, devices: Sequence[TestbedDevice]) -> None:
        self.devices = list(devices)

    def device(self, name: str) -> TestbedDevice:
        for d in self.devices:
            if d.name == name:
                return d
        raise CoFormerError(f"no device {name!r} in the testbed; it has {[d.name for d in self.devices]}")

    @property
    def central(self) -> TestbedDevice:
        return self.devices[0]

    @property
    def client_address(self) -> str:
        """The central node's address for clients in this (root) namespace."""
        return f"{CLIENT_NET}.2"

    def central_address(self, device: str) -> str:
        """The central node's address on ``device``'s link (its own loopback for itself)."""
        d = self.device(device)
        return "127.0.0.1" if d.index == 0 else f"10.87.{d.index}.1"

    def command(self, device: str, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside ``device``: its cgroups, then its namespace."""
        d = self.device(device)
        return ["ip", "netns", "exec", d.namespace, *cmd]

    def popen(self, device: str, cmd: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start ``cmd`` inside ``device`` (cgroups joined before it runs)."""
        name = self.device(device).name
        return subprocess.Popen(self.command(device, cmd), preexec_fn=lambda: join_cgroups(name), **kw)

    def contains(self, device: str, pid: int) -> bool:
        """Whether process ``pid`` runs in ``device``'s network namespace and cgroups."""
        ns = self.device(device).namespace
        in_ns = str(pid) in _run("ip", "netns", "pids", ns, check=False).stdout.split()
        return in_ns and all(pid in _pids_in(d) for d in _cgroup_dirs(device))

    def run(self, device: str, cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        name = self.device(device).name
        return subprocess.run(self.command(device, cmd), preexec_fn=lambda: join_cgroups(name), **kw)

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "devices": [d.to_dict() for d in self.devices]}


def plan(devices: Sequence[Any]) -> Testbed:
    """Names, addresses, cores and limits for ``devices`` (``DeviceSpec``s), without touching the host."""
    from coformer.tools.cluster import place_devices

    if not devices:
        raise CoFormerError("the testbed needs at least one device")
    if len(devices) > 250:
        raise CoFormerError(f"{len(devices)} devices: the testbed addresses at most 250")
    placements = place_devices([(d.name, d.cpu_share) for d in devices])
    out = []
    for i, d in enumerate(devices):
        _safe(d.name)
        p = placements[d.name]
        out.append(TestbedDevice(i, d.name, f"{NS_PREFIX}{i}", "127.0.0.1" if i == 0 else f"10.87.{i}.2",
                                 None if i == 0 else float(d.link_mbit_s), tuple(p.cores or (0,)), d.cpu_share,
                                 int(d.memory_bytes)))
    return Testbed(out)


def up(devices: Sequence[Any], link_delay_ms: float = 0.0) -> Testbed:
    """Set up a testbed for ``devices`` (any previous one is taken down first)."""
    check_can_run()
    if link_delay_ms and not _netem_available():
        raise CoFormerError(f"link delay {link_delay_ms} ms needs the netem qdisc, which this kernel lacks "
                            "(CONFIG_NET_SCH_NETEM); run without a delay")
    bed = plan(devices)
    down()
    try:
        central = bed.central
        for d in bed.devices:
            _run("ip", "netns", "add", d.namespace)
            _run("ip", "netns", "exec", d.namespace, "ip", "link", "set", "lo", "up")
            _make_cgroups(d)
        # The clients' link: this (root) namespace to the central node, unshaped, as an
        # application running on the central device would reach it.
        _run("ip", "link", "add", f"{VETH_PREFIX}0r", "type", "veth", "peer", "name", f"{VETH_PREFIX}0c",
             "netns", central.namespace)
        _run("ip", "addr", "add", f"{CLIENT_NET}.1/24", "dev", f"{VETH_PREFIX}0r")
        _run("ip", "link", "set", f"{VETH_PREFIX}0r", "up")
        _run("ip", "netns", "exec", central.namespace, "ip", "addr", "add", f"{CLIENT_NET}.2/24", "dev",
             f"{VETH_PREFIX}0c")
        _run("ip", "netns", "exec", central.namespace, "ip", "link", "set", f"{VETH_PREFIX}0c", "up")
        for d in bed.devices[1:]:
            c_end, d_end = f"{VETH_PREFIX}{d.index}c", f"{VETH_PREFIX}{d.index}d"
            _run("ip", "link", "add", c_end, "netns", central.namespace, "type", "veth", "peer", "name", d_end,
                 "netns", d.namespace)
            _run("ip", "netns", "exec", central.namespace, "ip", "addr", "add", f"10.87.{d.index}.1/24", "dev", c_end)
            _run("ip", "netns", "exec", d.namespace, "ip", "addr", "add", f"10.87.{d.index}.2/24", "dev", d_end)
            for ns, end in ((central.namespace, c_end), (d.namespace, d_end)):
                _run("ip", "netns", "exec", ns, "ip", "link", "set", end, "up")
                _shape(ns, end, d.link_mbit_s, link_delay_ms)
        atomic_write_json(STATE_PATH, bed.to_dict())
    except BaseException:
        down()
        raise
    return bed


def load() -> Testbed:
    """The testbed that is up, from its state file."""
    if not STATE_PATH.is_file():
        raise CoFormerError(f"no testbed is up ({STATE_PATH} does not exist); run `coformer testbed up` first")
    d = json.loads(STATE_PATH.read_text())
    return Testbed([TestbedDevice.from_dict(x) for x in d["devices"]])


def leftovers() -> dict[str, list[str]]:
    """What of a testbed exists on this host: namespaces, veth ends in the root namespace, cgroups."""
    ns = [line.split()[0] for line in _run("ip", "netns", "list", check=False).stdout.splitlines()
          if line.startswith(NS_PREFIX)]
    links = re.findall(rf"^\d+: ({VETH_PREFIX}[^:@]*)", _run("ip", "-o", "link", "show", check=False).stdout, re.M)
    groups = [str(p) for base in _cgroup_dirs() if base.is_dir() for p in [base, *base.iterdir()] if p.is_dir()]
    return {"namespaces": ns, "links": links, "cgroups": groups}


def down() -> dict[str, list[str]]:
    """Remove every trace of a testbed (idempotent); returns what was removed."""
    check_can_run()
    found = leftovers()
    pids: set[int] = set()
    for ns in found["namespaces"]:
        pids.update(int(p) for p in _run("ip", "netns", "pids", ns, check=False).stdout.split())
    for g in found["cgroups"]:
        pids.update(_pids_in(Path(g)))
    pids.discard(os.getpid())
    _kill(sorted(pids))
    for ns in found["namespaces"]:
        _run("ip", "netns", "del", ns, check=False)
    for link in found["links"]:
        _run("ip", "link", "del", link, check=False)
    for g in sorted(found["cgroups"], key=lambda p: -len(p)):  # children before parents
        for _ in range(20):  # a killed process leaves its cgroup a moment later
            try:
                Path(g).rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)
    STATE_PATH.unlink(missing_ok=True)
    left = leftovers()
    if any(left.values()):
        raise CoFormerError(f"testbed teardown left {left}")
    return found


def status() -> dict[str, Any]:
    """The testbed's devices (if up) and what exists on the host."""
    out: dict[str, Any] = {"up": STATE_PATH.is_file(), "host": leftovers()}
    if out["up"]:
        out["devices"] = load().to_dict()["devices"]
    return out
