"""`coformer bench`, run as a user would (console script, real processes, real sockets),
on a `quickstart --fast` run: on loopback everywhere, and on the testbed where root allows."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.tools.test_quickstart import _coformer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart_dir(quickstart_fast):
    """The session's quickstart run (tests/conftest.py); the bench adds its baselines there."""
    qs, env, _, _ = quickstart_fast
    return qs, env


def _load(args):
    return [] if "--throughput" in args else ["--throughput", "none"]  # the loopback test measures it


def _bench(args, env, timeout=900):
    return subprocess.run([_coformer(), "bench", *args, *_load(args), "--no-progress"], capture_output=True,
                          text=True, env=env, timeout=timeout)


def _bench_refused(coformer_here, args, env):
    """A bench the test expects refused, run in this process (tests/conftest.py, ``coformer_here``)."""
    return coformer_here("bench", *args, *_load(args), "--no-progress", env=env)


def test_bench_on_loopback_runs_every_strategy_and_writes_its_reports(quickstart_dir, tmp_path):
    qs, env = quickstart_dir
    report_path = tmp_path / "r.json"
    done = _bench(["--quickstart", str(qs), "--no-testbed", "--samples", "15", "--out", str(tmp_path / "out"),
                   "--report-json", str(report_path), "--throughput", "1,8", "--throughput-seconds", "0.3",
                   "--prism-finetune-epochs", "1"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(report_path.read_text())
    rows = {(x["strategy"], x["input_source"]): x for x in r["results"]}
    assert set(rows) == {("coformer", "device"), ("coformer", "central"), ("uniform", "device"),
                         ("uniform", "central"), ("student", "central"), ("student_matched", "central"),
                         ("teacher", "central"), ("pipeline", "central"), ("tensor_parallel", "central"),
                         ("prism_cr4", "device"), ("prism_cr4", "central"), ("prism_cr16", "device"),
                         ("prism_cr16", "central")}
    for x in r["results"]:
        assert x["samples"] == 15 and x["passes"] == 3 and x["bandwidth"] == "loopback"
        assert {"median", "p90", "p99"} <= set(x["latency_ms"])
        assert set(x["breakdown_ms"]) == {"compute", "transfer", "aggregation", "other"}
        assert "bytes_per_inference" in x and "peak_memory_bytes" in x
        # answers per second with 1 and 8 concurrent clients, every answer the one-at-a-time one
        assert set(x["throughput"]) == {"1", "8"}, x["strategy"]
        for t in x["throughput"].values():
            assert t["answers"] > 0 and t["errors"] == 0 and t["mismatched"] == 0, (x["strategy"], t)
    # pipeline and tensor parallelism compute the teacher's function exactly
    assert rows["pipeline", "central"]["agreement_with_teacher"] == 1.0
    assert rows["tensor_parallel", "central"]["agreement_with_teacher"] == 1.0
    assert rows["teacher", "central"]["bytes_per_inference"] == 0
    # PRISM: with the input at every device only the K/V Segment Means travel, as many bytes as
    # its plan says (plus a header per message); a higher CR sends fewer
    for cr in (4, 16):
        x = rows[f"prism_cr{cr}", "device"]
        predicted = x["prism"]["predicted"]
        assert x["prism"]["compression_rate"] == cr and x["rounds"] == predicted["rounds_per_inference"]
        tuned = x["prism"]["finetune"]  # tuned first, and kept only where validation accuracy rose
        val = tuned["validation"]
        assert tuned["epochs"] == 1 and tuned["kept"] == (val["after"]["accuracy"] > val["before"]["accuracy"])
        assert predicted["bytes_per_inference"] < x["bytes_per_inference"] < (predicted["bytes_per_inference"]
                                                                               + 4 * 400 * x["rounds"])
    assert rows["prism_cr16", "device"]["bytes_per_inference"] < rows["prism_cr4", "device"]["bytes_per_inference"]
    # with the input at every device only an index goes out; from the central node, the image does
    dev, cen = rows["coformer", "device"], rows["coformer", "central"]
    image = 16 * 16 * 4
    assert dev["bytes_to_devices"] < 2 * 300
    assert cen["bytes_to_devices"] > 2 * image
    assert dev["bytes_from_devices"] == pytest.approx(cen["bytes_from_devices"], abs=40)
    # features are far smaller than the token tensors a pipeline forwards
    assert rows["pipeline", "central"]["bytes_per_inference"] > 5 * dev["bytes_per_inference"]
    ratio = next(x for x in r["ratios"] if x["input_source"] == "device")
    assert ratio["speedup_vs_pipeline"] == pytest.approx(
        rows["pipeline", "central"]["latency_ms"]["median"] / dev["latency_ms"]["median"])
    assert ratio["throughput_8x_vs_teacher"] == pytest.approx(
        dev["throughput"]["8"]["answers_per_s"] / rows["teacher", "central"]["throughput"]["8"]["answers_per_s"])
    # the students: one sub-model on edge-a alone, searched by DeBo over edge-a's predictor as
    # CoFormer's are, within its budget and within the compute time of CoFormer's slowest device
    from coformer.runtime.manifest import load_manifest
    from coformer.compiler.job import matched_student_flops

    coformer = load_manifest(qs / "bundle")
    student, matched = (load_manifest(qs / "baselines" / s) for s in ("student", "student_matched"))
    assert [d.device for d in student.devices] == [d.device for d in matched.devices] == ["edge-a"]
    budget = next(d["flops_budget"] for d in json.loads((qs / "report.json").read_text())["devices"]
                  if d["name"] == "edge-a")
    assert matched_student_flops(coformer) < budget
    assert matched.central.flops <= matched_student_flops(coformer) and student.central.flops <= budget
    for name in ("student", "student_matched"):
        assert rows[name, "central"]["policy_source"] == "bo" and rows[name, "central"]["devices_used"] == 1
        assert rows[name, "central"]["flops_budget"] == (budget if name == "student" else matched_student_flops(coformer))
        assert rows[name, "central"]["bytes_per_inference"] == 0  # nothing crosses a link
        assert ratio[f"speedup_vs_{name}"] == pytest.approx(
            rows[name, "central"]["latency_ms"]["median"] / dev["latency_ms"]["median"])
        assert ratio[f"accuracy_vs_{name}_points"] == pytest.approx(
            100 * (dev["accuracy"] - rows[name, "central"]["accuracy"]))
    # every decomposed row is held against its physical limit; on loopback the wire is free,
    # so the limit is the slowest device's compute plus the aggregation
    for key, x in rows.items():
        assert ("limit_ms" in x) == (key[0] in ("coformer", "uniform", "student", "student_matched"))
    for x in (dev, cen, rows["student", "central"]):
        slowest = max(x["limit_terms_ms"]["devices"].values())
        assert x["limit_ms"] == pytest.approx(slowest + x["breakdown_ms_median"]["aggregate"])
        assert x["measured_over_limit"] == pytest.approx(x["latency_ms"]["median"] / x["limit_ms"])
        assert x["measured_over_limit"] > 1.0
    # what the other devices add to the best one alone, as the compile measured it, in every decomposed row
    for x in (dev, cen):
        assert x["collaboration"] == coformer.expected["collaboration"] and x["decomposition"] == "nested"
    assert set(coformer.expected["collaboration"]["single_device"]) == {"edge-a", "edge-b", "edge-c"}
    assert rows["uniform", "central"]["collaboration"]["gain"] is not None
    assert rows["student", "central"]["collaboration"] is None  # one device: nothing to add
    out = tmp_path / "out"
    gain = 100 * coformer.expected["collaboration"]["gain"]
    assert f"coformer on 3 devices (nested): {gain:+.1f} points over" in (out / "bench.md").read_text()
    assert (out / "bench.md").read_text().count("| coformer |") == 2
    assert {"latency_breakdown.png", "accuracy_vs_latency.png"} <= set(r["plots"])
    for name in r["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speedup vs pipeline" in done.stdout
    # the baselines are reused by a second run, not rebuilt
    stamp = qs / "baselines" / "pipeline" / "built-from.txt"
    before = stamp.stat().st_mtime_ns
    done = _bench(["--quickstart", str(qs), "--no-testbed", "--samples", "10", "--strategies", "pipeline,teacher",
                   "--out", str(tmp_path / "out2")], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert stamp.stat().st_mtime_ns == before


def test_bench_of_a_compiled_bundle_with_its_timm_teacher(quickstart_dir, coformer_here, tmp_path):
    """The general path: BUNDLE, --model timm:NAME --checkpoint, --devices (here the fast
    quickstart's teacher, rebuilt by timm from its config)."""
    qs, env = quickstart_dir
    r = json.loads((qs / "report.json").read_text())
    cfg = r["teacher"]["config"]
    kwargs = {"img_size": cfg["img_size"], "patch_size": cfg["patch_size"], "embed_dim": cfg["embed_dim"],
              "depth": cfg["depth"], "num_heads": cfg["num_heads"], "in_chans": 1, "num_classes": 10,
              "global_pool": "avg"}
    lines = ["devices:"] + [f"  - {{name: {d['name']}, memory_bytes: 536870912, flops_budget: {d['flops_budget']}, "
                            f"link_mbit_s: 2, cpu_share: {d['cpu_share']}}}" for d in r["devices"]]
    (tmp_path / "devices.yaml").write_text("\n".join(lines) + "\n")
    done = _bench([str(qs / "bundle"), "--model", "timm:vit_tiny_patch16_224", "--checkpoint", r["teacher"]["checkpoint"],
                   "--model-kwargs", json.dumps(kwargs), "--devices", str(tmp_path / "devices.yaml"),
                   "--strategies", "coformer,pipeline", "--input-source", "device", "--no-testbed", "--samples", "10",
                   "--out", str(tmp_path / "out"), "--report-json", str(tmp_path / "r.json")], env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {x["strategy"]: x for x in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert set(rows) == {"coformer", "pipeline"} and rows["pipeline"]["samples"] == 10
    assert rows["pipeline"]["bytes_per_inference"] > rows["coformer"]["bytes_per_inference"]
    # devices that do not match the bundle are refused by name
    (tmp_path / "other.yaml").write_text(lines[0] + "\n" + lines[1].replace(r["devices"][0]["name"], "jetson") + "\n")
    done = _bench_refused(coformer_here, [str(qs / "bundle"), "--model", "quickstart", "--devices",
                                          str(tmp_path / "other.yaml"), "--no-testbed"], env)
    assert done.returncode != 0 and "jetson" in done.stderr


def test_ablations_on_the_quickstart_give_three_tables_with_verdicts(quickstart_dir, coformer_here, tmp_path):
    qs, env = quickstart_dir
    done = _bench(["--quickstart", str(qs), "--ablations", "--out", str(tmp_path / "abl"), "--report-json",
                   str(tmp_path / "abl.json")], env)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp_path / "abl.json").read_text())
    tables = r["tables"]
    assert [x["key"] for x in tables["calibration"]] == ["boosting", "independent", "uncalibrated"]
    assert [x["key"] for x in tables["aggregation"]] == ["learned", "average", "majority_voting"]
    assert [x["key"] for x in tables["policy"]] == ["heuristic", "debo"]
    for rows in tables.values():
        for x in rows:
            assert 0.0 <= x["accuracy"]["mean"] <= 1.0 and len(x["accuracy"]["per_seed"]) == 1
    # the learned aggregator's row is the boosted calibration's: the same sub-models, the same bundle
    assert tables["aggregation"][0]["accuracy"] == tables["calibration"][0]["accuracy"]
    heuristic, debo = tables["policy"]
    if debo["within_cap"][0]:  # DeBo's choice is held to the heuristic's predicted latency
        assert debo["predicted_latency_ms"]["mean"] <= heuristic["predicted_latency_ms"]["mean"]
    assert set(r["verdicts"]) == {"calibration", "aggregation", "policy"}
    md = (tmp_path / "abl" / "ablations.md").read_text()
    assert md.count("| method |") == 3 and "majority voting" in done.stdout
    assert not list((tmp_path / "abl").glob("coformer-ablations-*"))  # its compiles are cleaned up
    refused = _bench_refused(coformer_here, ["--quickstart", str(qs), "--ablations", "--ablation-seeds", "0,x"], env)
    assert refused.returncode != 0 and "--ablation-seeds '0,x'" in refused.stderr


def test_fronts_plot_accuracy_against_latency_and_name_the_winner_at_the_target(quickstart_dir, tmp_path):
    from coformer.tools.bench.fronts import verdict

    qs, env = quickstart_dir
    out = tmp_path / "fronts"
    done = _bench(["--quickstart", str(qs), "--fronts", "--no-testbed", "--fronts-fractions", "0.25,0.5",
                   "--devices-count", "2", "--samples", "15", "--passes", "1", "--target-ms", "1000",
                   "--out", str(out)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((out / "fronts.json").read_text())
    curves = {}
    for p in r["points"]:
        assert p["status"] == "ok", p
        curves.setdefault(p["curve"], []).append(p)
    assert set(curves) == {"student (1 device)", "CoFormer, 2 devices", "uniform, 2 devices"}
    t_flops, shares = r["teacher"]["flops"], [1.0, 0.6]  # the quickstart's devices' shares
    for name, pts in curves.items():
        assert sorted(p["fraction"] for p in pts) == [0.25, 0.5]
        for p in pts:  # each size within its devices' budgets: fraction x share x the teacher's FLOPs
            assert 0 < p["flops"] <= p["fraction"] * sum(shares[:p["devices"]]) * t_flops
            assert 0.0 <= p["accuracy"] <= 1.0 and p["median_ms"] > 0 and p["samples"] == 15
            assert 0.0 <= p["test_split_accuracy"] <= 1.0 and p["test_split_samples"] == 360  # digits' test split
            assert (p["collaboration_gain"] is None) == (p["devices"] == 1)
    # a 1000 ms target admits every point: the winner is the most accurate curve (on the whole
    # test split, which every point has), or the fastest within its noise, and says so
    at, top = r["at_target"], max(p["test_split_accuracy"] for p in r["points"])
    assert max(v["accuracy"] for v in at.values()) == top
    from coformer.tools.bench.fronts import TIE_SE

    noise = TIE_SE * (top * (1 - top) / 360) ** 0.5
    tied = {c: v for c, v in at.items() if top - v["accuracy"] <= noise}
    assert r["scored_on"] == "test_split_accuracy" and r["winner"] == min(tied, key=lambda c: tied[c]["median_ms"])
    assert r["sentence"].startswith(f"At 1000.00 ms (given; accuracy on the whole test split), {r['winner']} wins")
    assert r["sentence"] in done.stdout and r["sentence"] in (out / "fronts.md").read_text()
    assert (out / "fronts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and r["plot"] == "fronts.png"
    assert len(r["teacher"]["teacher_ms_per_run"]) == 2  # one bench run per fraction, each timing the teacher
    # a target below every point: nothing wins, and the sentence names the fastest instead
    none = verdict({**r, "target_ms": 1e-3, "target_source": "given"})
    fastest = min(r["points"], key=lambda p: p["median_ms"])
    assert none["winner"] is None and f"the fastest is {fastest['curve']}" in none["sentence"]


@pytest.mark.parametrize("args, message", [
    (["--bandwidth", "2mbps"], "--bandwidth '2mbps'"),
    (["--strategies", "coformer,ring"], "'ring' is not one of"),
    (["--input-source", "cloud"], "'cloud' is not one of"),
    (["--samples", "0"], "--samples 0"),
    (["--passes", "0"], "--passes 0"),
    (["--throughput", "1,x"], "--throughput 'x'"),
    (["--throughput-seconds", "0"], "--throughput-seconds 0"),
    (["--no-testbed", "--bandwidth", "2mbit,1gbit"], "needs the testbed"),
    (["--fronts", "--no-testbed", "--fronts-fractions", "0.25,1.5"], "--fronts-fractions '1.5'"),
    (["--fronts", "--no-testbed", "--devices-count", "1"], "--devices-count [1]"),
    (["--fronts", "--ablations"], "--ablations and --fronts are separate runs"),
])
def test_bench_refuses_bad_arguments_by_name(quickstart_dir, coformer_here, args, message):
    qs, env = quickstart_dir
    done = _bench_refused(coformer_here, ["--quickstart", str(qs), *args], env)
    assert done.returncode != 0
    assert message in done.stderr


def _testbed_reason() -> str:
    if os.geteuid() != 0:
        return "needs root for network namespaces, tc and cgroups"
    from coformer.runtime.errors import CoFormerError
    from coformer.tools import testbed

    try:
        testbed.check_can_run()
    except CoFormerError as e:
        return str(e)
    return ""


@pytest.mark.testbed
@pytest.mark.skipif(bool(_testbed_reason()), reason=_testbed_reason() or "testbed available")
def test_bench_on_the_testbed_then_killed_mid_run_leaves_nothing(quickstart_dir, tmp_path):
    from coformer.tools import testbed

    qs, env = quickstart_dir
    report_path = tmp_path / "r.json"
    # a second bench at the same time, on its own testbed: neither tears the other's down
    other = subprocess.Popen([_coformer(), "bench", "--quickstart", str(qs), "--strategies", "teacher", "--samples",
                              "10", "--out", str(tmp_path / "other"), "--throughput", "none", "--no-progress"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = _bench(["--quickstart", str(qs), "--bandwidth", "2mbit", "--samples", "12", "--max-seconds", "20",
                   "--strategies", "coformer,teacher,pipeline,tensor_parallel", "--out", str(tmp_path / "out"),
                   "--report-json", str(report_path)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert other.wait(timeout=300) == 0, other.stderr.read()[-3000:]
    (alone,) = json.loads((tmp_path / "other" / "bench.json").read_text())["results"]
    assert alone["status"] == "ok", alone
    r = json.loads(report_path.read_text())
    rows = {(x["strategy"], x["input_source"]): x for x in r["results"]}
    assert all(x["bandwidth"] == "2mbit" for x in r["results"])
    # at 2 Mbit/s a token tensor (17 x 96 floats, 6.5 KB) takes ~26 ms a hop; features a fraction of that
    pipe, tp, dev = rows["pipeline", "central"], rows["tensor_parallel", "central"], rows["coformer", "device"]
    assert pipe["latency_ms"]["median"] > 2 * 26
    assert tp["latency_ms"]["median"] > pipe["latency_ms"]["median"]
    assert dev["latency_ms"]["median"] < pipe["latency_ms"]["median"] / 2
    assert pipe["breakdown_ms"]["transfer"] > pipe["breakdown_ms"]["compute"]
    # at 2 Mbit/s the limit charges each worker its features' wire time: 8 bits a byte at 2,000 bits a ms
    for name, term in dev["limit_terms_ms"]["devices"].items():
        if name != "edge-a":
            wire = term - dev["breakdown_ms_median"][f"worker_compute.{name}"]
            assert wire > 8 * 4 * 8 / 2000  # at least 8 float32 channels
    assert dev["measured_over_limit"] > 1.0
    for x in r["results"]:  # each device's memory cgroup saw the processes run in it
        assert all(v and v > 10 << 20 for v in x["peak_memory_bytes"].values()), x["peak_memory_bytes"]
    assert r["memory"]["teacher"]["status"] in ("ok", "out_of_memory")
    assert r["memory"]["submodel"]["status"] == "ok"
    assert not any(testbed.leftovers().values())

    # killed mid-run: `testbed down` still removes everything, processes included
    proc = subprocess.Popen([_coformer(), "bench", "--quickstart", str(qs), "--samples", "200",
                             "--strategies", "tensor_parallel", "--out", str(tmp_path / "killed"), "--throughput",
                             "none", "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
            "worker" in (Path(f"/proc/{p}/cmdline").read_bytes() if Path(f"/proc/{p}").exists() else b"").decode(errors="replace")
            for ns in testbed.leftovers()["namespaces"]
            for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(testbed.leftovers().values()), "the bench was killed before it set the testbed up"
    done = subprocess.run([_coformer(), "testbed", "down"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not any(testbed.leftovers().values())


@pytest.mark.testbed
@pytest.mark.skipif(bool(_testbed_reason()), reason=_testbed_reason() or "testbed available")
def test_a_strategy_that_does_not_fit_its_device_is_reported_out_of_memory(tmp_path):
    import numpy as np
    import torch

    from coformer.compiler.baselines import build_baseline
    from coformer.compiler.specs import DeviceSpec
    from coformer.tools import testbed
    from coformer.tools.bench import run_bench
    from tests.conftest import tiny_vit

    teacher = tiny_vit(depth=2)
    x = torch.randn(12, 1, 16, 16)
    roomy = [DeviceSpec(name="edge-a", memory_bytes=1 << 30, flops_budget=10**9, link_mbit_s=100.0, cpu_share=1.0)]
    build_baseline("teacher", teacher, roomy, x, tmp_path / "teacher", [str(i) for i in range(10)], {})
    # 24 MiB cannot hold a Python process with ONNX Runtime loaded
    tight = [DeviceSpec(name="edge-a", memory_bytes=24 << 20, flops_budget=10**9, link_mbit_s=100.0, cpu_share=1.0)]
    start = time.monotonic()
    r = run_bench([(tight, {"teacher": tmp_path / "teacher"})], x.numpy(), np.zeros(12, dtype=np.int64),
                  tmp_path / "out", [100.0], ["central"], samples=12, progress=False)
    assert time.monotonic() - start < 90  # reported, not hung
    (row,) = r["results"]
    assert row["status"] == "out_of_memory" and row["out_of_memory_on"] == ["edge-a"], row
    assert "out_of_memory edge-a" in (tmp_path / "out" / "bench.md").read_text()
    assert not any(testbed.leftovers().values())


def test_baselines_are_rebuilt_when_any_weight_changes():
    """The cache key covers every byte of the teacher: a change at the end of a large tensor
    (a retrained last row) must not reuse bundles built from the old weights."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from coformer.tools.bench import bundles_digest

    torch.manual_seed(0)
    teacher = VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=1,
                                num_heads=2)
    before = bundles_digest(teacher, [], 5, 60, 0)
    assert bundles_digest(teacher, [], 5, 60, 0) == before and bundles_digest(teacher, [], 5, 60, 1) != before
    fc1 = teacher.blocks[0].mlp.fc1.weight  # 384 x 96 floats: 147 KB
    with torch.no_grad():
        fc1[-1, -1] += 1.0
    assert bundles_digest(teacher, [], 5, 60, 0) != before


def test_the_physical_limit_charges_each_worker_its_features_on_the_wire():
    from types import SimpleNamespace as NS

    from coformer.tools.bench.report import physical_limit

    workers = [NS(device="b", feature_dim=250), NS(device="c", feature_dim=100)]
    manifest = NS(central=NS(device="a"), workers=workers, feature_dtype="float32")
    row = {"breakdown_ms_median": {"central_compute": 3.0, "worker_compute.b": 1.0, "worker_compute.c": 2.5,
                                   "aggregate": 0.5},
           "bytes_to_devices": 200, "bytes_from_devices": 1400 + 200, "latency_ms": {"median": 12.0}}
    # 1 Mbit/s = 1,000 bits a ms; b: (1,000 feature bytes + 200 of the 400 beyond) * 8 = 9.6 ms,
    # c: (400 + 200) * 8 = 4.8 ms
    at_1mbit = physical_limit(row, manifest, 1.0)
    assert at_1mbit["limit_terms_ms"]["devices"] == pytest.approx({"a": 3.0, "b": 1.0 + 9.6, "c": 2.5 + 4.8})
    assert at_1mbit["limit_ms"] == pytest.approx(10.6 + 0.5)
    assert at_1mbit["measured_over_limit"] == pytest.approx(12.0 / 11.1)
    assert physical_limit(row, manifest, None)["limit_ms"] == pytest.approx(3.0 + 0.5)  # loopback: compute bound
    # b's term is mostly wire: the row suggests float16 features, which charge 2 bytes a channel
    assert "--feature-dtype float16" in at_1mbit["hint"]
    half = physical_limit(row, NS(central=NS(device="a"), workers=workers, feature_dtype="float16"), 1.0)
    # b: (500 feature bytes + 550, its half of the 1,100 beyond the 700 of features) * 8 = 8.4 ms
    assert half["limit_terms_ms"]["devices"]["b"] == pytest.approx(1.0 + (500 + 550) * 8 / 1000)
    assert "hint" not in half and half["feature_dtype"] == "float16"


def test_fronts_call_a_lead_within_the_noise_a_tie_that_the_faster_wins():
    """A 0.1-point lead on 1,000 test images is noise: the faster curve wins, and the sentence
    says the other was as accurate and slower; on a million images the lead counts."""
    from coformer.tools.bench.fronts import verdict

    def point(curve, acc, ms, n):
        return {"curve": curve, "status": "ok", "accuracy": acc, "test_split_accuracy": acc, "median_ms": ms,
                "fraction": 0.25, "test_split_samples": n}

    for n, winner in ((1000, "student (1 device)"), (10**6, "CoFormer, 2 devices")):
        r = verdict({"target_ms": 5.0, "target_source": "given",
                     "points": [point("CoFormer, 2 devices", 0.926, 2.54, n), point("student (1 device)", 0.925, 1.53, n)]})
        assert r["winner"] == winner, r
    assert "as accurate within the noise" in verdict({"target_ms": 5.0, "target_source": "given", "points": [
        point("CoFormer, 2 devices", 0.926, 2.54, 1000), point("student (1 device)", 0.925, 1.53, 1000)]})["sentence"]
