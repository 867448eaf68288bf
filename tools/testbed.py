"""A heterogeneous cluster emulated on one Linux host: ``coformer testbed up|down|status``.

Per device (the first one in the devices file is the central node):

* a network namespace ``cf-tb<s>-<i>``; every other device's namespace is joined to
  the central node's by a veth pair (``10.87.<i>.1`` on the central side,
  ``10.87.<i>.2`` on the device's), shaped on both ends by a token bucket
  (``tc ... tbf``) at the device's ``link_mbit_s``;
* an unshaped veth from this (root) namespace to the central node's
  (``10.86.<s>.1`` here, ``10.86.<s>.2`` there), for clients;
* cgroups (v1 ``cpu``, ``cpuset``, ``memory`` controllers, or the v2 unified
  hierarchy): its cores (the central node alone on core 0, the others packed by
  share, as the local cluster does), a CFS quota of ``cpu_share`` of a core with
  a short period (1 ms of quota per period, the kernel's minimum, so a burst is
  cut within about a millisecond), and ``memory_bytes`` as a hard memory limit
  (the whole process: runtime, engine, weights, activations).

Processes run inside a device with :meth:`Testbed.popen` or ``coformer testbed
exec DEVICE -- CMD``: they join the device's cgroups, then enter its namespace.

Several testbeds can be up at once (two benches, or a bench and the test suite):
each takes a free *slot* ``s`` (0-199), which is in all of its names (namespaces
``cf-tb<s>-<i>``, veths ``cftb<s>-<i>...``, cgroups ``coformer-testbed-<s>``) and in
its client subnet; the links between devices live inside its own namespaces, so
they need no unique addresses. The slot's state file (``<s>.json`` in
:data:`STATE_DIR`) is claimed under a lock before anything is made, and names
the process that owns the testbed (its pid and start time; none for ``coformer
testbed up``, whose testbed stays until ``down``).

Taking a testbed down (:meth:`Testbed.down`, :func:`down`) removes what its slot
made, found by name rather than from a record, so it also cleans up after a crash
and is safe to run twice: processes in its cgroups and namespaces are killed,
namespaces (and with them their veth ends) deleted, cgroups removed, the state
file deleted. :func:`down` without a slot removes every testbed no live process
owns (``coformer testbed down``); a running bench's testbed is left alone. ``up``
clears the slots of owners that died before it looks for a free one.

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

import fcntl
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

NS_PREFIX = "cf-tb"  # + "<slot>-<index>"
VETH_PREFIX = "cftb"  # + "<slot>-<index><end>": at most 4 + 3 + 1 + 3 + 1 = 12 of Linux's 15 characters
CGROUP_NAME = "coformer-testbed"  # + "-<slot>"
STATE_DIR = Path(os.environ.get("COFORMER_TESTBED_STATE", "/run/coformer-testbed"))
CGROUP_V1 = Path("/sys/fs/cgroup")
SLOTS = 200  # testbeds up at once on one host
CLIENT_NET = "10.86"  # + ".<slot>": .1 here (the root namespace), .2 the central node, where clients connect


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


def _cgroup_dirs(slot: int, device: Optional[str] = None) -> list[Path]:
    """Slot ``slot``'s cgroup folders (one per controller in v1), or one device's."""
    layout = _cgroup_layout()
    name = f"{CGROUP_NAME}-{slot}"
    bases = ([CGROUP_V1 / c / name for c in ("cpu", "cpuset", "memory")] if layout == "v1"
             else [CGROUP_V1 / name] if layout == "v2" else [])
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


def _make_cgroups(slot: int, dev: TestbedDevice) -> None:
    layout = _cgroup_layout()
    quota, period = cfs_quota(dev.cpu_share)
    cores = cores_text(dev.cores)
    if layout == "v1":
        cpu, cpuset, memory = _cgroup_dirs(slot, dev.name)
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
        base = _cgroup_dirs(slot)[0]
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


def _started(pid: int) -> Optional[str]:
    """Process ``pid``'s start time (``/proc/PID/stat`` field 22), None when it is gone:
    with the pid it names one process, even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(owner: Optional[dict[str, Any]]) -> bool:
    return bool(owner) and _started(int(owner["pid"])) == owner.get("start")


