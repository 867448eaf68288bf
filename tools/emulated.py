"""Devices emulated on this machine, for the quickstarts: profiled and timed each in its own
process under its own limits (a core, a CPU share), the way ``coformer-runtime`` runs on a
real device."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from coformer.runtime.errors import CoFormerError


def profile_devices(teacher, devices, placements, out_dir: Path, *, kit_count: int, seed: int = 0,
                    throttle: str = "auto", alone: bool = True, rounds: Optional[int] = None,
                    duration_s: Optional[float] = None, extra_rounds: Optional[int] = None,
                    progress: bool = True) -> dict[str, dict]:
    """Build a profile kit of ``kit_count`` sub-models and time it on every emulated device,
    each in its own process under its own limits (``placements``: as they will serve), with
    ``coformer-runtime profile`` (``rounds``, ``duration_s``, ``extra_rounds``: its
    ``--rounds``, ``--duration``, ``--extra-rounds``; None: its defaults). Writes
    ``out_dir/profiles/NAME.json`` and returns each device's profile; the kit's ONNX files
    are removed after.

    ``alone``: every device is profiled on its own, one after another. Devices that share a
    core always are, so each profile is the device alone, as a real one would be; devices on
    different cores could run at once, but would still share this machine's L3 cache and
    memory bus, which real devices do not.
    """
    from coformer.compiler.families import adapter_for
    from coformer.compiler.profile_kit import sample_configs, write_kit
    from coformer.runtime.limits import cores_text

    shape = adapter_for(teacher).read_shape(teacher)
    kit_dir = out_dir / "kit"
    shutil.rmtree(kit_dir, ignore_errors=True)
    write_kit(teacher, sample_configs(shape, kit_count, seed), kit_dir, progress)
    (out_dir / "profiles").mkdir(exist_ok=True)
    waves: list[list] = []
    for d in devices:
        cores = set(placements[d.name].cores or [0])
        wave = None if alone else next(
            (w for w in waves if all(cores.isdisjoint(placements[x.name].cores or [0]) for x in w)), None)
        if wave is None:
            waves.append([d])
        else:
            wave.append(d)
    profiles = {}
    for wave in waves:
        procs = {}
        for d in wave:
            p = placements[d.name]
            cmd = [sys.executable, "-m", "coformer.runtime.cli", "profile", str(kit_dir), "--device", d.name,
                   "--out", str(out_dir / "profiles" / f"{d.name}.json"), "--cpu-share", str(p.cpu_share),
                   "--cpu-cores", cores_text(p.cores or [0]), "--throttle", throttle, "--threads", "1",
                   "--warmup", "50", "--no-progress"]
            for flag, value in (("--rounds", rounds), ("--duration", duration_s), ("--extra-rounds", extra_rounds)):
                if value is not None:
                    cmd += [flag, str(value)]
            procs[d.name] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for name, proc in procs.items():
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise CoFormerError(f"profiling {name} failed: {err.strip()[-2000:]}")
            profiles[name] = json.loads((out_dir / "profiles" / f"{name}.json").read_text())
    shutil.rmtree(kit_dir / "models", ignore_errors=True)
    return profiles


def time_teacher(onnx_path: Path, inputs_path: Path, out_path: Path, throttle: str, warmup: int) -> np.lib.npyio.NpzFile:
    """Time the teacher alone in its own process under the central (strongest) device's limits
    (core 0, share 1.0, one thread), with ``coformer-runtime time`` on every input of
    ``inputs_path``; returns its ``.npz`` (``latency_ms``, ``outputs``)."""
    cmd = [sys.executable, "-m", "coformer.runtime.cli", "time", str(onnx_path), "--inputs", str(inputs_path),
           "--out", str(out_path), "--cpu-cores", "0", "--cpu-share", "1.0", "--threads", "1",
           "--throttle", throttle, "--warmup", str(warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise CoFormerError(f"timing the teacher failed: {done.stderr.strip()[-2000:]}")
    return np.load(out_path)
