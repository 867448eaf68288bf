"""The `coformer` command as a user runs it: compile from a checkpoint on disk, serve, stop."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coformer.runtime.client import Client
from coformer.runtime.manifest import load_manifest

TIMM_KWARGS = {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10, "depth": 2}
DEVICES = """devices:
  - name: big
    memory_bytes: 1.0e9
    flops_budget: 1.0e9
    link_mbit_s: 100
    cpu_share: 1.0
  - name: small
    memory_bytes: 1.0e9
    flops_budget: 1.0e9
    link_mbit_s: 2
    cpu_share: 0.5
"""


def coformer(*args, **kw):
    return subprocess.run([sys.executable, "-m", "coformer.tools.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    import timm

    tmp = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_KWARGS)
    torch.save(model.state_dict(), tmp / "vit.pth")
    (tmp / "devices.yaml").write_text(DEVICES)
    done = coformer("compile", "--model", "timm:vit_tiny_patch16_224", "--checkpoint", tmp / "vit.pth",
                    "--model-kwargs", json.dumps(TIMM_KWARGS), "--devices", tmp / "devices.yaml",
                    "--out", tmp / "bundle", "--epochs", "1", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, done.stdout


def test_compile_from_a_local_timm_checkpoint(compiled):
    tmp, stdout = compiled
    m = load_manifest(tmp / "bundle")
    assert [d.device for d in m.devices] == ["big", "small"]
    assert m.model["name"] == "timm:vit_tiny_patch16_224" and m.model["shape"]["embed_dim"] == 192
    assert "ensemble" in stdout and "big" in stdout
    c = m.expected["collaboration"]  # what the small device adds to the big one alone, on the test split
    assert sorted(c["single_device"]) == ["big", "small"] and c["best_single_device"] in ("big", "small")
    assert c["gain"] == pytest.approx(m.expected["ensemble_accuracy"] - max(c["single_device"].values()))
    assert c["single_device"]["big"] == m.expected["degraded"]["small"]  # the central node alone is its fallback
    assert f"collaboration gain {100 * c['gain']:+.1f} points" in stdout and m.policy["decomposition"] == "nested"


def test_a_partition_refuses_a_policy_that_puts_a_unit_on_two_devices(compiled, coformer_here):
    tmp, _ = compiled
    policy = load_manifest(tmp / "bundle").policy  # nested: the small device's units are the big one's top ones
    (tmp / "nested-policy.json").write_text(json.dumps(policy))
    done = coformer_here("compile", "--model", "timm:vit_tiny_patch16_224", "--checkpoint", tmp / "vit.pth",
                    "--model-kwargs", json.dumps(TIMM_KWARGS), "--devices", tmp / "devices.yaml",
                    "--policy", tmp / "nested-policy.json", "--decomposition", "partition",
                    "--out", tmp / "partitioned", "--no-progress")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    shared = sorted(set(policy["submodels"][0]["channels"]) & set(policy["submodels"][1]["channels"]))
    assert f"C2-C4 (partition): channels {', '.join(map(str, shared[:12]))}" in done.stderr
    assert "on big and small" in done.stderr and not (tmp / "partitioned").exists()


def test_compile_rejects_an_infeasible_policy_and_keeps_the_old_bundle(compiled, coformer_here):
    tmp, _ = compiled
    before = (tmp / "bundle" / "manifest.json").read_bytes()
    policy = load_manifest(tmp / "bundle").policy
    policy["submodels"][1]["channels"] = list(range(192))  # both sub-models now keep >= 192 channels
    (tmp / "bad-policy.json").write_text(json.dumps(policy))
    done = coformer_here("compile", "--model", "timm:vit_tiny_patch16_224", "--checkpoint", tmp / "vit.pth",
                    "--model-kwargs", json.dumps(TIMM_KWARGS), "--devices", tmp / "devices.yaml",
                    "--policy", tmp / "bad-policy.json", "--out", tmp / "bundle", "--no-progress")
    assert done.returncode == 2
    assert "C2: embedding widths" in done.stderr and "exceed the teacher's d = 192" in done.stderr
    assert "Traceback" not in done.stderr
    assert (tmp / "bundle" / "manifest.json").read_bytes() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "timm:vit_tiny_patch16_224", "--checkpoint", "/nonexistent.pth"], "needs --checkpoint"),
        (["--model", "resnet50"], "expected 'quickstart', 'quickstart:mnist', 'timm:NAME' (with --checkpoint), 'timm-dir:PATH' or 'hf:PATH'"),
    ],
)
def test_compile_errors_are_one_clear_line(compiled, coformer_here, args, message):
    tmp, _ = compiled
    done = coformer_here("compile", *args, "--devices", tmp / "devices.yaml", "--out", tmp / "other")
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_serve_answers_clients_and_stops_cleanly_on_ctrl_c(compiled, tmp_path):
    tmp, _ = compiled
    proc = subprocess.Popen([sys.executable, "-m", "coformer.tools.cli", "serve", str(tmp / "bundle"),
                             "--front", "tcp://127.0.0.1:*", "--throttle", "none", "--log-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        endpoint = re.search(r"clients connect to (\S+) with --keys (\S+)", line)
        assert endpoint, line + proc.stderr.read() if proc.poll() is not None else line
        with Client(endpoint.group(1), keys=endpoint.group(2), timeout_s=20) as client:
            r = client.infer(np.zeros((2, 1, 16, 16), np.float32))
        assert r.logits.shape == (2, 10)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    leftovers = subprocess.run(["pgrep", "-f", str(tmp / "bundle")], capture_output=True, text=True).stdout.split()
    assert [p for p in leftovers if int(p) != os.getpid()] == []


def _children(pid: int) -> dict[int, str]:
    """Child processes of ``pid`` and their command lines, from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return out


