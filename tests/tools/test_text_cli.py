"""Language models through the `coformer` command: a HF checkpoint directory on disk, a text
file of data, the memory headline (GPT-2), and `quickstart --task text`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coformer.calibration.text import read_records, sentiment_records
from coformer.runtime.errors import CoFormerError
from tests.text_models import build, word_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _coformer() -> str:
    sibling = Path(sys.executable).parent / "coformer"
    exe = str(sibling) if sibling.exists() else shutil.which("coformer")
    assert exe, "the coformer console script is not installed"
    return exe


def _checkpoint(kind, path: Path, **over) -> Path:
    build(kind, **over).save_pretrained(str(path))
    word_tokenizer(path / "tokenizer.json")
    return path


def _jsonl(path: Path, n=200) -> Path:
    path.write_text("".join(json.dumps({"text": r["text"][0], "label": r["label"]}) + "\n"
                            for r in sentiment_records(n)))
    return path


def _run(*args, timeout=600):
    return subprocess.run([_coformer(), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_gpt2_scaled_like_gpt2_xl_fits_a_budget_the_teacher_exceeds(tmp_path):
    """GPT2-XL (48 layers, d=1600, 25 heads of 64) does not fit a 4 GB device; here a GPT-2 with the
    same shape ratios, scaled down (12 layers, d=200, 5 heads of 40, MLP 4d), against devices whose
    memory budget is a quarter of the teacher's parameter bytes."""
    ckpt = _checkpoint("gpt2-plain", tmp_path / "gpt2", n_layer=12, n_embd=200, n_head=5, n_positions=64)
    data = _jsonl(tmp_path / "reviews.jsonl")
    from coformer.compiler.cost import teacher_cost
    from coformer.compiler.families import adapter_for
    from coformer.compiler.hf import load_hf

    teacher = load_hf(ckpt, max_length=32)
    t = teacher_cost(adapter_for(teacher).read_shape(teacher))
    budget = t.param_bytes // 4
    (tmp_path / "devices.yaml").write_text("devices:\n" + "".join(
        f"  - {{name: {n}, memory_bytes: {budget}, flops_budget: {t.flops}, cpu_share: {s}}}\n"
        for n, s in (("edge-a", 1.0), ("edge-b", 0.6), ("edge-c", 0.4))))
    report = tmp_path / "r.json"
    done = _run("compile", "--model", f"hf:{ckpt}", "--devices", tmp_path / "devices.yaml", "--data", data,
                "--max-length", 32, "--out", tmp_path / "bundle", "--epochs", 1, "--report-json", report,
                "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(report.read_text())
    mem = r["memory"]
    assert mem["teacher_exceeds"] == ["edge-a", "edge-b", "edge-c"]
    assert mem["largest_param_fraction"] <= 0.25
    assert all(s["memory_bytes"] <= s["budget_bytes"] for s in mem["submodels"])
    assert {"teacher_accuracy", "ensemble_accuracy"} <= set(r)  # the accuracy cost is reported
    assert r["task_head"]["head"] == "linear probe"
    assert "largest sub-model" in done.stdout and "exceeds the budget of edge-a" in done.stdout
    from coformer.runtime.manifest import load_manifest

    m = load_manifest(tmp_path / "bundle")
    assert m.model["family"] == "gpt2" and m.input.preprocessing["source"] == f"hf:{ckpt}"


def test_compile_refuses_bad_models_and_data_naming_them(tmp_path, coformer_here):
    devices = tmp_path / "devices.yaml"
    devices.write_text("devices:\n  - {name: a, memory_bytes: 1000000000, flops_budget: 1000000000}\n")
    bad = tmp_path / "roberta"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["RobertaForSequenceClassification"]}))
    done = coformer_here("compile", "--model", f"hf:{bad}", "--devices", devices, "--out", tmp_path / "b")
    assert done.returncode == 2
    assert "RobertaForSequenceClassification" in done.stderr and "GPT2ForSequenceClassification" in done.stderr
    assert "Traceback" not in done.stderr
    done = coformer_here("compile", "--model", f"hf:{tmp_path / 'nothing'}", "--devices", devices, "--out", tmp_path / "b")
    assert done.returncode == 2 and "no config.json" in done.stderr
    ckpt = _checkpoint("bert", tmp_path / "bert")
    (tmp_path / "d.csv").write_text("a,b\n")
    done = coformer_here("compile", "--model", f"hf:{ckpt}", "--devices", devices, "--data", tmp_path / "d.csv",
                         "--out", tmp_path / "b", "--max-length", 32)
    assert done.returncode == 2 and "'.csv' is not one of .tsv, .jsonl, .txt" in done.stderr
    done = coformer_here("compile", "--model", f"hf:{ckpt}", "--devices", devices, "--search", "bo",
                         "--out", tmp_path / "b", "--max-length", 32)
    assert done.returncode == 2 and "--search bo needs a profile for every device; missing for ['a']" in done.stderr
    assert not (tmp_path / "b").exists()


