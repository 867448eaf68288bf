"""Device profiler: time every entry of a profile kit on this device (no torch).

Writes ``DEVICE.json``: the device's environment and, per kit entry, its
configuration and latency statistics. Entries measured elsewhere with NVIDIA's
trtexec (``--exportTimes``) can be merged in by id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

from tqdm.auto import tqdm

from coformer.runtime._files import atomic_write_json
from coformer.runtime.errors import CoFormerError
from coformer.runtime.limits import DeviceLimits
from coformer.runtime.timing import benchmark_engine, cpu_model
from coformer.runtime.trtexec import load_trtexec_times

KIT_NAME = "kit.json"


def load_kit(kit_dir: Path) -> dict:
    path = Path(kit_dir) / KIT_NAME
    if not path.is_file():
        raise CoFormerError(f"{kit_dir} is not a profile kit: no {KIT_NAME}")
    kit = json.loads(path.read_text())
    if kit.get("version") != 1:
        raise CoFormerError(f"profile kit version {kit.get('version')!r} is not supported (expected 1)")
    return kit


def profile_kit(
    kit_dir: Path,
    device: str = "this-device",
    backend: str = "onnxruntime",
    threads: int = 1,
    limits: DeviceLimits = DeviceLimits(),
    warmup_ms: float = 100.0,
    iterations: int = 10,
    duration_s: float = 0.3,
    idle_ms: float = 2.0,
    trtexec: Optional[Mapping[int, Path]] = None,
    progress: bool = True,
    out: Optional[Path] = None,
) -> dict[str, Any]:
    """Measure every kit entry; ``trtexec`` maps entry ids to ``--exportTimes`` files used instead.

    Each run is preceded by ``idle_ms`` of idle (trtexec ``--idleTime``), as a
    served device idles between requests.
    """
    kit = load_kit(kit_dir)
    trtexec = dict(trtexec or {})
    entries = []
    env: dict[str, Any] = {}
    for e in tqdm(kit["entries"], desc=f"profile {device}", disable=not progress):
        if e["id"] in trtexec:
            t = load_trtexec_times(trtexec.pop(e["id"]))
            latency, source = t["latency_ms"], t["source"]
        else:
            timing = benchmark_engine(Path(kit_dir) / e["file"], backend, warmup_ms, iterations, duration_s,
                                      threads, limits=limits, idle_ms=idle_ms)
            latency, source, env = dict(timing.compute_ms), "benchmark_engine", dict(timing.environment)
        entries.append({"id": e["id"], "config": e["config"], "flops": e["flops"], "params": e["params"],
                        "latency_ms": latency, "source": source})
    if trtexec:
        raise CoFormerError(f"trtexec times given for ids {sorted(trtexec)}, which are not in the kit")
    profile = {
        "version": 1,
        "device": device,
        "backend": backend,
        "threads": threads,
        "cpu_share": limits.cpu_share,
        "environment": env or {"cpu": cpu_model()},
        "shape": kit["shape"],
        "entries": entries,
    }
    if out is not None:
        atomic_write_json(Path(out), profile)
    return profile
