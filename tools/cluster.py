"""Start a bundle's cluster on this machine: the central node and one worker
per device, each its own process, held to its device's limits, on loopback."""

from __future__ import annotations

import json
import os
import selectors
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Mapping, Optional, Sequence

from coformer.runtime.client import Client
from coformer.runtime.errors import CoFormerError
from coformer.runtime.limits import cores_text, remove_stale_cgroups
from coformer.runtime.manifest import load_manifest


@dataclass(frozen=True)
class Placement:
    """Where an emulated device runs: its cores and its share of one core."""

    cores: Optional[tuple[int, ...]] = None
    cpu_share: float = 1.0


def default_placements(manifest) -> dict[str, Placement]:
    """Placements for a bundle's devices: see :func:`place_devices`."""
    return place_devices([(d.device, d.cpu_share) for d in manifest.devices])


def place_devices(devices: Sequence[tuple[str, float]]) -> dict[str, Placement]:
    """Central node (the first device) alone on core 0; the others packed onto the
    remaining cores by share, each to the core with the most share left (a core
    holds 1.0). On a one-core machine everything shares core 0.
    """
    ncpu = os.cpu_count() or 1
    (central, central_share), others = devices[0], devices[1:]
    out = {central: Placement((0,), central_share)}
    load = {c: 0.0 for c in range(1, ncpu)} or {0: central_share}
    for name, share in sorted(others, key=lambda w: -w[1]):
        core = min(load, key=lambda c: (load[c], c))
        load[core] += share
        out[name] = Placement((core,), share)
    return out


KEYS_PREFIX = "coformer-keys-"  # a cluster's throwaway key folders, in the temporary directory
OWNER_FILE = "owner.pid"  # in each: the process whose cluster it is


