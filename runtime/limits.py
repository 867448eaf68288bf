"""Hold a process to an emulated device's compute: one core, a share of it.

A device is emulated by CPU affinity (which cores), a thread count for its
engine, and a *share* of one core, enforced one of two ways:

* ``duty-cycle`` (the default, ``auto``): after each inference that used ``c``
  seconds of CPU, the process idles until ``c / share`` seconds have passed
  since it started, as on a device that much slower. CPU time, not wall time,
  so that two emulated devices sharing a core do not count each other's
  contention as their own compute (with wall time, two workers on one core
  served far slower than profiled);
* ``cgroup`` (needs root): a CFS CPU quota with the shortest period the
  kernel allows for the share (the quota must be >= 1 ms, so the period is
  1 ms / share). A quota limits throughput, not latency: how long one
  inference takes depends on where it falls in the period.

With idle gaps between runs, as when serving, a quota makes one inference much
slower than back to back (it falls wherever the period is), while a duty cycle
takes compute / share either way. A profile taken back to back would thus
mispredict served latency under a quota, hence the duty cycle by default;
``cgroup`` stays for throughput studies.

Two emulated devices that share a core queue behind each other: a request
that reaches one while its neighbour computes waits for the core, which a real
device of its own would not. A duty-cycled process therefore counts the time
it spent runnable but not running since it began waiting for the request (the
kernel's per-thread run delay, ``/proc/thread-self/schedstat``) as time its
device was already working: the device's time for a request is ``cpu / share``
from the moment the request could have started (``queued_ms`` in a worker's
reply). Where the kernel does not keep run delays, nothing is credited.
Served, the quickstart's two workers on core 1 rarely queue in the thread
that computes (it is woken once the request is in hand, and runs at once).
They queue elsewhere: in ZeroMQ's I/O thread, which reads the request off the
socket while the neighbour computes, and at the end, when one's pause is over
while the other computes and it waits for the core to send its reply (its
``service_ms`` then exceeds its ``compute_ms``). Neither is
credited: the I/O thread's wait cannot be told apart from its delay in
sending the previous reply, and no credit can undo a delay that comes after
the device's time. The latency predicted for this machine counts them instead
(``coformer.tools.measure.predict_served_here``).

Affinity applies to every thread of the process, also those started before
the limits (ZeroMQ's I/O thread, once the sockets are bound): a device's
message handling is its own work, and the central node's I/O thread used to
float onto the workers' core.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from coformer.runtime.errors import CoFormerError

CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_PARENT = "coformer"
MIN_QUOTA_US = 1_000  # the kernel refuses a smaller cfs quota
MODES = ("auto", "cgroup", "duty-cycle", "none")


@dataclass(frozen=True)
class DeviceLimits:
    """Compute limits of one emulated device.

    Args:
        cpu_share: fraction of one core the device may use, in (0, 1].
        cpu_affinity: cores the process may run on (None leaves it as is).
        mode: ``auto`` (= ``duty-cycle``), ``duty-cycle``, ``cgroup`` (CFS
            quota; needs root) or ``none`` (affinity only).
    """

    cpu_share: float = 1.0
    cpu_affinity: Optional[tuple[int, ...]] = None
    mode: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 < self.cpu_share <= 1.0:
            raise CoFormerError(f"cpu_share {self.cpu_share} must be in (0, 1]")
        if self.mode not in MODES:
            raise CoFormerError(f"throttle mode {self.mode!r} is not one of {MODES}")
        if self.cpu_affinity is not None:
            n = os.cpu_count() or 1
            bad = [c for c in self.cpu_affinity if not 0 <= c < n]
            if bad or not self.cpu_affinity:
                raise CoFormerError(f"cpu_affinity {list(self.cpu_affinity)}: cores must be in 0..{n - 1}")


class Throttle:
    """The limits as applied to this process; call :meth:`after_compute` after each inference."""

    def __init__(self, limits: DeviceLimits, mode: str, cgroup: Optional[Path] = None) -> None:
        self.limits = limits
        self.mode = mode
        self.cgroup = cgroup
        self._overshoot_s = 0.0  # how much longer than asked time.sleep() has been taking
        self._wait_mark: Optional[float] = None

    @property
    def _duty(self) -> bool:
        return self.mode == "duty-cycle" and self.limits.cpu_share < 1.0

    def waiting(self) -> None:
        """Call when the process starts waiting for a request: run delay from here on is
        queueing behind a neighbour on the core (see :meth:`queued_s`)."""
        self._wait_mark = run_delay_s() if self._duty else None

    def queued_s(self) -> float:
        """Seconds this thread was runnable but kept off its core since :meth:`waiting`
        (0 when the kernel keeps no run delays, ``waiting`` was not called, or there is
        no duty cycle to credit it to)."""
        if self._wait_mark is None:
            return 0.0
        now = run_delay_s()
        return 0.0 if now is None else max(0.0, now - self._wait_mark)

    def after_compute(self, compute_s: float, cpu_s: Optional[float] = None, sleep: bool = True,
                      queued_s: float = 0.0) -> float:
        """Idle for the duty cycle's off time; returns the off time in seconds.

        ``compute_s`` is the wall time the inference took, ``cpu_s`` the CPU
        time it used (default: the wall time). The device's time for it is
        ``cpu_s / share``; whatever of that has not yet passed is idled, where
        ``queued_s`` (from :meth:`queued_s`) has passed already: the request
        waited that long for a core a real device would not share.
        ``sleep=False`` returns the off time without idling: the device's time
        for back-to-back work (profiling), without the emulation's own pauses.
        """
        if not self._duty:
            return 0.0
        cpu = compute_s if cpu_s is None else cpu_s
        off = max(0.0, cpu / self.limits.cpu_share - compute_s - queued_s)
        if off and sleep:
            # A sub-millisecond sleep overshoots (timer slack and a vCPU waking up); ask for less by the running mean overshoot so the pause is what the
            # share calls for.
            ask = max(0.0, off - self._overshoot_s)
            t0 = time.perf_counter()
            time.sleep(ask)
            self._overshoot_s = 0.8 * self._overshoot_s + 0.2 * max(0.0, time.perf_counter() - t0 - ask)
        return off

    def release(self) -> None:
        """Leave and remove this process's cgroup (safe to call twice)."""
        if self.cgroup is None:
            return
        root = self.cgroup.parent.parent
        try:
            (root / "cgroup.procs").write_text(str(os.getpid()))
            self.cgroup.rmdir()
        except OSError:
            pass
        self.cgroup = None

    def describe(self) -> str:
        cores = list(self.limits.cpu_affinity) if self.limits.cpu_affinity else "any"
        return f"cores {cores}, share {self.limits.cpu_share:.2f} of a core by {self.mode}"


