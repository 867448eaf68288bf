"""`coformer quickstart --fast`, run as a user would: the console script, real processes."""

import os
import shutil
import subprocess

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _coformer() -> str:
    """The installed console script, next to this interpreter (or on PATH)."""
    sibling = Path(sys.executable).parent / "coformer"
    exe = str(sibling) if sibling.exists() else shutil.which("coformer")
    assert exe, "the coformer console script is not installed"
    return exe


@pytest.mark.slow
def test_quickstart_fast_runs_end_to_end_and_reports(quickstart_fast):
    qs, env, r, done = quickstart_fast
    for key in ("teacher_accuracy", "ensemble_accuracy", "submodel_accuracies", "teacher_latency_ms",
                "collaborative_latency_ms", "speedup", "bytes_per_inference", "devices"):
        assert key in r
    assert len(r["submodel_accuracies"]) == 3 and len(r["devices"]) == 3
    for d in r["devices"]:
        assert d["flops"] <= d["flops_budget"]
    assert {"median", "p90"} <= set(r["collaborative_latency_ms"])
    assert r["speedup"] == pytest.approx(r["teacher_latency_ms"]["median"] / r["collaborative_latency_ms"]["median"])
    # wire bytes: the two workers' pooled features plus a small header each
    assert r["feature_payload_bytes"] < r["bytes_per_inference"] <= r["feature_payload_bytes"] + 400
    # the served ensemble answers as the in-process one did (same split, same ONNX numerics)
    assert abs(r["ensemble_accuracy"] - r["pytorch_accuracy"]["ensemble_accuracy"]) <= 0.01
    assert "speedup" in done.stdout and (qs / "bundle" / "manifest.json").is_file()
    # what edge-b and edge-c add to the best device alone, printed as the compile measured it
    c = r["pytorch_accuracy"]["collaboration"]
    assert c["gain"] == pytest.approx(r["pytorch_accuracy"]["ensemble_accuracy"] - max(c["single_device"].values()))
    assert f"collaboration gain {100 * c['gain']:+.1f} points" in done.stdout
    # the search ran on profiles of the emulated devices, with both baselines
    for method in ("bo", "random", "uniform"):
        assert isinstance(r["search"][method]["best_objective"], float)
    assert r["search"]["bo"]["evaluations"] == r["search"]["random"]["evaluations"] == 8
    assert set(r["predictor"]) == {"edge-a", "edge-b", "edge-c"}
    for fit in r["predictor"].values():
        assert {"within_10pct", "within_5pct", "mape", "rmse_ms", "n_train", "n_test"} <= set(fit)
    assert r["predicted_latency_ms"] > 0 and r["measured_latency_ms"] == r["collaborative_latency_ms"]["median"]
    # the prediction: calibrated on probe bundles served beside the bundle (the smallest
    # sub-models, the uniform decomposition at 1, 2, ... layers and all). The ends differ
    # in size many times over, so the smallest computes less than the whole uniform
    # decomposition. Neighbours on the ladder (the small probe and the uniform one at 1
    # layer) are both mostly the runtime's fixed cost, as are the round trips of this
    # tiny teacher (CI measured 2.46 and 2.67 ms for the ends), so their order is this
    # machine's noise and is not asserted.
    pt = r["predicted_latency_terms_ms"]
    assert pt["t1"] == r["search"]["bo"]["t1_ms"] and len(pt["t1_served"]) == 3
    probes = sorted(pt["probes"].values(), key=lambda p: p["compute_ms"])
    small, uniform = pt["probes"]["small"], pt["probes"]["uniform"]
    assert len(probes) >= 3
    assert small["compute_ms"] < uniform["compute_ms"]
    assert r["probe_latency_ms"] == {k: p["measured_ms"] for k, p in pt["probes"].items()}
    # read off the probes' measured round trips at the policy's served compute: between the two
    # probes that bracket it, or on the end segment's line beyond them
    from coformer.tools.measure import interpolate

    line = [(p["compute_ms"], p["measured_ms"]) for p in probes]
    assert r["predicted_latency_ms"] == pytest.approx(interpolate(pt["compute_ms"], line))
    below = [p for p in probes if p["compute_ms"] <= pt["compute_ms"]]
    above = [p for p in probes if p["compute_ms"] > pt["compute_ms"]]
    if below and above:
        lo, hi = sorted((below[-1]["measured_ms"], above[0]["measured_ms"]))
        assert lo <= r["predicted_latency_ms"] <= hi
    assert r["prediction_error"] == pytest.approx(r["predicted_latency_ms"] / r["measured_latency_ms"] - 1)
    assert not list(qs.glob("probe-*"))  # the probe bundles are removed
    assert not (qs / "kit" / "models").exists()  # the kit's ONNX files are removed
    assert "teacher: training" in done.stderr
    assert 0 <= r["teacher"]["onnx_parity"] <= 1e-4  # the teacher timed is the teacher evaluated