def test_text_files_glue_tsv_jsonl_and_plain_text(tmp_path):
    tsv = tmp_path / "rte.tsv"
    tsv.write_text("index\tsentence1\tsentence2\tlabel\n0\tthe cat\tthe dog\tentailment\n"
                   "1\ta red car\ta blue car\tnot_entailment\n")
    recs = read_records(tsv)
    assert recs[0] == {"text": ("the cat", "the dog"), "label": "entailment"}
    sst = tmp_path / "sst.jsonl"
    sst.write_text('{"sentence": "good", "label": 1}\n\n{"sentence": "bad", "label": 0}\n')
    assert [r["label"] for r in read_records(sst)] == ["1", "0"]
    txt = tmp_path / "unlabeled.txt"
    txt.write_text("one line\n\nanother line\n")
    assert read_records(txt) == [{"text": ("one line",), "label": None}, {"text": ("another line",), "label": None}]
    (tmp_path / "x.jsonl").write_text('{"body": "no text key"}\n')
    with pytest.raises(CoFormerError, match=r"x.jsonl line 1: no text column.*found \['body'\]"):
        read_records(tmp_path / "x.jsonl")
    (tmp_path / "mix.jsonl").write_text('{"text": "a"}\n{"sentence1": "a", "sentence2": "b"}\n')
    with pytest.raises(CoFormerError, match="mixes single texts and pairs"):
        read_records(tmp_path / "mix.jsonl")