_SCHEDSTAT = Path("/proc/thread-self/schedstat")


def run_delay_s() -> Optional[float]:
    """Seconds the calling thread has spent runnable but waiting for a CPU (the second
    field of Linux's schedstat), or None where the kernel does not report it."""
    try:
        return int(_SCHEDSTAT.read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


_TASKS = Path("/proc/self/task")


def _thread_ids() -> list[str]:
    """The ids of this process's threads (empty where /proc does not list them)."""
    try:
        return os.listdir(_TASKS)
    except OSError:
        return []


def _cgroup_root() -> tuple[Optional[Path], str]:
    if (CGROUP_V1_CPU / "cpu.cfs_quota_us").exists():
        return CGROUP_V1_CPU, "v1"
    if (CGROUP_V2 / "cgroup.controllers").exists() and "cpu" in (CGROUP_V2 / "cgroup.controllers").read_text():
        return CGROUP_V2, "v2"
    return None, ""


def cfs_quota(share: float) -> tuple[int, int]:
    """(quota, period) in microseconds for ``share`` of a core: the kernel's minimum
    quota per period, so a burst is cut within about a millisecond."""
    period = min(1_000_000, max(MIN_QUOTA_US, int(round(MIN_QUOTA_US / share))))
    return int(round(share * period)), period


def _enter_cgroup(name: str, share: float) -> Optional[Path]:
    root, version = _cgroup_root()
    if root is None or not os.access(root, os.W_OK):
        return None
    try:
        parent = root / CGROUP_PARENT
        parent.mkdir(exist_ok=True)
        if version == "v2":
            (root / "cgroup.subtree_control").write_text("+cpu")
            (parent / "cgroup.subtree_control").write_text("+cpu")
        group = parent / f"{name}-{os.getpid()}"
        group.mkdir(exist_ok=True)
        quota, period = cfs_quota(share)
        if version == "v1":
            (group / "cpu.cfs_period_us").write_text(str(period))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (group / "cpu.max").write_text(f"{quota} {period}")
        (group / "cgroup.procs").write_text(str(os.getpid()))
        return group
    except OSError:
        return None


def apply_limits(limits: DeviceLimits, name: str) -> Throttle:
    """Apply ``limits`` to the calling process and return the :class:`Throttle` in force."""
    if limits.cpu_affinity is not None:
        cores = set(limits.cpu_affinity)
        os.sched_setaffinity(0, cores)
        # Threads started before keep their own mask: ZeroMQ's I/O thread, when the sockets
        # were bound first, floated over every core (the central node's did, competing
        # with the workers on theirs). A device's message handling is its own work.
        for tid in _thread_ids():
            try:
                os.sched_setaffinity(int(tid), cores)
            except OSError:
                pass  # the thread ended meanwhile
    if limits.mode == "none" or limits.cpu_share >= 1.0:
        return Throttle(limits, "none")
    if limits.mode == "cgroup":
        group = _enter_cgroup(name, limits.cpu_share)
        if group is None:
            raise CoFormerError(
                "throttle mode 'cgroup' needs a writable cgroup cpu controller (run as root); "
                "use --throttle duty-cycle"
            )
        return Throttle(limits, "cgroup", group)
    return Throttle(limits, "duty-cycle")


def remove_stale_cgroups() -> list[str]:
    """Remove empty cgroups left by killed CoFormer processes; returns their names."""
    root, _ = _cgroup_root()
    removed: list[str] = []
    if root is None or not (root / CGROUP_PARENT).is_dir():
        return removed
    for group in (root / CGROUP_PARENT).iterdir():
        if group.is_dir() and not (group / "cgroup.procs").read_text().strip():
            try:
                group.rmdir()
                removed.append(group.name)
            except OSError:
                pass
    try:
        (root / CGROUP_PARENT).rmdir()  # only succeeds once empty
    except OSError:
        pass
    return removed


def parse_cores(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``"0"``, ``"0,1"`` or ``"0-3"`` -> a tuple of core numbers; None or '' -> None."""
    if not text:
        return None
    cores: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                cores.extend(range(int(lo), int(hi) + 1))
            else:
                cores.append(int(part))
    except ValueError:
        raise CoFormerError(f"cpu cores {text!r}: expected a list like '0,1' or a range like '0-3'") from None
    return tuple(cores)


def cores_text(cores: Optional[Sequence[int]]) -> str:
    return ",".join(str(c) for c in cores) if cores else ""