class Testbed:
    """The devices of a testbed that is up (see :func:`up`), in slot ``slot``."""

    __test__ = False

    def __init__(self, devices: Sequence[TestbedDevice], slot: int = 0,
                 owner: Optional[dict[str, Any]] = None) -> None:
        self.devices = list(devices)
        self.slot = slot
        self.owner = owner

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
        return f"{CLIENT_NET}.{self.slot}.2"

    def central_address(self, device: str) -> str:
        """The central node's address on ``device``'s link (its own loopback for itself)."""
        d = self.device(device)
        return "127.0.0.1" if d.index == 0 else f"10.87.{d.index}.1"

    def command(self, device: str, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside ``device``: its cgroups, then its namespace."""
        d = self.device(device)
        return ["ip", "netns", "exec", d.namespace, *cmd]

    def cgroup_dirs(self, device: str) -> list[Path]:
        """``device``'s cgroup folders (one per controller in v1)."""
        return _cgroup_dirs(self.slot, self.device(device).name)

    def popen(self, device: str, cmd: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start ``cmd`` inside ``device`` (cgroups joined before it runs)."""
        dirs = self.cgroup_dirs(device)
        return subprocess.Popen(self.command(device, cmd), preexec_fn=lambda: _join(dirs), **kw)

    def run(self, device: str, cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        dirs = self.cgroup_dirs(device)
        return subprocess.run(self.command(device, cmd), preexec_fn=lambda: _join(dirs), **kw)

    def contains(self, device: str, pid: int) -> bool:
        """Whether process ``pid`` runs in ``device``'s network namespace and cgroups."""
        ns = self.device(device).namespace
        in_ns = str(pid) in _run("ip", "netns", "pids", ns, check=False).stdout.split()
        return in_ns and all(pid in _pids_in(d) for d in self.cgroup_dirs(device))

    def _memory_dir(self, device: str) -> Optional[Path]:
        dirs = self.cgroup_dirs(device)
        if not dirs:
            return None
        return dirs[2] if _cgroup_layout() == "v1" else dirs[0]

    def reset_peak_memory(self, device: str) -> None:
        """Start ``device``'s peak-memory record afresh (v1: ``memory.max_usage_in_bytes``;
        v2: ``memory.peak``, resettable from Linux 6.12; older kernels keep the all-time peak)."""
        d = self._memory_dir(device)
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            if d is not None and (d / name).exists():
                try:
                    (d / name).write_text("0")
                except OSError:
                    pass

    def peak_memory(self, device: str) -> Optional[int]:
        """The most memory ``device``'s processes held at once since the last reset (bytes), or None."""
        d = self._memory_dir(device)
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            if d is not None and (d / name).exists():
                try:
                    return int((d / name).read_text().split()[0])
                except (OSError, ValueError):
                    return None
        return None

    def oom_kills(self, device: str) -> int:
        """How many processes the kernel's OOM killer has ended in ``device`` (its memory limit)."""
        d = self._memory_dir(device)
        for name in ("memory.oom_control", "memory.events"):
            try:
                text = (d / name).read_text() if d is not None else ""
            except OSError:
                continue
            m = re.search(r"^oom_kill (\d+)", text, re.M)
            if m:
                return int(m.group(1))
        return 0

    def down(self) -> dict[str, list[str]]:
        """Take this testbed down (idempotent); returns what was removed. Other testbeds stay."""
        return _down_slot(self.slot)

    def to_dict(self) -> dict[str, Any]:
        return {"version": 2, "slot": self.slot, "owner": self.owner, "devices": [d.to_dict() for d in self.devices]}


def _join(dirs: Sequence[Path]) -> None:
    """Join the cgroups ``dirs`` (in a child before it execs: no lookups, no state file)."""
    for d in dirs:
        _write(d / "cgroup.procs", str(os.getpid()))


def plan(devices: Sequence[Any], slot: int = 0) -> Testbed:
    """Names, addresses, cores and limits for ``devices`` (``DeviceSpec``s) in slot ``slot``,
    without touching the host."""
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
        out.append(TestbedDevice(i, d.name, f"{NS_PREFIX}{slot}-{i}", "127.0.0.1" if i == 0 else f"10.87.{i}.2",
                                 None if i == 0 else float(d.link_mbit_s), tuple(p.cores or (0,)), d.cpu_share,
                                 int(d.memory_bytes)))
    return Testbed(out, slot)


def _state(slot: int) -> Path:
    return STATE_DIR / f"{slot}.json"


def _states() -> dict[int, Optional[dict[str, Any]]]:
    """Every slot with a state file: its content (None when unreadable, as when torn mid-write)."""
    out: dict[int, Optional[dict[str, Any]]] = {}
    for f in STATE_DIR.glob("*.json") if STATE_DIR.is_dir() else []:
        if f.stem.isdigit():
            try:
                out[int(f.stem)] = json.loads(f.read_text())
            except (OSError, ValueError):
                out[int(f.stem)] = None
    return out


class _Lock:
    """The host-wide lock under which slots are claimed and released."""

    def __enter__(self) -> "_Lock":
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(STATE_DIR / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _slots_in_use() -> set[int]:
    """Slots with a state file or anything on the host (a crash can leave names without a state)."""
    left = leftovers()
    found = set(_states())
    for name in left["namespaces"]:
        m = re.fullmatch(rf"{NS_PREFIX}(\d+)-\d+", name)
        found |= {int(m.group(1))} if m else set()
    for name in left["links"]:
        m = re.match(rf"{VETH_PREFIX}(\d+)-", name)
        found |= {int(m.group(1))} if m else set()
    for g in left["cgroups"]:
        m = re.search(rf"/{CGROUP_NAME}-(\d+)(/|$)", g)
        found |= {int(m.group(1))} if m else set()
    return found


def up(devices: Sequence[Any], link_delay_ms: float = 0.0, persistent: bool = False) -> Testbed:
    """Set up a testbed for ``devices`` in a free slot, owned by this process (``persistent``:
    by nobody, as ``coformer testbed up`` makes it, to stay until ``coformer testbed down``).

    Testbeds whose owner has died are taken down first; live ones are not touched."""
    check_can_run()
    if link_delay_ms and not _netem_available():
        raise CoFormerError(f"link delay {link_delay_ms} ms needs the netem qdisc, which this kernel lacks "
                            "(CONFIG_NET_SCH_NETEM); run without a delay")
    plan(devices)  # bad names are refused before anything is made
    owner = None if persistent else {"pid": os.getpid(), "start": _started(os.getpid())}
    with _Lock():
        for slot, state in _states().items():
            if state is not None and state.get("owner") and not _owner_alive(state["owner"]):
                _down_slot(slot)
        used = _slots_in_use()
        free = [s for s in range(SLOTS) if s not in used]
        if not free:
            raise CoFormerError(f"all {SLOTS} testbed slots are in use (`coformer testbed status` lists them)")
        bed = plan(devices, free[0])
        bed.owner = owner
        atomic_write_json(_state(bed.slot), bed.to_dict())  # claimed before anything is made
    try:
        _make(bed, link_delay_ms)
    except BaseException:
        _down_slot(bed.slot)
        raise
    return bed


def _make(bed: Testbed, link_delay_ms: float) -> None:
    central, v, slot = bed.central, f"{VETH_PREFIX}{bed.slot}-", bed.slot
    for d in bed.devices:
        _run("ip", "netns", "add", d.namespace)
        _run("ip", "netns", "exec", d.namespace, "ip", "link", "set", "lo", "up")
        _make_cgroups(slot, d)
    # The clients' link: this (root) namespace to the central node, unshaped, as an
    # application running on the central device would reach it.
    net = f"{CLIENT_NET}.{slot}"
    _run("ip", "link", "add", f"{v}0r", "type", "veth", "peer", "name", f"{v}0c", "netns", central.namespace)
    _run("ip", "addr", "add", f"{net}.1/24", "dev", f"{v}0r")
    _run("ip", "link", "set", f"{v}0r", "up")
    _run("ip", "netns", "exec", central.namespace, "ip", "addr", "add", f"{net}.2/24", "dev", f"{v}0c")
    _run("ip", "netns", "exec", central.namespace, "ip", "link", "set", f"{v}0c", "up")
    for d in bed.devices[1:]:
        c_end, d_end = f"{v}{d.index}c", f"{v}{d.index}d"
        _run("ip", "link", "add", c_end, "netns", central.namespace, "type", "veth", "peer", "name", d_end,
             "netns", d.namespace)
        _run("ip", "netns", "exec", central.namespace, "ip", "addr", "add", f"10.87.{d.index}.1/24", "dev", c_end)
        _run("ip", "netns", "exec", d.namespace, "ip", "addr", "add", f"10.87.{d.index}.2/24", "dev", d_end)
        for ns, end in ((central.namespace, c_end), (d.namespace, d_end)):
            _run("ip", "netns", "exec", ns, "ip", "link", "set", end, "up")
            _shape(ns, end, d.link_mbit_s, link_delay_ms)


def _from_state(d: dict[str, Any]) -> Testbed:
    return Testbed([TestbedDevice.from_dict(x) for x in d["devices"]], int(d.get("slot", 0)), d.get("owner"))


def load(slot: Optional[int] = None) -> Testbed:
    """A testbed that is up, from its state file: slot ``slot``, or the only one."""
    states = {k: v for k, v in _states().items() if v is not None}
    if slot is not None:
        if slot not in states:
            raise CoFormerError(f"no testbed is up in slot {slot}; up: {sorted(states) or 'none'}")
        return _from_state(states[slot])
    if not states:
        raise CoFormerError(f"no testbed is up (no state in {STATE_DIR}); run `coformer testbed up` first")
    if len(states) > 1:
        raise CoFormerError(f"{len(states)} testbeds are up (slots {sorted(states)}); name one with --slot")
    return _from_state(next(iter(states.values())))


def leftovers(slot: Optional[int] = None) -> dict[str, list[str]]:
    """What of a testbed (slot ``slot``, or any) exists on this host: namespaces, veth ends
    in the root namespace, cgroups."""
    ns_pat = rf"{NS_PREFIX}{slot}-\d+" if slot is not None else rf"{NS_PREFIX}\S*"
    ns = [line.split()[0] for line in _run("ip", "netns", "list", check=False).stdout.splitlines()
          if re.fullmatch(ns_pat, line.split()[0] if line.split() else "")]
    link_pat = rf"{VETH_PREFIX}{slot}-[^:@]*" if slot is not None else rf"{VETH_PREFIX}[^:@]*"
    links = re.findall(rf"^\d+: ({link_pat})", _run("ip", "-o", "link", "show", check=False).stdout, re.M)
    if slot is not None:
        bases = _cgroup_dirs(slot)
    else:
        layout = _cgroup_layout()
        roots = [CGROUP_V1 / c for c in ("cpu", "cpuset", "memory")] if layout == "v1" else \
            [CGROUP_V1] if layout == "v2" else []
        bases = [g for r in roots for g in sorted(r.glob(f"{CGROUP_NAME}*"))]
    groups = [str(p) for base in bases if base.is_dir() for p in [base, *base.iterdir()] if p.is_dir()]
    return {"namespaces": ns, "links": links, "cgroups": groups}


def _remove(found: dict[str, list[str]]) -> None:
    """Kill the processes in ``found``'s namespaces and cgroups, then delete them and its links."""
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


def _down_slot(slot: int) -> dict[str, list[str]]:
    """Remove every trace of slot ``slot``'s testbed; idempotent."""
    found = leftovers(slot)
    _remove(found)
    _state(slot).unlink(missing_ok=True)
    left = leftovers(slot)
    if any(left.values()):
        raise CoFormerError(f"testbed teardown left {left}")
    return found


def down(slot: Optional[int] = None, everything: bool = False) -> dict[str, list[str]]:
    """Take testbeds down (idempotent); returns what was removed.

    ``slot``: that one. Otherwise every testbed no live process owns: the ones
    ``coformer testbed up`` made and the debris of runs that died, including names
    left without a state file (or by an older version's naming); a running bench's
    testbed is left alone. ``everything``: every testbed on the host, owned or not.
    """
    check_can_run()
    with _Lock():
        if slot is not None:
            return _down_slot(slot)
        states = _states()
        live = set() if everything else \
            {s for s, st in states.items() if st is not None and _owner_alive(st.get("owner"))}
        keep: dict[str, set[str]] = {"namespaces": set(), "links": set(), "cgroups": set()}
        for s in live:
            for k, v in leftovers(s).items():
                keep[k] |= set(v)
        found = {k: [x for x in v if x not in keep[k]] for k, v in leftovers(None).items()}
        _remove(found)
        for s in set(states) - live:
            _state(s).unlink(missing_ok=True)
        left = {k: [x for x in v if x not in keep[k]] for k, v in leftovers(None).items()}
        if any(left.values()):
            raise CoFormerError(f"testbed teardown left {left}")
        return found


def status() -> dict[str, Any]:
    """Every testbed that is up (its slot, owner and devices) and what exists on the host."""
    beds = []
    for slot, st in sorted(_states().items()):
        if st is not None:
            beds.append({"slot": slot, "owner": st.get("owner"), "owner_alive": _owner_alive(st.get("owner")),
                         "devices": st["devices"]})
    return {"up": bool(beds), "testbeds": beds, "host": leftovers()}