def test_serve_restarts_a_dead_worker_answers_degraded_meanwhile_and_keeps_logs(compiled, tmp_path):
    import time

    tmp, _ = compiled
    name = load_manifest(tmp / "bundle").workers[-1].device
    err = open(tmp_path / "serve.err", "w")
    proc = subprocess.Popen([sys.executable, "-m", "coformer.tools.cli", "serve", str(tmp / "bundle"), "--front",
                             "tcp://127.0.0.1:*", "--throttle", "none", "--log-dir", str(tmp_path / "logs")],
                            stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = proc.stdout.readline()
        endpoint = re.search(r"clients connect to (\S+) with --keys (\S+)", line)
        assert endpoint, line + (tmp_path / "serve.err").read_text()
        victim = [pid for pid, cmd in _children(proc.pid).items() if f"--device {name} " in cmd]
        assert len(victim) == 1, _children(proc.pid)
        x = np.zeros((1, 1, 16, 16), np.float32)
        with Client(endpoint.group(1), keys=endpoint.group(2), timeout_s=20) as client:
            assert client.infer(x).degraded == ()
            os.kill(victim[0], signal.SIGKILL)
            seen, t0 = set(), time.monotonic()
            while time.monotonic() - t0 < 30:
                r = client.infer(x, deadline_s=1.0)
                seen.add(r.degraded)
                if r.degraded == () and (name,) in seen:
                    break
                time.sleep(0.05)
            assert seen == {(name,), ()}, seen  # degraded meanwhile, then full again
        assert proc.poll() is None  # still serving
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        err.close()
    assert f"worker-{name} exited with code -9" in (tmp_path / "serve.err").read_text()
    log = (tmp_path / "logs" / f"worker-{name}.log").read_text()
    assert log.count(f"worker {name}:") >= 2, log  # both runs' lines, kept after serve stopped


@pytest.fixture(scope="module")
def profiled(compiled):
    """The devices file with a real profile per device: a 10-entry kit timed on this machine."""
    import timm

    from coformer.compiler.profile_kit import sample_configs, write_kit
    from coformer.compiler.families import adapter_for
    from coformer.runtime.profile import profile_kit

    tmp, _ = compiled
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_KWARGS)
    shape = adapter_for(model).read_shape(model)
    write_kit(model, sample_configs(shape, 10), tmp / "kit", progress=False)
    for name in ("big", "small"):  # real timings of real kit models on this machine
        profile_kit(tmp / "kit", name, warmup_ms=5, iterations=5, duration_s=0.03, rounds=1, gap_iterations=3,
                    progress=False, out=tmp / f"{name}.json")
    (tmp / "devices-profiled.yaml").write_text(DEVICES.replace(
        "cpu_share: 1.0", f"cpu_share: 1.0\n    profile: {tmp / 'big.json'}").replace(
        "cpu_share: 0.5", f"cpu_share: 0.5\n    profile: {tmp / 'small.json'}"))
    return tmp / "devices-profiled.yaml"


