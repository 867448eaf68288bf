"""The device install, as a user gets it: a fresh venv with only ``pip install -e '.[cpu]'``
(and one with ``[cpu,text]``), no torch, runs every ``coformer-runtime`` command against
bundles compiled in this (full) environment."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tools.test_serving import compiled  # noqa: F401  (the module's compiled bundle)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _venv(tmp: Path, extras: str) -> Path:
    """A venv holding the project with ``extras`` and nothing else; its python."""
    subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, timeout=300)
    python = tmp / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e",
                           f"{ROOT}[{extras}]"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"pip install -e '.[{extras}]' failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    gone = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert gone.returncode != 0, f"torch is importable in the [{extras}] venv"
    return python


def _rt(python: Path, *args, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "coformer.runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kw)


def test_the_cpu_install_runs_every_runtime_command(compiled, tmp_path):  # noqa: F811
    from coformer.compiler.profile_kit import write_kit
    from tests.conftest import tiny_vit

    result, data = compiled
    python = _venv(tmp_path / "venv", "cpu")
    bundle = result.bundle_dir
    keys = tmp_path / "keys"
    copy = tmp_path / "bundle"
    import shutil

    shutil.copytree(bundle, copy)
    done = _rt(python, "keys", keys, "--bundle", copy, "--clients", "laptop")
    assert done.returncode == 0, done.stderr
    done = _rt(python, "verify", copy, "--keys", keys / "edge-b")
    assert done.returncode == 0 and "signature checked" in done.stdout, done.stderr
    done = _rt(python, "sign", copy, "--key", keys / "operator" / "operator.signing")
    assert done.returncode == 0, done.stderr

    # central, two workers and a client, all from the runtime-only venv, authenticated
    central = subprocess.Popen([str(python), "-m", "coformer.runtime.cli", "central", str(copy), "--front",
                                "tcp://127.0.0.1:*", "--back", "tcp://127.0.0.1:*", "--keys", str(keys / "central"),
                                "--throttle", "none"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [central]
    try:
        ready = json.loads(central.stdout.readline() or "{}")
        assert ready.get("event") == "ready", central.stderr.read() if central.poll() is not None else ready
        for w in result.manifest.workers:
            procs.append(subprocess.Popen([str(python), "-m", "coformer.runtime.cli", "worker", str(copy), "--device",
                                           w.device, "--central", ready["back"], "--keys", str(keys / w.device),
                                           "--throttle", "none"], stderr=subprocess.DEVNULL))
        np.save(tmp_path / "x.npy", data.test.x[:1].numpy())
        with torch.no_grad():
            want = result.aggregator(*[s(data.test.x[:1]) for s in result.submodels]).argmax(-1).item()
        deadline = time.monotonic() + 60
        while True:
            done = _rt(python, "infer", copy, "--central", ready["front"], "--input", tmp_path / "x.npy",
                       "--keys", keys / "clients" / "laptop", "--timeout", "5")
            if done.returncode == 0 and "degraded" not in done.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["label"] == [str(want)]
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)

    # time, benchmark and profile, on the device side
    done = _rt(python, "time", bundle / result.manifest.central.artifact, "--inputs", tmp_path / "x.npy",
               "--out", tmp_path / "t.npz", "--warmup", "1", "--throttle", "none")
    assert done.returncode == 0 and "median" in done.stdout, done.stderr
    done = _rt(python, "benchmark", bundle / result.manifest.central.artifact, "--duration", "0.2", "--warmup", "10",
               "--throttle", "none")
    assert done.returncode == 0 and "Throughput:" in done.stdout and "GPU Compute Time:" in done.stdout, done.stderr
    write_kit(tiny_vit(), [(1, 16, 1, 16), (2, 32, 2, 64)], tmp_path / "kit", progress=False)
    done = _rt(python, "profile", tmp_path / "kit", "--out", tmp_path / "dev.json", "--rounds", "1", "--duration",
               "0.05", "--iterations", "3", "--warmup", "5", "--gap", "0", "--extra-rounds", "0", "--no-progress",
               "--throttle", "none", timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(json.loads((tmp_path / "dev.json").read_text())["entries"]) == 2


def test_the_cpu_text_install_tokenises_and_serves_text(tmp_path):
    from coformer.tools.cluster import LocalCluster
    from tests.tools.test_text_serving import TEXTS, _compile

    result = _compile("bert", tmp_path)
    python = _venv(tmp_path / "venv", "cpu,text")
    with LocalCluster(result.bundle_dir, throttle="none", secure=False) as c:
        done = _rt(python, "infer", result.bundle_dir, "--central", c.endpoints["front"], "--text", *TEXTS)
        with c.client() as client:
            from coformer.runtime.text import TextEncoder

            labels, _ = client.classify(TEXTS, TextEncoder.from_bundle(result.bundle_dir), result.manifest.labels)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["label"] == labels  # the runtime-only client answers as the full one
