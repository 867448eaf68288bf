"""`coformer bench BUNDLE --model hf:DIR`: a language model's bundle against the teacher alone,
the uniform split and the single students, as a user runs it (console script, real processes,
real sockets; on the testbed where root allows, else loopback), raw text through the client."""

import json

import pytest

from tests.tools.test_bench import _testbed_reason
from tests.tools.test_text_cli import _run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory):
    """A trained BERT (the text quickstart's fast teacher) saved as a HF checkpoint, reviews
    as JSON lines, two devices (the central one profiled on a language kit), and its bundle."""
    from coformer.calibration.text import sentiment_records
    from coformer.runtime.profile import profile_kit
    from coformer.tools.quickstart_text import FAST_TEXT, train_text_teacher

    tmp = tmp_path_factory.mktemp("text-bench")
    ckpt = train_text_teacher(FAST_TEXT, tmp / "bert", progress=False)
    data = tmp / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"][0], "label": r["label"]}) + "\n"
                            for r in sentiment_records(200, 1)))  # other reviews than the teacher trained on
    done = _run("profile-kit", "--model", f"hf:{ckpt}", "--max-length", 32, "--out", tmp / "kit", "--count", 8,
                "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    profile_kit(tmp / "kit", "a", warmup_ms=2, iterations=3, duration_s=0.01, rounds=1, gap_iterations=2,
                progress=False, out=tmp / "a.json")
    (tmp / "devices.yaml").write_text(
        f"devices:\n  - {{name: a, memory_bytes: 1000000000, flops_budget: 1000000000, profile: {tmp / 'a.json'}}}\n"
        "  - {name: b, memory_bytes: 1000000000, flops_budget: 1000000000, cpu_share: 0.5, link_mbit_s: 2}\n")
    done = _run("compile", "--model", f"hf:{ckpt}", "--max-length", 32, "--devices", tmp / "devices.yaml",
                "--data", data, "--out", tmp / "bundle", "--epochs", 1, "--no-progress",
                "--report-json", tmp / "compile.json")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, ckpt, json.loads((tmp / "compile.json").read_text())


def test_bench_of_a_text_bundle_serves_raw_text_beside_the_teacher_and_the_students(text_bundle):
    tmp, ckpt, compiled = text_bundle
    bed = [] if not _testbed_reason() else ["--no-testbed"]
    done = _run("bench", tmp / "bundle", "--model", f"hf:{ckpt}", "--devices", tmp / "devices.yaml", "--data",
                tmp / "reviews.jsonl", "--strategies", "coformer,uniform,student,student_matched,teacher",
                "--epochs", 1, "--samples", 40, "--passes", 2, "--throughput", 1, "--throughput-seconds", 1,
                *bed, "--out", tmp / "bench", "--report-json", tmp / "r.json", "--no-progress", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp / "r.json").read_text())
    rows = {x["strategy"]: x for x in r["results"]}
    assert set(rows) == {"coformer", "uniform", "student", "student_matched", "teacher"}
    assert all(x["status"] == "ok" and x["samples"] == 40 for x in rows.values()), rows
    # the max length came from the bundle (no --max-length given), and every text came with the request
    assert all(x["input_source"] == "central" for x in rows.values())
    # raw text served through the client scores what PyTorch scored on the same 40 test reviews
    assert rows["teacher"]["accuracy"] == pytest.approx(compiled["teacher_accuracy"])
    assert rows["coformer"]["accuracy"] == pytest.approx(compiled["ensemble_accuracy"])
    assert rows["teacher"]["accuracy"] >= 0.9  # a trained teacher: the comparison means something
    # the students run on the central device alone, searched by DeBo over its language-kit predictor
    for s in ("student", "student_matched"):
        assert rows[s]["devices_used"] == 1 and rows[s]["policy_source"] == "bo" and rows[s]["bytes_per_inference"] == 0
    # the central node forwards the tokens to the worker: more bytes go to it than a feature vector's
    assert rows["coformer"]["bytes_to_devices"] > 0 and rows["coformer"]["bytes_per_inference"] > 0
    assert "limit_ms" in rows["coformer"] and rows["coformer"]["throughput"]["1"]["answers_per_s"] > 0
    (ratio,) = r["ratios"]
    assert {"speedup_vs_teacher", "speedup_vs_student", "speedup_vs_uniform", "accuracy_vs_student_points"} <= set(ratio)
    assert (tmp / "bench" / "bench.md").is_file()


def test_bench_of_a_text_bundle_refuses_what_it_cannot_do_by_name(text_bundle, coformer_here):
    tmp, ckpt, _ = text_bundle
    base = ["bench", tmp / "bundle", "--model", f"hf:{ckpt}", "--devices", tmp / "devices.yaml", "--data",
            tmp / "reviews.jsonl", "--no-testbed", "--no-progress"]
    done = coformer_here(*base, "--input-source", "device", "--strategies", "coformer")
    assert done.returncode != 0 and "--input-source device" in done.stderr and "central" in done.stderr
    done = coformer_here(*base, "--strategies", "coformer,pipeline")
    assert done.returncode != 0 and "pipeline" in done.stderr
    # a teacher loaded at another length than the bundle's: the flag to give is named
    done = coformer_here(*base, "--max-length", 16, "--strategies", "coformer")
    assert done.returncode != 0 and "compiled with --max-length 32" in done.stderr and "at 16" in done.stderr