def test_compile_searches_with_device_profiles_and_reports_every_method(compiled, profiled):
    tmp, _ = compiled
    args = ["compile", "--model", "timm:vit_tiny_patch16_224", "--checkpoint", tmp / "vit.pth",
            "--model-kwargs", json.dumps(TIMM_KWARGS), "--devices", tmp / "devices-profiled.yaml",
            "--out", tmp / "searched", "--epochs", "1", "--no-progress", "--compare", "--initial", "3",
            "--iterations", "2", "--report-json", tmp / "report.json"]
    done = coformer(*args, "--student")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp / "report.json").read_text())
    # the single-student baselines: "big" (the central device) alone, searched by DeBo over its
    # predictor within its whole budget, and within the compute time of CoFormer's slowest device
    from coformer.compiler.job import matched_student_flops

    students = report["students"]
    assert set(students) == {"student", "student_matched"}
    coformer_manifest = load_manifest(tmp / "searched")
    assert students["student_matched"]["flops_budget"] == matched_student_flops(coformer_manifest)
    for name, st in students.items():
        m = load_manifest(tmp / f"searched.{name}")
        assert [d.device for d in m.devices] == ["big"] and st["device"] == "big"
        assert m.policy["source"] == st["policy_source"] == "bo"
        assert st["flops"] == m.central.flops <= st["flops_budget"]
        assert 0 <= st["accuracy"] <= 1 and st["predicted_latency_ms"] > 0
        assert f"{name}: big alone" in done.stdout
    search = report["search"]
    assert search["evaluations"] == 5 and search["uniform"]["evaluations"] == 1
    assert {m: search[m]["best_objective"] > 0 for m in ("bo", "random", "uniform")} == dict.fromkeys(
        ("bo", "random", "uniform"), True)
    assert report["predicted_latency_ms"] == search["bo"]["predicted_latency_ms"] > 0
    # each device's predictor was fitted on its own 10 kit entries, some held out to score it
    for fit in report["predictor"].values():
        assert fit["n_train"] + fit["n_test"] == 10 and fit["n_test"] >= 1 and fit["rmse_ms"] >= 0
    assert set(report["predictor"]) == {"big", "small"}
    assert load_manifest(tmp / "searched").policy["source"] == "bo"
    # every evaluation was logged; a rerun replays the log instead of searching again
    log = (tmp / "searched.search.bo.jsonl").read_text().splitlines()
    assert len(log) == 5
    rerun = args[:-1]
    rerun[rerun.index("--epochs") + 1] = "0"  # only the search is compared
    again = coformer(*rerun, tmp / "report2.json", "--out", tmp / "searched2",
                     "--search-log", tmp / "searched.search")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp / "report2.json").read_text())["search"]["bo"]["best_objective"] == search["bo"]["best_objective"]
    assert len((tmp / "searched.search.bo.jsonl").read_text().splitlines()) == 5


def test_compile_measure_serves_the_bundle_beside_two_probes_and_predicts_it(compiled, profiled):
    tmp, _ = compiled
    done = coformer("compile", "--model", "timm:vit_tiny_patch16_224", "--checkpoint", tmp / "vit.pth",
                    "--model-kwargs", json.dumps(TIMM_KWARGS), "--devices", tmp / "devices-profiled.yaml",
                    "--out", tmp / "measured", "--epochs", "0", "--no-progress", "--initial", "2", "--iterations", "0",
                    "--measure", "--report-json", tmp / "measured.json")
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp / "measured.json").read_text())
    terms = r["predicted_latency_local_terms_ms"]
    probes = terms["probes"]
    assert r["measured_latency_ms"] > 0 and 0 < r["runtime_overhead_ms"] < probes["small"]["measured_ms"]
    assert probes["small"]["measured_ms"] < probes["uniform"]["measured_ms"]
    assert terms["t1"] == r["search"]["bo"]["t1_ms"] and r["predicted_latency_local_ms"] > 0
    assert "predicted for this machine" in done.stdout
    assert not list(tmp.glob("coformer-probe-*"))  # the probe bundles are removed