def test_without_compare_the_report_prints_no_uncalibrated_prediction(quickstart_fast):
    """The default run skips the probe bundles: its summary must not claim a calibration."""
    from coformer.tools.quickstart import format_report

    _, _, r, _ = quickstart_fast
    plain = {**r, "predicted_latency_ms": r["search"]["bo"]["predicted_latency_ms"],
             "predicted_latency_terms_ms": {"T_eq3": r["search"]["bo"]["predicted_latency_ms"], "calibrated": False},
             "search": {"bo": r["search"]["bo"], "evaluations": r["search"]["evaluations"]}}
    text = format_report(plain)
    assert "--compare calibrates it" in text and "leaves out the runtime's own cost" in text
    assert "probe bundles served beside it" not in text and "random" not in text
    # an uncalibrated prediction is not printed (it was 46% under the served latency): no number but the measured
    assert f"{plain['predicted_latency_ms']:.2f} ms" not in text
    assert "probe bundles served beside it" in format_report(r)


def test_a_second_quickstart_finds_its_teacher_cached(quickstart_fast, monkeypatch):
    """The teacher the run trained is found again under the same cache, without training, with
    the run's own weights (what a second ``coformer quickstart`` starts from)."""
    import torch

    from coformer.calibration import train
    from coformer.compiler.builtin import quickstart_teacher
    from coformer.tools.quickstart import FAST

    _, env, r, _ = quickstart_fast
    monkeypatch.setenv("COFORMER_CACHE_DIR", env["COFORMER_CACHE_DIR"])
    monkeypatch.setattr(train, "train_classifier", lambda *a, **k: pytest.fail("the cached teacher was trained again"))
    said = []
    model, path = quickstart_teacher(FAST.teacher, progress=False, say=said.append)
    assert str(path) == r["teacher"]["checkpoint"] and said == [f"teacher: cached at {path}"]
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_quickstart_refuses_to_overwrite_a_folder_that_is_not_a_bundle(tmp_path):
    exe = _coformer()
    (tmp_path / "qs" / "bundle").mkdir(parents=True)
    (tmp_path / "qs" / "bundle" / "precious.txt").write_text("mine")
    env = {**os.environ, "COFORMER_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([exe, "quickstart", "--fast", "--out", str(tmp_path / "qs"), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 2
    assert "is not a CoFormer bundle" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "qs" / "bundle" / "precious.txt").read_text() == "mine"


@pytest.mark.slow
def test_search_bench_compares_debo_and_random_over_fresh_profile_sets(quickstart_fast, tmp_path):
    """The second profile set is the devices profiled afresh: new predictors, so the uniform
    decomposition (one policy) is predicted at another latency, and its objective differs."""
    qs, env, _, _ = quickstart_fast
    out = tmp_path / "search.json"
    done = subprocess.run([sys.executable, "-m", "experiments.search_bench", "--quickstart-dir", str(qs),
                           "--seeds", "2", "--profile-sets", "2", "--initial", "2", "--iterations", "2",
                           "--throttle", "duty-cycle", "--report-json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600,
                          cwd=REPO)  # experiments/ runs from the repository root, not installed
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    r = json.loads(out.read_text())
    assert r["pairs"] == 4 and r["profile_sets"] == 2 and len(r["uniform"]) == 2
    assert [(x["profile_set"], x["seed"]) for x in r["rows"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert r["uniform"][0] != r["uniform"][1]
    assert r["bo_better"] == sum(x["bo"] < x["random"] for x in r["rows"]) and sum(r["per_set_bo_better"]) == r["bo_better"]
    assert f"BO better than random on {r['bo_better']} of 4 (profile set, seed) pairs" in done.stdout
    import tempfile

    assert not list(Path(tempfile.gettempdir()).glob("coformer-search-bench-*"))  # the fresh kits are removed


def test_quickstart_refuses_an_image_data_set_for_the_text_task(tmp_path, coformer_here):
    done = coformer_here("quickstart", "--task", "text", "--data", "mnist", "--out", tmp_path / "qs", "--no-progress")
    assert done.returncode == 2 and "--data mnist is an image data set" in done.stderr
    assert not (tmp_path / "qs").exists()
