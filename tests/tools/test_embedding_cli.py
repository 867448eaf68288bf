"""Sentence-embedding encoders end to end: a BERT saved as a sentence-transformers folder, a .txt
file of sentences and nothing else, `coformer compile` to an embedding bundle, served, and
embeddings from `Client.embed` and `coformer-runtime infer --embed`."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coformer.calibration.text import sentiment_records
from coformer.runtime.manifest import load_manifest
from tests.text_models import word_tokenizer

pytestmark = pytest.mark.slow

DEVICES = """devices:
  - {name: a, memory_bytes: 1000000000, flops_budget: 1000000000, cpu_share: 1.0}
  - {name: b, memory_bytes: 1000000000, flops_budget: 1000000000, cpu_share: 0.6}
  - {name: c, memory_bytes: 1000000000, flops_budget: 1000000000, cpu_share: 0.4}
"""


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "coformer.tools.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def sentence_transformers_folder(path: Path) -> Path:
    """What users of embedding models have on disk: the encoder (a BERT, here trained briefly to
    tell the built-in reviews' 16 subjects and their polarity apart, so that its space has clusters
    that mean something and a negation to get right), its tokenizer, and the pipeline around it
    (mean pooling, then normalisation)."""
    import transformers as tf

    from coformer.calibration.text import _SUBJECTS, text_dataset
    from coformer.calibration.train import train_classifier
    from coformer.compiler.hf import encoder_for, wrap_hf

    path.mkdir(parents=True)
    tok = word_tokenizer(path / "tokenizer.json")
    torch.manual_seed(0)
    labels = [f"{s}|{p}" for s in _SUBJECTS for p in ("negative", "positive")]
    hf = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=40, num_labels=len(labels), pad_token_id=0))
    teacher = wrap_hf(hf, max_length=32, tokenizer=tok)
    records = [{"text": r["text"], "label": next(f"{s}|{r['label']}" for s in _SUBJECTS if s in r["text"][0])}
               for r in sentiment_records(1200, seed=1)]
    data = text_dataset(records, encoder_for(teacher, pair=False), labels=labels)
    train_classifier(teacher, data.train.x, data.train.y, 6, lr=2e-3, progress=False)
    hf.bert.save_pretrained(str(path))  # the encoder alone: a plain BertModel
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    return path


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embedding")
    folder = sentence_transformers_folder(tmp / "st")
    sentences = [r["text"][0] for r in sentiment_records(1000, seed=7)]
    (tmp / "sentences.txt").write_text("\n".join(sentences) + "\n")
    (tmp / "devices.yaml").write_text(DEVICES)
    done = run("compile", "--model", f"hf:{folder}", "--data", tmp / "sentences.txt", "--devices", tmp / "devices.yaml",
               "--out", tmp / "bundle", "--epochs", "10", "--lr", "1e-3", "--no-progress",
               "--report-json", tmp / "r.json")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, folder, json.loads((tmp / "r.json").read_text()), done.stdout


def _teacher_embeddings(folder: Path, texts):
    from coformer.compiler.families import adapter_for
    from coformer.compiler.hf import encoder_for, load_hf
    from coformer.compiler.tasks import TeacherEmbedding

    teacher = load_hf(folder, max_length=32)
    with torch.no_grad():
        x = torch.as_tensor(encoder_for(teacher, pair=False).encode(texts))
        return TeacherEmbedding(adapter_for(teacher), teacher, teacher.normalize)(x).numpy()


def test_the_folder_reads_as_sentence_transformers_computes_it(compiled):
    from sentence_transformers import SentenceTransformer

    tmp, folder, _, _ = compiled
    texts = ["the movie was not good", "honestly the hotel seemed really lovely today", "the app"]
    reference = SentenceTransformer(str(folder), device="cpu", local_files_only=True).encode(texts)
    assert np.abs(_teacher_embeddings(folder, texts) - reference).max() <= 1e-5


def test_a_txt_file_alone_compiles_an_embedding_bundle_no_worse_than_a_ridge_probe(compiled):
    tmp, _, report, stdout = compiled
    m = load_manifest(tmp / "bundle")
    assert m.task == {"kind": "embedding", "dim": 64, "normalize": True, "pooling": "mean", "labels": []}
    assert m.schema_version == 4 and report["task"] == "embedding" and report["distill"] == "feature"
    assert report["test_samples"] == 200  # 20% of 1000, held out
    kept = report["calibration"]
    # the validation split chose the closer of the distilled ensemble and the uncalibrated slices with a ridge map
    assert kept["kept"] == max(kept["val_cosine"], key=kept["val_cosine"].get)
    assert report["mean_cosine"] > 0.95 and report["mean_cosine"] >= report["ridge_probe"]["mean_cosine"] - 0.005
    assert "mean cosine to the teacher" in stdout and "ridge map" in stdout


def test_served_embeddings_match_the_teacher_on_held_out_sentences(compiled, tmp_path):
    from coformer.runtime.client import Client

    tmp, folder, report, _ = compiled
    held_out = [r["text"][0] for r in sentiment_records(60, seed=99)]  # drawn with another seed
    proc = subprocess.Popen([sys.executable, "-m", "coformer.tools.cli", "serve", str(tmp / "bundle"), "--front",
                             "tcp://127.0.0.1:*", "--throttle", "none", "--log-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        endpoint = re.search(r"clients connect to (\S+) with --keys (\S+)", proc.stdout.readline())
        assert endpoint
        with Client(endpoint.group(1), keys=endpoint.group(2), timeout_s=60) as client:
            served = client.embed(held_out, tmp / "bundle", batch_size=16)
            # the folder as a plain string, as a user types it
            assert np.allclose(client.embed(held_out[:3], str(tmp / "bundle")), served[:3], atol=1e-6)
        done = subprocess.run([sys.executable, "-m", "coformer.runtime.cli", "infer", str(tmp / "bundle"),
                               "--central", endpoint.group(1), "--keys", endpoint.group(2), "--embed", "--text",
                               held_out[0], held_out[1]],
                              capture_output=True, text=True, timeout=60)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert served.shape == (60, 64)
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)  # the teacher's pipeline normalises
    teacher = _teacher_embeddings(folder, held_out)
    cosine = float((served * teacher).sum(1).mean())
    print(f"held-out mean cosine to the teacher: {cosine:.4f} (test split at compile: {report['mean_cosine']:.4f})")
    assert cosine > 0.9 and abs(cosine - report["mean_cosine"]) < 0.02
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["dim"] == 64 and out["normalized"] and np.allclose(out["embedding"], served[:2], atol=1e-5)


def test_a_classifier_bundle_is_not_an_embedding_one(compiled, tmp_path, coformer_here):
    from coformer.runtime.client import Client
    from coformer.runtime.errors import CoFormerError

    tmp, folder, _, _ = compiled
    done = coformer_here("compile", "--model", f"hf:{folder}", "--data", tmp / "sentences.txt", "--devices",
                         tmp / "devices.yaml", "--out", tmp_path / "b", "--task", "classification", "--no-progress")
    assert done.returncode == 2 and "--task embedding" in done.stderr  # no head, no labels: nothing to classify
    with Client("tcp://127.0.0.1:1", timeout_s=0.1) as client, pytest.raises(CoFormerError, match="need the bundle"):
        client.embed(["a text"])


def test_bench_scores_an_embedding_bundle_by_cosine_against_a_student_calibrated_alike(compiled):
    """`coformer bench` on an embedding bundle (issue 37, item 3): every row is scored against the
    teacher's embedding, and the student is distilled with the bundle's own settings."""
    tmp, folder, report, _ = compiled
    done = run("bench", tmp / "bundle", "--model", f"hf:{folder}", "--data", tmp / "sentences.txt", "--devices",
               tmp / "devices.yaml", "--strategies", "coformer,student_matched,teacher", "--samples", 30,
               "--passes", 1, "--throughput", "none", "--no-testbed", "--out", tmp / "bench",
               "--report-json", tmp / "bench.json", "--no-progress", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp / "bench.json").read_text())
    rows = {x["strategy"]: x for x in r["results"]}
    assert r["task"] == "embedding" and r["accuracy_reference"] == "teacher embedding"
    assert all(x["status"] == "ok" and x["samples"] == 30 and "accuracy" not in x for x in rows.values()), rows
    # the teacher alone answers its own embedding; the bundle answers close to it, as the compile scored it
    assert rows["teacher"]["mean_cosine"] > 0.9999 and rows["teacher"]["nn_agreement"] == 1.0
    assert abs(rows["coformer"]["mean_cosine"] - report["mean_cosine"]) < 0.03
    assert rows["coformer"]["collaboration"]["gain"] == pytest.approx(report["collaboration"]["gain"])
    # the student was calibrated as the bundle was: the same epochs and learning rate, residual or not
    student = load_manifest(tmp / "bench" / "bundles" / "student_matched")
    ours = load_manifest(tmp / "bundle").model["calibration_settings"]
    assert student.task_kind == "embedding" and ours["epochs"] == 10 and ours["lr"] == 1e-3
    assert {k: student.model["calibration_settings"][k] for k in ("epochs", "lr", "distill")} == \
        {k: ours[k] for k in ("epochs", "lr", "distill")}
    (ratio,) = r["ratios"]
    assert ratio["cosine_vs_student_matched"] == pytest.approx(
        rows["coformer"]["mean_cosine"] - rows["student_matched"]["mean_cosine"])
    assert "nn_agreement_vs_teacher_points" in ratio and "accuracy_vs_teacher_points" not in ratio
    md = (tmp / "bench" / "bench.md").read_text()
    assert "| mean cosine | NN agreement |" in md and "cosine over" in md  # the collaboration line, in cosine
