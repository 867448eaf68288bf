"""``coformer quickstart --task text``: the language pipeline end to end, offline.

A small BERT (or GPT-2, or T5 encoder: ``--family``) is built from a config, trained on the built-in sentiment task
(:func:`coformer.calibration.text.sentiment_records`) with a word-level
tokenizer made on the spot, and saved as a HuggingFace checkpoint directory.
That checkpoint is then loaded back the way a user's would be (``hf:PATH``),
decomposed for three emulated devices, calibrated, lowered to ONNX and served
by real processes over ZeroMQ; every test sentence goes through the client as
raw text (tokenised by the bundle's ``tokenizer.json``) and comes back as a
label.

As the vision quickstart does, the three emulated devices are first profiled on a
language kit (:mod:`coformer.compiler.profile_kit`: sub-models timed at several
sequence lengths, each device in its own process under its own limits), a
length-aware latency predictor is fitted to each, and DeBo searches the policy at
the calibration reviews' median length. ``coformer bench --quickstart DIR`` then
benches the bundle against the teacher alone, uniform and the students.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from coformer.runtime.files import atomic_write_json
from coformer.runtime.timing import summarise


FAMILIES = ("bert", "gpt2", "t5")


@dataclass(frozen=True)
class TextQuickstartConfig:
    family: str = "bert"
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    intermediate: int = 1024
    max_length: int = 32
    examples: int = 2000
    teacher_epochs: int = 6
    teacher_lr: float = 5e-4
    boost_epochs: int = 4
    aggregator_epochs: int = 40
    shares: tuple[float, ...] = (1.0, 0.6, 0.4)
    flops_fraction: float = 0.5
    seed: int = 0
    warmup_requests: int = 5
    # the devices' profiling and the search, as the vision quickstart's (coformer.tools.quickstart)
    kit_count: int = 24
    profile_alone: bool = True
    profile_rounds: Optional[int] = 3
    profile_duration_s: Optional[float] = None
    profile_extra_rounds: Optional[int] = None
    search_initial: int = 8
    search_iterations: int = 24
    delta: float = 0.05


FAST_TEXT = TextQuickstartConfig(hidden=64, layers=2, heads=4, intermediate=256, examples=800, teacher_epochs=20,
                                 teacher_lr=2e-3, boost_epochs=4, aggregator_epochs=20, warmup_requests=2,
                                 kit_count=10, profile_rounds=2, profile_duration_s=0.1, profile_extra_rounds=1,
                                 search_initial=6, search_iterations=16)


def train_text_teacher(cfg: TextQuickstartConfig, out_dir: Path, progress: bool = True):
    """Train the quickstart's teacher (``cfg.family``: a BERT or GPT-2 classifier, or a T5
    encoder with a linear head) and save it as a HF checkpoint directory (weights, config,
    ``tokenizer.json``) at ``out_dir``; returns the directory. A T5 encoder checkpoint holds no
    head: loaded back, it gets a linear head fitted on the trained encoder's features."""
    import torch
    import transformers as tf

    from coformer.calibration.text import (SENTIMENT_LABELS, build_word_tokenizer, sentiment_records,
                                           sentiment_vocabulary, text_dataset)
    from coformer.calibration.train import train_classifier
    from coformer.compiler.hf import encoder_for, wrap_hf

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tok = build_word_tokenizer(staging / "tokenizer.json", sentiment_vocabulary())
    vocab = len(sentiment_vocabulary()) + 4
    torch.manual_seed(cfg.seed)
    labels = dict(id2label=dict(enumerate(SENTIMENT_LABELS)), label2id={n: i for i, n in enumerate(SENTIMENT_LABELS)})
    if cfg.family == "bert":
        hf = tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
            intermediate_size=cfg.intermediate, max_position_embeddings=cfg.max_length, num_labels=2,
            pad_token_id=0, **labels))
    elif cfg.family == "gpt2":
        hf = tf.GPT2ForSequenceClassification(tf.GPT2Config(
            vocab_size=vocab, n_embd=cfg.hidden, n_layer=cfg.layers, n_head=cfg.heads, n_inner=cfg.intermediate,
            n_positions=cfg.max_length, num_labels=2, pad_token_id=0, bos_token_id=2, eos_token_id=3, **labels))
    elif cfg.family == "t5":
        hf = tf.T5EncoderModel(tf.T5Config(
            vocab_size=vocab, d_model=cfg.hidden, d_kv=cfg.hidden // cfg.heads, d_ff=cfg.intermediate,
            num_layers=cfg.layers, num_heads=cfg.heads, feed_forward_proj="gated-gelu", pad_token_id=0,
            eos_token_id=3, decoder_start_token_id=0, **labels))
    else:
        from coformer.runtime.errors import CoFormerError

        raise CoFormerError(f"text quickstart family {cfg.family!r} is not one of {FAMILIES}")
    teacher = wrap_hf(hf, "quickstart", max_length=cfg.max_length, tokenizer=tok)
    data = text_dataset(sentiment_records(cfg.examples, cfg.seed), encoder_for(teacher, pair=False),
                        labels=SENTIMENT_LABELS)
    train_classifier(teacher, data.train.x, data.train.y, cfg.teacher_epochs, lr=cfg.teacher_lr, seed=cfg.seed,
                     progress=progress, desc=f"train {cfg.family} teacher")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    hf.save_pretrained(str(staging))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir


def run_text_quickstart(out_dir: Optional[Path] = None, fast: bool = False, report_json: Optional[Path] = None,
                        throttle: str = "auto", progress: bool = True,
                        config: Optional[TextQuickstartConfig] = None, family: str = "bert") -> dict[str, Any]:
    import torch

    from coformer.calibration.booster import BoostConfig
    from coformer.calibration.text import SENTIMENT_LABELS, sentiment_records, text_dataset
    from coformer.compiler.bundle import check_target
    from coformer.compiler.cost import teacher_cost
    from coformer.compiler.families import adapter_for
    from coformer.compiler.hf import encoder_for, fit_head, load_hf
    from coformer.compiler.job import CompileJob, run_job
    from coformer.compiler.inference import run_batched
    from coformer.compiler.pipeline import memory_report
    from coformer.compiler.sources import source_of
    from coformer.tools.cluster import place_devices
    from coformer.tools.quickstart import profile_and_fit
    from coformer.runtime.text import TextEncoder
    from coformer.compiler.families.textnet import PartsModule
    from coformer.compiler.lower import lower_submodel
    from coformer.tools.progress import Progress
    from coformer.tools.emulated import time_teacher
    from coformer.tools.quickstart import make_devices
    from coformer.tools.served import measure_bundles

    cfg = config or dataclasses.replace(FAST_TEXT if fast else TextQuickstartConfig(), family=family)
    out_dir = Path(out_dir or "coformer-quickstart-text").resolve()
    check_target(out_dir / "bundle")
    out_dir.mkdir(parents=True, exist_ok=True)
    say = Progress()
    say(f"quickstart (text): writing to {out_dir}")
    say(f"teacher: training {cfg.family} d={cfg.hidden}, {cfg.layers} layers, {cfg.heads} heads on "
         f"{cfg.examples} synthetic reviews (saved as a HuggingFace checkpoint)")
    ckpt = train_text_teacher(cfg, out_dir / "teacher-hf", progress)
    teacher = load_hf(ckpt, max_length=cfg.max_length)
    data = text_dataset(sentiment_records(cfg.examples, cfg.seed), encoder_for(teacher, pair=False),
                        labels=SENTIMENT_LABELS)
    task_head = fit_head(teacher, data)
    t_cost = teacher_cost(adapter_for(teacher).read_shape(teacher))
    devices = make_devices(cfg, t_cost.flops)
    placements = place_devices([(d.name, d.cpu_share) for d in devices])
    say(f"profiling the {len(devices)} emulated devices on a language kit of {cfg.kit_count} sub-models "
        f"(up to {cfg.max_length} tokens)")
    _, fitted = profile_and_fit(cfg, teacher, devices, placements, out_dir, throttle, progress=progress)
    predictors = []
    for d in devices:
        pred, _ = fitted[d.name]
        pred.save(out_dir / "profiles" / f"{d.name}.predictor.json")
        predictors.append(pred)
    say("search (DeBo, at the reviews' median length), then compile: decompose -> calibrate -> ONNX -> bundle")
    torch.manual_seed(cfg.seed)
    job = run_job(CompileJob(
        teacher, devices, data, out_dir / "bundle", search="bo", predictors=predictors, delta=cfg.delta,
        initial=cfg.search_initial, iterations=cfg.search_iterations, seed=cfg.seed,
        boost=BoostConfig(epochs=cfg.boost_epochs, seed=cfg.seed), aggregator_epochs=cfg.aggregator_epochs,
        model_name=f"hf:{ckpt}", model_info=source_of(teacher), progress=progress))
    result = job.result
    texts = list(data.test.raw)
    y = data.test.y.numpy()
    with torch.no_grad():
        x_all = data.test.x
        expected = result.aggregator(*[run_batched(s, x_all) for s in result.submodels]).argmax(-1).numpy()
        teacher_pred = run_batched(teacher, x_all).argmax(-1).numpy()

    say(f"timing the teacher alone on {devices[0].name}'s limits ({len(texts)} test sentences)")
    adapter = adapter_for(teacher)
    teacher_onnx = out_dir / "teacher.onnx"
    teacher_parity = lower_submodel(PartsModule(adapter.full_net(teacher), teacher.head), data.val.x[:3],
                                    teacher_onnx, adapter.input_names(teacher), text=True, output="logits")
    np.save(out_dir / "test_inputs.npy", data.test.x.numpy())
    timed = time_teacher(teacher_onnx, out_dir / "test_inputs.npy", out_dir / "teacher_timing.npz", throttle,
                         cfg.warmup_requests)
    say(f"serving: central node + workers as processes; {len(texts)} test sentences sent as raw text")
    examples = ("the movie was not good", "honestly the food was really great today")

    def classify_examples(_name, client):
        encoder = TextEncoder.from_bundle(out_dir / "bundle")
        return {t: client.classify([t], encoder, result.manifest.labels)[0][0] for t in examples}

    measured = measure_bundles({"bundle": out_dir / "bundle"}, texts, warmup=cfg.warmup_requests, throttle=throttle,
                               log_dir=out_dir / "logs", after=classify_examples)["bundle"]
    served = measured.summary(y)
    lat, t_lat = served["latency_ms"], summarise(timed["latency_ms"])
    report = {
        "task": "text",
        "family": cfg.family,
        "task_head": task_head,
        "teacher_latency_ms": {"median": t_lat["median"], "p90": t_lat["p90"]},
        "speedup": t_lat["median"] / lat["median"],
        "teacher_accuracy": float((teacher_pred == y).mean()),
        "ensemble_accuracy": served["accuracy"],
        "pytorch_ensemble_accuracy": result.accuracy["ensemble_accuracy"],
        "served_equals_pytorch": float((served["predictions"] == expected[served["indices"]]).mean()),
        "submodel_accuracies": result.accuracy["submodel_accuracies"],
        "collaborative_latency_ms": {"median": lat["median"], "p90": lat["p90"]},
        "bytes_per_inference": served["bytes_from_devices"],
        "memory": memory_report(result, devices),
        "search": job.report["search"],
        "latency_tokens": job.report.get("latency_tokens"),
        "predicted_latency_ms": job.report["predicted_latency_ms"],
        "policy_source": result.policy.source,
        "devices": [{"name": d.device, "role": d.role, "cpu_share": d.cpu_share, "flops": d.flops,
                     "params": d.params, "feature_dim": d.feature_dim} for d in result.manifest.devices],
        "teacher": {"flops": t_cost.flops, "params": t_cost.params, "checkpoint": str(ckpt),
                    "onnx_parity": teacher_parity},
        "examples": measured.after,
        "test_samples": len(texts),
        "quickstart_config": dataclasses.asdict(cfg),
        "bundle": str(out_dir / "bundle"),
        "wall_time_s": say.elapsed_s(),
    }
    atomic_write_json(out_dir / "report.json", report)
    if report_json:
        atomic_write_json(Path(report_json), report)
    print(format_text_report(report))
    return report