def remove_stale_keys() -> list[Path]:
    """Remove the throwaway key folders of clusters whose process is gone (a ``kill -9`` of
    ``coformer serve`` leaves its folder, secret keys and all: its ``finally`` never ran).
    Returns what was removed."""
    removed = []
    for d in Path(tempfile.gettempdir()).glob(KEYS_PREFIX + "*"):
        try:
            pid = int((d / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or being written
        if pid != os.getpid() and not _running(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def runtime_cmd() -> list[str]:
    return [sys.executable, "-m", "coformer.runtime.cli"]


class LocalCluster:
    """A served bundle on this machine. Use as a context manager; ``client()`` talks to it.

    Args:
        bundle_dir: the bundle.
        placements: device name -> :class:`Placement` (default: :func:`default_placements`).
        throttle: how shares are enforced (see :mod:`coformer.runtime.limits`).
        log_dir: where each process's stderr goes (default: discarded unless it fails).
        front: the client endpoint (default: a free loopback port).
        testbed: run every process inside its device of this
            :class:`coformer.tools.testbed.Testbed` (its namespace, link and
            cgroups; the cgroup quota then holds the share, so no duty cycle);
            clients connect over the testbed's client link.
        local_inputs: a .npy of model inputs every worker loads, so a client may
            send ``input_index`` and the input never crosses the links.
        keys: a folder from ``coformer-runtime keys`` for this bundle: each process
            gets its role's folder, and the bundle's signature is checked. Default:
            throwaway CURVE keys made for this cluster and removed with it, so
            every link is authenticated and encrypted here too (the signature is
            then not checked: there is no operator key to check it against).
        secure: ``False`` runs plain TCP (loopback only, unless a testbed: then
            ``--insecure``); for comparing against CURVE and fuzzing the decoder.
        central_args: more ``coformer-runtime central`` options, e.g.
            ``["--batch-requests", "1"]``.
        die_with_parent: every process ends when this one dies, even by ``kill -9``
            (:func:`coformer.runtime.commands.roles.die_with_parent`): ``coformer serve``'s roles, which
            would otherwise serve on as orphans holding the port.
    """

    def __init__(
        self,
        bundle_dir: Path,
        placements: Optional[Mapping[str, Placement]] = None,
        throttle: str = "auto",
        log_dir: Optional[Path] = None,
        front: str = "tcp://127.0.0.1:*",
        timeout_s: float = 10.0,
        testbed: Optional[Any] = None,
        local_inputs: Optional[Path] = None,
        keys: Optional[Path] = None,
        secure: bool = True,
        central_args: Sequence[str] = (),
        die_with_parent: bool = False,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.die_with_parent = die_with_parent
        self.secure = secure
        self.central_args = list(central_args)
        if keys is not None and not secure:
            raise CoFormerError("LocalCluster: keys and secure=False contradict each other")
        self.keys = Path(keys) if keys is not None else None
        self._own_keys = None
        from coformer.runtime.security import check_local_signature, load_keys

        self._local = None  # without keys: this user's operator key, which every role then checks
        if self.keys is not None:
            self.manifest = load_manifest(self.bundle_dir, trust=load_keys(self.keys / "central", "central").operator)
        else:
            self.manifest = load_manifest(self.bundle_dir)
            self._local = check_local_signature(self.bundle_dir)
        self.placements = dict(placements or default_placements(self.manifest))
        self.throttle = throttle
        self.log_dir = Path(log_dir) if log_dir else None
        self._own_log_dir = False
        self.front_request = front
        self.timeout_s = timeout_s
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, IO] = {}
        self.endpoints: dict[str, str] = {}
        self.testbed = testbed
        self.local_inputs = Path(local_inputs).resolve() if local_inputs else None
        if testbed is not None:
            missing = [d.device for d in self.manifest.devices if d.device not in {x.name for x in testbed.devices}]
            if missing or testbed.central.name != self.manifest.central.device:
                raise CoFormerError(f"the testbed ({[x.name for x in testbed.devices]}, central "
                                    f"{testbed.central.name}) does not hold this bundle's devices "
                                    f"({[d.device for d in self.manifest.devices]})")
            self.throttle = "none"
            if front == "tcp://127.0.0.1:*":
                self.front_request = f"tcp://{testbed.client_address}:*"

    def _security_args(self, role: str) -> list[str]:
        if not self.secure:
            return ["--insecure"] if self.testbed is not None else []
        return ["--keys", str(self._key_folder(role))]

    def _key_folder(self, role: str) -> Path:
        """The key folder of ``role`` (``central``, a worker's name or ``client``)."""
        if self.keys is None:  # throwaway keys, made on first use
            from coformer.runtime.security import OPERATOR_PUBLIC, write_keys

            remove_stale_keys()
            self._own_keys = Path(tempfile.mkdtemp(prefix=KEYS_PREFIX))
            (self._own_keys / OWNER_FILE).write_text(f"{os.getpid()}\n")
            write_keys(self._own_keys, [w.device for w in self.manifest.workers], ["client"])
            local = self._local
            for f in self._own_keys.rglob(OPERATOR_PUBLIC):
                # a throwaway operator key signed nothing: every role checks this user's own instead
                # (the key each compile here signs with), or nothing where there is none
                if local is None:
                    f.unlink()
                else:
                    f.write_text(local[1].hex() + "\n")
            shutil.rmtree(self._own_keys / "operator")  # nor will it sign anything: no secret left lying about
            self.keys = self._own_keys
        if role == "client":
            clients = sorted(p for p in (self.keys / "clients").iterdir() if p.is_dir())
            if not clients:
                raise CoFormerError(f"key folder {self.keys} holds no client keys (clients/NAME)")
            return clients[0]
        return self.keys / role

    def _limits_args(self, device: str) -> list[str]:
        if self.testbed is not None:
            return ["--throttle", "none"]  # the device's cgroups hold cores, share and memory
        p = self.placements.get(device, Placement())
        args = ["--cpu-share", str(p.cpu_share), "--throttle", self.throttle]
        return args + (["--cpu-cores", cores_text(p.cores)] if p.cores else [])

    def _spawn(self, name: str, args: list[str], stdout=subprocess.DEVNULL) -> subprocess.Popen:
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="coformer-cluster-"))
            self._own_log_dir = True
        self.log_dir.mkdir(parents=True, exist_ok=True)
        old = self._logs.pop(name, None)
        if old is not None:
            old.close()
        err = open(self.log_dir / f"{name}.log", "a")  # a restarted process appends: its history is kept
        self._logs[name] = err
        cmd = runtime_cmd() + ["-v"] + args
        env = None
        if self.die_with_parent:
            from coformer.runtime.commands.roles import PARENT_ENV

            env = {**os.environ, PARENT_ENV: str(os.getpid())}
        if self.testbed is not None:
            device = name.split("-", 1)[1]
            proc = self.testbed.popen(device, cmd, stdout=stdout, stderr=err, text=True, start_new_session=True,
                                      env=env)
        else:
            proc = subprocess.Popen(cmd, stdout=stdout, stderr=err, text=True, start_new_session=True, env=env)
        self.procs[name] = proc
        return proc

    def _tail(self, name: str) -> str:
        try:
            lines = (self.log_dir / f"{name}.log").read_text().splitlines()
        except (OSError, TypeError):
            return ""
        return "\n".join(lines[-8:])

    def start_worker(self, device: str) -> subprocess.Popen:
        """(Re)start ``device``'s worker, as :meth:`start` does; its log is appended to."""
        back = self.endpoints["back"]
        if self.testbed is not None:  # the central node as this worker's link sees it
            back = f"tcp://{self.testbed.central_address(device)}:{back.rsplit(':', 1)[1]}"
        return self._spawn(f"worker-{device}", ["worker", str(self.bundle_dir), "--device", device,
                                                "--central", back, *self._security_args(device)]
                           + self._limits_args(device)
                           + (["--local-inputs", str(self.local_inputs)] if self.local_inputs else []))

    def _start_central(self, front: str, back: str, timeout_s: float) -> dict[str, str]:
        m = self.manifest
        name = f"central-{m.central.device}"
        old = self.procs.get(name)
        if old is not None and old.stdout:
            old.stdout.close()
        central = self._spawn(
            name,
            ["central", str(self.bundle_dir), "--front", front, "--back", back,
             "--timeout", str(self.timeout_s), *self._security_args("central"), *self.central_args]
            + self._limits_args(m.central.device),
            stdout=subprocess.PIPE,
        )
        return self._read_ready(central, timeout_s)

    def restart_central(self, timeout_s: float = 60.0) -> dict[str, str]:
        """Start the central node again after it died, on the very endpoints it had: clients keep
        their address, and the workers, which reconnect by themselves, register again."""
        self.endpoints = self._start_central(self.endpoints["front"], self.endpoints["back"], timeout_s)
        return self.endpoints

    def start(self, timeout_s: float = 60.0) -> dict[str, str]:
        remove_stale_cgroups()
        m = self.manifest
        self.endpoints = self._start_central(self.front_request,
                                             "tcp://127.0.0.1:*" if self.testbed is None else "tcp://0.0.0.0:*",
                                             timeout_s)
        for w in m.workers:
            self.start_worker(w.device)
        try:
            with self.client() as c:
                c.wait_ready(timeout_s)
        except CoFormerError as e:
            self._raise_if_dead()
            raise e
        return self.endpoints

    def _read_ready(self, proc: subprocess.Popen, timeout_s: float) -> dict[str, str]:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sel.select(timeout=0.2):
                line = proc.stdout.readline()
                if line:
                    event = json.loads(line)
                    if event.get("event") == "ready":
                        return {"front": event["front"], "back": event["back"]}
            if proc.poll() is not None:
                self._raise_if_dead()
        self.stop()
        raise CoFormerError(f"central node did not start within {timeout_s:g} s")

    def _raise_if_dead(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = self._tail(name)
                self.stop()
                raise CoFormerError(f"{name} exited with code {p.returncode}:\n{tail}")

    @property
    def client_keys(self) -> Optional[Path]:
        """The key folder a client of this cluster connects with (None: plain TCP)."""
        return self._key_folder("client") if self.secure else None

    def client(self, timeout_s: float = 30.0) -> Client:
        if not self.secure:
            return Client(self.endpoints["front"], timeout_s=timeout_s, insecure=self.testbed is not None)
        return Client(self.endpoints["front"], timeout_s=timeout_s, keys=self._key_folder("client"))

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()
        for f in self._logs.values():
            f.close()
        self._logs.clear()
        if self._own_log_dir and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir, self._own_log_dir = None, False
        if self._own_keys is not None:
            shutil.rmtree(self._own_keys, ignore_errors=True)
            self.keys = self._own_keys = None
        remove_stale_cgroups()

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