@pytest.mark.slow
def test_quickstart_text_trains_decomposes_and_serves_raw_text(tmp_path, coformer_here):
    """The teacher is trained in the run on a learnable task; three sub-models with at most half its
    FLOPs keep the ensemble within 3 points, and the served labels are the PyTorch ensemble's."""
    report = tmp_path / "r.json"
    done = subprocess.run([_coformer(), "quickstart", "--task", "text", "--fast", "--out", str(tmp_path / "q"),
                           "--report-json", str(report), "--no-progress", "--throttle", "duty-cycle"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COFORMER_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["teacher_accuracy"] >= 0.85, "the teacher must have learnt the task for the comparison to mean much"
    # DeBo trades accuracy for latency over measured profiles, so the policy varies from run to run
    # (98.1% and 95.0% in two runs of this test): 5 points, where the heuristic policy held 3
    assert r["ensemble_accuracy"] >= r["teacher_accuracy"] - 0.05
    assert r["memory"]["flops_fraction_total"] <= 0.5 and len(r["devices"]) == 3
    assert r["served_equals_pytorch"] == 1.0 and 0 <= r["teacher"]["onnx_parity"] <= 1e-4
    assert set(r["examples"].values()) <= {"negative", "positive"}  # classified through the client
    assert "CoFormer quickstart (text)" in done.stdout
    assert (tmp_path / "q" / "teacher-hf" / "config.json").is_file()
    assert (tmp_path / "q" / "bundle" / "tokenizer.json").is_file()
    # the devices were profiled on a language kit and DeBo searched at the reviews' median length
    from coformer.compiler.predictor import LatencyPredictor

    preds = [LatencyPredictor.load(tmp_path / "q" / "profiles" / f"edge-{c}.predictor.json") for c in "abc"]
    assert all(p.length_aware for p in preds)
    assert r["policy_source"] == "bo" and 1 <= r["latency_tokens"] < 32 and r["search"]["bo"]["evaluations"] == 22
    assert f"latency predicted at {r['latency_tokens']} tokens" in done.stdout

    # `coformer bench --quickstart DIR` on a text quickstart: the teacher alone and the student beside it
    from tests.tools.test_bench import _testbed_reason

    bed = [] if not _testbed_reason() else ["--no-testbed"]
    done = subprocess.run([_coformer(), "bench", "--quickstart", str(tmp_path / "q"), "--strategies",
                           "coformer,student,teacher", "--samples", "20", "--passes", "1", "--throughput", "none",
                           *bed, "--report-json", str(tmp_path / "b.json"), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {x["strategy"]: x for x in json.loads((tmp_path / "b.json").read_text())["results"]}
    assert set(rows) == {"coformer", "student", "teacher"} and all(x["status"] == "ok" for x in rows.values())
    assert rows["student"]["policy_source"] == "bo" and rows["coformer"]["policy_source"] == "bo"
    assert (tmp_path / "q" / "bench" / "bench.md").is_file()
    done = coformer_here("bench", "--quickstart", tmp_path / "q", "--fronts", "--no-testbed")
    assert done.returncode != 0 and "--fronts run on the vision quickstart" in done.stderr


def test_label_free_distillation_from_a_plain_text_file(tmp_path):
    """A classifier checkpoint and unlabeled text: calibrated on the teacher's decisions alone,
    scored by agreement with them, labels named from the checkpoint's config."""
    ckpt = _checkpoint("bert", tmp_path / "bert", id2label={0: "no", 1: "yes"}, label2id={"no": 0, "yes": 1})
    txt = tmp_path / "unlabeled.txt"
    txt.write_text("\n".join(r["text"][0] for r in sentiment_records(120)) + "\n")
    devices = tmp_path / "devices.yaml"
    devices.write_text("devices:\n  - {name: a, memory_bytes: 1000000000, flops_budget: 1000000000}\n"
                       "  - {name: b, memory_bytes: 1000000000, flops_budget: 1000000000, cpu_share: 0.5}\n")
    report = tmp_path / "r.json"
    done = _run("compile", "--model", f"hf:{ckpt}", "--devices", devices, "--data", txt, "--max-length", 32,
                "--out", tmp_path / "b", "--epochs", 1, "--report-json", report, "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "agreement with the teacher" in done.stdout
    r = json.loads(report.read_text())
    # without labels the score is agreement with the teacher's decisions, and says so
    assert r["accuracy_reference"] == "teacher" and r["teacher_accuracy"] == 1.0
    assert r["ensemble_accuracy"] >= 0.9
    from coformer.runtime.manifest import load_manifest

    assert load_manifest(tmp_path / "b").labels == ["no", "yes"]


@pytest.mark.slow
def test_a_language_model_gets_a_profile_kit_and_the_search(tmp_path, coformer_here):
    """The kit is sampled from the BERT's own space with the sequence length as a fifth axis;
    the profiler fills each entry's token inputs at its own length (ids within the vocabulary,
    a full mask); DeBo searches over
    the length-aware predictors fitted on it, at the calibration texts' median length."""
    import numpy as np

    from coformer.runtime.manifest import load_manifest
    from coformer.runtime.profile import profile_kit

    ckpt = _checkpoint("bert", tmp_path / "bert")
    data = _jsonl(tmp_path / "reviews.jsonl", 120)
    done = _run("profile-kit", "--model", f"hf:{ckpt}", "--max-length", 24, "--out", tmp_path / "kit", "--count", 10,
                "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    kit = json.loads((tmp_path / "kit" / "kit.json").read_text())
    assert kit["family"] == "bert" and len(kit["entries"]) == 10
    assert set(kit["input"]["feeds"]) == {"input_ids", "attention_mask", "token_type_ids"}
    tokens = [e["tokens"] for e in kit["entries"]]
    assert all(len(e["config"]) == 5 and e["config"][4] == e["tokens"] for e in kit["entries"])
    assert min(tokens) == 8 and max(tokens) == 24 and len(set(tokens)) >= 5  # the corners, and spread between
    # FLOPs are counted at each entry's own length: the smallest corner at 8 tokens, the teacher at 24
    from coformer.compiler.cost import submodel_cost
    from coformer.compiler.families import adapter_for
    from coformer.compiler.profile_kit import uniform_spec
    from coformer.compiler.sources import load_teacher
    import dataclasses

    teacher = load_teacher(f"hf:{ckpt}", max_length=24, progress=False)
    shape = adapter_for(teacher).read_shape(teacher)
    e = kit["entries"][0]
    assert e["flops"] == submodel_cost(uniform_spec(shape, e["config"]), dataclasses.replace(shape, num_tokens=8)).flops
    lines = ["devices:"]
    for name, share in (("a", 1.0), ("b", 0.5)):
        prof = profile_kit(tmp_path / "kit", name, warmup_ms=2, iterations=3, duration_s=0.01, rounds=1,
                           gap_iterations=2, progress=False, out=tmp_path / f"{name}.json")
        assert all(e["latency_estimate_ms"] > 0 and "tokens" in e for e in prof["entries"])
        lines.append(f"  - {{name: {name}, memory_bytes: 1000000000, flops_budget: 1000000000, cpu_share: {share}, "
                     f"profile: {tmp_path / (name + '.json')}}}")
    (tmp_path / "devices.yaml").write_text("\n".join(lines) + "\n")
    from coformer.runtime.profile import kit_feeds

    feeds = kit_feeds(kit, tokens=13)  # what the profiler ran for an entry of 13 tokens: valid tokens
    assert {k: v.shape for k, v in feeds.items()} == dict.fromkeys(feeds, (1, 13))
    assert feeds["input_ids"].max() < 100 and feeds["attention_mask"].min() == 1 and feeds["token_type_ids"].max() == 0
    with pytest.raises(CoFormerError, match="30 tokens"):
        kit_feeds(kit, tokens=30)
    from coformer.compiler.predictor import fit_predictor

    pred, _ = fit_predictor(json.loads((tmp_path / "a.json").read_text()))
    assert pred.length_aware and pred.params["tokens_range"] == [8, 24]
    done = _run("compile", "--model", f"hf:{ckpt}", "--max-length", 24, "--devices", tmp_path / "devices.yaml",
                "--data", data, "--out", tmp_path / "bundle", "--search", "bo", "--initial", 2, "--iterations", 1,
                "--epochs", 0, "--no-progress", "--report-json", tmp_path / "r.json")
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["search"]["bo"]["evaluations"] == 3 and r["predicted_latency_ms"] > 0
    assert r["length_aware_predictors"] == [True, True]
    # the reviews' median length in tokens (padding excluded), as the data holds them
    from coformer.compiler.sources import load_data

    ds, _ = load_data(teacher, str(data))
    median = int(np.ceil(np.median(ds.train.x[:, 1].sum(-1).numpy())))
    assert r["latency_tokens"] == median < 24 and f"at {median} tokens" in done.stdout
    assert load_manifest(tmp_path / "bundle").policy["source"] == "bo"
    done = coformer_here("compile", "--model", f"hf:{ckpt}", "--max-length", 24, "--devices",
                         tmp_path / "devices.yaml", "--data", data, "--out", tmp_path / "bundle2", "--search", "bo",
                         "--latency-tokens", 40, "--no-progress")
    assert done.returncode != 0 and "--latency-tokens 40 must be within 1..24" in done.stderr


@pytest.mark.slow
def test_text_latency_serves_the_bundle_beside_its_teacher_at_each_length(tmp_path):
    """`python -m experiments.text_latency`: the teacher's own bundle is built beside the
    CoFormer bundle and both are served by the same runtime, with inputs of exactly T tokens."""
    ckpt = _checkpoint("bert", tmp_path / "bert")
    (tmp_path / "devices.yaml").write_text(
        "devices:\n  - {name: a, memory_bytes: 1000000000, flops_budget: 1000000000}\n"
        "  - {name: b, memory_bytes: 1000000000, flops_budget: 1000000000, cpu_share: 0.5}\n")
    done = _run("compile", "--model", f"hf:{ckpt}", "--devices", tmp_path / "devices.yaml", "--max-length", 32,
                "--out", tmp_path / "bundle", "--epochs", 0, "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "experiments.text_latency", str(tmp_path / "bundle"), "--model",
                           f"hf:{ckpt}", "--max-length", "32", "--devices", str(tmp_path / "devices.yaml"),
                           "--lengths", "8,32", "--samples", "6", "--passes", "1", "--no-progress",
                           "--report-json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600,
                          cwd=REPO)  # experiments/ runs from the repository root, not installed
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert {(r["tokens"], r["strategy"], r["input_source"]) for r in rows} == {
        (T, s, src) for T in (8, 32) for s, src in (("coformer", "device"), ("coformer", "central"),
                                                     ("teacher", "central"))}
    by = {(r["tokens"], r["strategy"], r["input_source"]): r for r in rows}
    # a 32-token request carries 4x the ids of an 8-token one; the teacher sends nothing to workers
    assert by[32, "coformer", "central"]["bytes_per_inference"] > by[8, "coformer", "central"]["bytes_per_inference"]
    assert by[32, "teacher", "central"]["bytes_per_inference"] == 0
    assert all("speedup_vs_teacher" in r for r in rows if r["strategy"] == "coformer")
    from coformer.runtime.manifest import load_manifest

    teacher = load_manifest(tmp_path / "text-latency" / "teacher-bundle")
    assert teacher.strategy == "teacher" and teacher.input.is_text
    assert teacher.labels == load_manifest(tmp_path / "bundle").labels == ["negative", "positive"]