def format_text_report(r: dict[str, Any]) -> str:
    m = r["memory"]
    c = r["quickstart_config"]
    lines = [
        "",
        f"CoFormer quickstart (text): {c['family']} (d={c['hidden']}, {c['layers']} layers, {c['heads']} heads, "
        f"{r['teacher']['flops'] / 1e6:.1f} MFLOPs at {c['max_length']} tokens) on synthetic reviews, "
        f"{r['test_samples']} test sentences",
        "",
        f"{'device':<8} {'role':<8} {'share':>5} {'MFLOPs':>8} {'params':>9} {'sub-model acc':>13}",
    ]
    for d, acc in zip(r["devices"], r["submodel_accuracies"]):
        lines.append(f"{d['name']:<8} {d['role']:<8} {d['cpu_share']:>5.2f} {d['flops'] / 1e6:>8.2f} "
                     f"{d['params'] / 1e6:>8.3f}M {acc * 100:>12.1f}%")
    lines += [
        "",
        f"teacher accuracy {r['teacher_accuracy'] * 100:.1f}%; CoFormer served {r['ensemble_accuracy'] * 100:.1f}% "
        f"({m['flops_fraction_total'] * 100:.0f}% of the teacher's FLOPs in total, largest sub-model "
        f"{m['largest_param_fraction'] * 100:.0f}% of its parameters)",
        f"latency median: teacher alone on edge-a {r['teacher_latency_ms']['median']:.2f} ms (compute only), "
        f"CoFormer served {r['collaborative_latency_ms']['median']:.2f} ms (round trip): {r['speedup']:.2f}x; "
        f"{r['bytes_per_inference']:,} bytes from the workers per sentence; served = PyTorch ensemble on "
        f"{r['served_equals_pytorch'] * 100:.1f}% of sentences",
        f"policy: {r.get('policy_source', 'heuristic')}"
        + (f", latency predicted at {r['latency_tokens']} tokens (the reviews' median): "
           f"{r['predicted_latency_ms']:.2f} ms" if r.get("latency_tokens") else ""),
        "examples: " + "; ".join(f"{t!r} -> {lab}" for t, lab in r["examples"].items()),
        f"bundle: {r['bundle']}",
    ]
    return "\n".join(lines)
