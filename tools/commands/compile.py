"""``coformer compile``: decompose, calibrate and lower a teacher into a bundle (CoFormer, or PRISM)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from coformer.compiler.decomposition import DECOMPOSITIONS, DEFAULT_DECOMPOSITION
from coformer.runtime.errors import CoFormerError
from coformer.tools.commands.args import (add_compute_args, add_data_args, add_model_args, compute_from_args,
                                          data_from_args, teacher_from_args)


def register(sub) -> None:
    p = sub.add_parser("compile", help="decompose, calibrate and lower a teacher into a bundle")
    add_model_args(p)
    p.add_argument("--devices", type=Path, required=True, help="devices file (YAML or JSON)")
    add_data_args(p)
    add_compute_args(p)
    p.add_argument("--strategy", default="coformer", choices=["coformer", "prism"],
                   help="coformer: one smaller sub-model per device (the default); prism: the whole teacher on "
                   "every device, each running its share of the positions and exchanging K/V Segment Means per "
                   "layer (no search or calibration; see --compression-rate)")
    p.add_argument("--compression-rate", type=int, default=4,
                   help="prism: positions per Segment Mean (CR); 1 exchanges every key and value (the teacher "
                   "exactly), larger sends fewer bytes and approximates more")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="prism at CR > 1: first fine-tune the weights under PRISM's forward for this many epochs "
                   "(distilled from the teacher), kept only if the validation accuracy rises (default 0: none)")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="prism: the fine-tuning's peak learning rate")
    p.add_argument("--policy", type=Path, default=None, help="use this policy (JSON); skips the search")
    p.add_argument("--search", default="auto", choices=["auto", "bo", "random", "uniform", "heuristic"],
                   help="how to choose the policy (auto: bo when every device has a profile, else heuristic)")
    p.add_argument("--compare", action="store_true", help="also run the random and uniform baselines")
    p.add_argument("--delta", type=float, default=0.05, help="weight of latency (per ms) against validation loss")
    p.add_argument("--initial", type=int, default=8, help="random policies before the GP guides (r)")
    p.add_argument("--iterations", type=int, default=24, help="guided search iterations (I_s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--search-log", type=Path, default=None,
                   help="append every evaluation here (JSON lines); a rerun resumes from it (default: OUT.search)")
    p.add_argument("--measure", action="store_true",
                   help="serve the bundle on this machine (devices emulated) and measure its latency")
    p.add_argument("--measure-samples", type=int, default=500, help="with --measure: test samples to send")
    p.add_argument("--feature-dtype", default="float32", choices=["float32", "float16"],
                   help="what workers send their pooled features as: float16 halves the bytes on each link (the "
                   "search charges that; the report gives the accuracy both ways)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"],
                   help="fp16: also write every sub-model as an fp16 ONNX (float32 inputs and outputs) beside the "
                   "float32 one, for TensorRT 11, which builds fp16 engines from fp16 ONNX only")
    p.add_argument("--latency-tokens", type=int, default=None,
                   help="text: the request length (tokens) the search predicts latency at, with profiles from a "
                   "language kit (default: the median length of the calibration texts)")
    p.add_argument("--student", action="store_true",
                   help="also build the single-student baselines on the central device alone, searched and "
                   "calibrated alike: OUT.student (its whole budget) and OUT.student_matched (the compute time of "
                   "CoFormer's slowest device); the report compares them")
    p.add_argument("--report-json", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--epochs", type=int, default=5, help="calibration epochs per sub-model")
    p.add_argument("--lr", type=float, default=5e-4, help="calibration's peak learning rate (AdamW, cosine decay)")
    p.add_argument("--distill", default="hard", choices=["hard", "soft"],
                   help="classifiers: distil to the teacher's decisions (eq. 14) or to its softened logits (KL); "
                        "embeddings always distil to the teacher's feature")
    p.add_argument("--temperature", type=float, default=4.0, help="with --distill soft: the softening")
    p.add_argument("--joint-epochs", type=int, default=0,
                   help="then fine-tune all sub-models and the aggregator together on the fused answer")
    p.add_argument("--decomposition", default=None, choices=list(DECOMPOSITIONS),
                   help="how the sub-models share the teacher's units: nested (every device the top of one "
                   "ranking), partition (no unit on two devices; a policy that shares one is refused) or core "
                   f"(a shared core, the rest dealt apart); default: a --policy file's own, else "
                   f"{DEFAULT_DECOMPOSITION}")
    p.add_argument("--residual", default=None, action=argparse.BooleanOptionalAction,
                   help="calibrate each sub-model after the first to what the earlier ones leave of the teacher's "
                   "output (boosting's residual) instead of to the whole of it")
    p.add_argument("--normalize", default=None, action=argparse.BooleanOptionalAction,
                   help="embeddings: L2-normalise the answer (default: as the teacher's own pipeline does)")
    p.add_argument("--resume-dir", type=Path, default=None,
                   help="calibration checkpoints, one per finished sub-model: an interrupted compile started "
                        "again resumes from them (default: OUT.calibration; removed once the bundle is written)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def build_students(job, manifest, progress: bool) -> dict:
    """``compile --student``: the two single-student baselines of ``job`` (see
    :func:`coformer.compiler.job.student_job`), in ``OUT.student`` and ``OUT.student_matched``."""
    import torch

    from coformer.compiler.job import matched_student_flops, run_job, student_job, student_summary

    out = {}
    for name, budget in (("student", job.devices[0].flops_budget), ("student_matched", matched_student_flops(manifest))):
        if progress:
            print(f"compile: the {name} baseline ({job.devices[0].name} alone, {budget / 1e6:.1f} MFLOPs)",
                  file=sys.stderr)
        torch.manual_seed(job.seed)
        sj = student_job(job, budget, Path(f"{job.out_dir}.{name}"), name)
        out[name] = student_summary(run_job(sj), sj.devices[0].flops_budget)
    return out


def compile_prism(args: argparse.Namespace, devices) -> int:
    """``compile --strategy prism``: the PRISM bundle (:mod:`coformer.compiler.prism_bundle`), and
    its accuracy, agreement with the teacher and bytes per inference on the test split."""
    from coformer.calibration.compute import CPU
    from coformer.compiler.job import CompileJob, run_job
    from coformer.compiler.prism_bundle import prism_scores
    from coformer.runtime.files import atomic_write_json

    if args.compression_rate < 1:
        raise CoFormerError(f"--compression-rate {args.compression_rate} must be >= 1")
    ignored = [flag for flag, on in (("--policy", args.policy), ("--search", args.search != "auto"),
                                     ("--student", args.student), ("--compare", args.compare),
                                     ("--feature-dtype", args.feature_dtype != "float32"),
                                     ("--precision", args.precision != "fp32"), ("--measure", args.measure)) if on]
    if ignored:
        raise CoFormerError(f"--strategy prism runs the teacher's own weights (no policy, search, calibration or "
                            f"features): drop {', '.join(ignored)}")
    if args.finetune_epochs < 0:
        raise CoFormerError(f"--finetune-epochs {args.finetune_epochs} must be >= 0")
    compute = compute_from_args(args) if args.finetune_epochs else CPU  # a bad --device fails before the teacher
    if args.finetune_epochs and args.compression_rate == 1:
        raise CoFormerError("--finetune-epochs needs --compression-rate > 1: at CR = 1 PRISM is the teacher")
    teacher = teacher_from_args(args)
    data, _ = data_from_args(args, teacher)
    if data.test.y is None:
        raise CoFormerError("--strategy prism reports accuracy, so its data needs labels")
    built = run_job(CompileJob(teacher, devices, data, args.out, compute=compute, seed=args.seed,
                               model_name=args.model, progress=not getattr(args, "no_progress", False),
                               strategy="prism", options={"compression_rate": args.compression_rate,
                                                          "finetune_epochs": args.finetune_epochs,
                                                          "finetune_lr": args.finetune_lr})).result
    manifest, tuned, finetune = built.manifest, built.tuned, built.finetune
    if finetune is not None:
        val, key = finetune["validation"], finetune["decided_by"].split()[-1]
        print(f"fine-tuned {args.finetune_epochs} epochs in {finetune['seconds']:.0f} s: {finetune['decided_by']} "
              f"{val['before'][key] * 100:.1f}% -> {val['after'][key] * 100:.1f}% "
              + ("(kept)" if finetune["kept"] else "(not kept: the bundle runs the teacher's weights)"))
    plan = manifest.model["plan"]
    scores = prism_scores(teacher, data, plan["shares"], [args.compression_rate],
                          min(len(data.test), args.measure_samples),
                          weights={args.compression_rate: tuned} if tuned is not None else None)
    at = scores["by_cr"][args.compression_rate]
    comm = plan["communication"]
    print(f"bundle: {args.out} (PRISM, CR = {args.compression_rate}; positions per device "
          + ", ".join(f"{d} {n}" for d, n in zip(plan["devices"], plan["shares"])) + ")")
    print(f"teacher accuracy {scores['teacher_accuracy'] * 100:.1f}%, PRISM {at['accuracy'] * 100:.1f}% "
          f"(agreement with the teacher {at['agreement_with_teacher'] * 100:.1f}%, {scores['samples']} test samples)")
    print(f"exchange: {comm['bytes_per_inference'] / 1e3:.1f} kB in {comm['rounds_per_inference']:.0f} rounds per "
          f"inference, {comm['reduction'] * 100:.1f}% less than every key and value "
          f"({comm['uncompressed_bytes'] / 1e3:.1f} kB); served parity {manifest.parity['served_vs_prism_forward']:.2g}")
    if args.report_json:
        atomic_write_json(args.report_json, {"strategy": "prism", "compression_rate": args.compression_rate,
                                             "plan": plan, "scores": scores, "parity": dict(manifest.parity)})
    return 0


def run(args: argparse.Namespace) -> int:
    from coformer.calibration.booster import BoostConfig
    from coformer.compiler.devices import load_devices
    from coformer.compiler.job import CompileJob, run_job
    from coformer.compiler.predictor import predictor_for
    from coformer.compiler.sources import source_of
    from coformer.compiler.specs import Policy
    from coformer.runtime.files import atomic_write_json

    if args.measure_samples < 1:
        raise CoFormerError(f"--measure-samples {args.measure_samples} must be >= 1")
    devices = load_devices(args.devices)
    if args.strategy == "prism":
        return compile_prism(args, devices)
    if args.finetune_epochs:
        raise CoFormerError("--finetune-epochs fine-tunes --strategy prism; CoFormer's sub-models are calibrated by "
                            "--epochs")
    policy = Policy.load(args.policy) if args.policy else None
    compute = compute_from_args(args)  # a bad --device fails before the teacher is loaded
    teacher = teacher_from_args(args)
    data, head = data_from_args(args, teacher)
    method = args.search
    wants_search = policy is None and method != "heuristic"  # predictors: for bo, random, uniform
    if method in ("bo", "random"):
        missing = [d.name for d in devices if not d.profile]
        if missing:
            raise CoFormerError(f"--search {method} needs a profile for every device; missing for {missing}")
    predictors, fits = None, {}
    if wants_search and method == "auto" and not all(d.profile for d in devices):
        print("no profile for " + ", ".join(d.name for d in devices if not d.profile)
              + ": using the heuristic policy (set 'profile:' in the devices file to search)", file=sys.stderr)
    if wants_search and all(d.profile for d in devices):
        predictors = []
        for d in devices:
            pred, fit = predictor_for(Path(d.profile), args.seed)
            predictors.append(pred)
            if fit is not None:
                fits[d.name] = fit
    from coformer.compiler.tasks import resolve_task

    task = resolve_task(teacher, data.train.y is not None, args.task)
    job = CompileJob(
        teacher, devices, data, args.out, policy=policy, search=method, task=task, normalize=args.normalize,
        predictors=predictors, compare=args.compare, delta=args.delta, initial=args.initial,
        iterations=args.iterations, seed=args.seed, search_log=args.search_log or Path(f"{args.out}.search"),
        boost=BoostConfig(epochs=args.epochs, batch_size=compute.batch_size, lr=args.lr, seed=args.seed,
                          distill=args.distill, temperature=args.temperature, joint_epochs=args.joint_epochs,
                          **({} if args.residual is None else {"residual": args.residual})),
        use_labels=not args.unlabeled, compute=compute,
        checkpoint_dir=args.resume_dir or Path(f"{args.out}.calibration"),
        model_name=args.model, model_info=source_of(teacher), progress=not args.no_progress,
        feature_dtype=args.feature_dtype, latency_tokens=args.latency_tokens, onnx_precision=args.precision,
        decomposition=args.decomposition)
    if args.latency_tokens is not None:  # a bad length fails before the search's passes over data
        from coformer.compiler.planning import latency_tokens

        latency_tokens(teacher, data, args.latency_tokens)
    if not args.no_progress:
        print(f"compile: {args.model} on {compute.describe()}", file=sys.stderr)
    out = run_job(job)
    if args.measure:  # served after the compile, by the tools (the compiler serves nothing)
        from coformer.tools.measure import measure_job

        x_test = data.test.head(args.measure_samples).numpy()
        out.report.update(measure_job(job, out, x_test, None if data.test.y is None else data.test.y.numpy()))
    result, report = out.result, {**({"task_head": head} if head else {}), **out.report}
    if fits:
        report["predictor"] = fits
    if args.student:
        report["students"] = build_students(job, result.manifest, not args.no_progress)
    print_report(args, result, report, task, job.checkpoint_dir)
    if args.report_json:
        atomic_write_json(args.report_json, report)
    return 0


def print_report(args: argparse.Namespace, result, report: dict, task: str, resume_dir: Path) -> None:
    """What a compile prints: the bundle, its scores and collaboration gain, each device's sub-model,
    memory, the search, the students and the measured latency."""
    acc = result.accuracy
    print(f"bundle: {args.out} (policy: {result.policy.source})")
    if report["resumed_submodels"]:
        print(f"resumed: sub-models {[i + 1 for i in report['resumed_submodels']]} from {resume_dir}")
    if task == "embedding":
        rp = acc["ridge_probe"]
        print(f"embedding (dim {result.manifest.task['dim']}, {'normalised' if result.manifest.task['normalize'] else 'not normalised'}): "
              f"mean cosine to the teacher {acc['mean_cosine']:.4f} (worst {acc['min_cosine']:.3f}), nearest-neighbour "
              f"agreement {acc['nn_agreement'] * 100:.1f}% ({acc['samples']} test samples); uncalibrated sub-models "
              f"with a ridge map: {rp['mean_cosine']:.4f}, {rp['nn_agreement'] * 100:.1f}%; sub-models alone "
              + ", ".join(f"{c:.3f}" for c in acc["submodel_cosines"]))
        kept = acc["calibration"]
        if kept["kept"] == "ridge":
            print(f"note: distillation did not beat the uncalibrated sub-models with a ridge map on the validation "
                  f"split (mean cosine {kept['val_cosine']['distilled']:.4f} against {kept['val_cosine']['ridge']:.4f}): "
                  "the bundle serves those. More sentences or --epochs may change that.")
    else:
        against = " (no labels: agreement with the teacher's decisions)" if acc.get("reference") == "teacher" else ""
        print(f"teacher accuracy {acc['teacher_accuracy'] * 100:.1f}%, ensemble {acc['ensemble_accuracy'] * 100:.1f}%, "
              f"sub-models {', '.join(f'{a * 100:.1f}%' for a in acc['submodel_accuracies'])}{against} "
              f"({acc['samples']} test samples)")
    if "collaboration" in report:
        c = report["collaboration"]
        unit = (lambda v: f"{v:+.4f}") if task == "embedding" else (lambda v: f"{v * 100:+.1f} points")
        print(f"collaboration gain {unit(c['gain'])}: the ensemble against {c['best_single_device']} alone, the best "
              f"single device (decomposition {report['decomposition']}"
              + (", residual calibration" if report["residual"] else "") + ")")
    if "ensemble_accuracy_float32_features" in report:
        print(f"features on the wire: {report['feature_dtype']} (half the bytes); the ensemble scores "
              f"{report['ensemble_accuracy'] * 100:.1f}% on them, {report['ensemble_accuracy_float32_features'] * 100:.1f}% "
              "on float32 features")
    for d in result.manifest.devices:
        print(f"  {d.device:<12} {d.role:<8} {d.flops / 1e6:9.1f} MFLOPs  {d.params / 1e6:7.2f} M params  "
              f"feature {d.feature_dim}")
    mem = report["memory"]
    print(f"memory: teacher {mem['teacher_param_bytes'] / 2**20:.1f} MiB of parameters; largest sub-model "
          f"{mem['largest_param_bytes'] / 2**20:.1f} MiB ({mem['largest_param_fraction'] * 100:.1f}% of the teacher)"
          + (f"; the teacher exceeds the budget of {', '.join(mem['teacher_exceeds'])}" if mem["teacher_exceeds"] else ""))
    if "search" in report:
        s = report["search"]
        print("search: " + ", ".join(f"{m} best objective {s[m]['best_objective']:.4f}"
                                     for m in ("bo", "random", "uniform") if m in s)
              + f"; predicted latency {report['predicted_latency_ms']:.2f} ms"
              + (f" at {report['latency_tokens']} tokens" if "latency_tokens" in report else ""))
    for name, st in report.get("students", {}).items():
        predicted = "" if st["predicted_latency_ms"] is None else f", predicted {st['predicted_latency_ms']:.2f} ms"
        if task == "embedding":
            score = (f"mean cosine {st['mean_cosine']:.4f} (CoFormer {acc['mean_cosine'] - st['mean_cosine']:+.4f}), "
                     f"nearest-neighbour agreement {st['nn_agreement'] * 100:.1f}%")
        else:
            score = f"accuracy {st['accuracy'] * 100:.1f}%"
        print(f"{name}: {st['device']} alone, {st['flops'] / 1e6:.1f} of {st['flops_budget'] / 1e6:.1f} MFLOPs "
              f"({st['policy_source']}), {score}{predicted}; bundle {st['bundle']} "
              "(`coformer bench` measures it beside CoFormer)")
    if "measured_latency_ms" in report:
        line = f"measured latency (served here, devices emulated): {report['measured_latency_ms']:.2f} ms"
        if "predicted_latency_local_ms" in report:
            line += (f"; predicted for this machine {report['predicted_latency_local_ms']:.2f} ms "
                     f"(loopback links, calibrated on "
                     f"{len(report['predicted_latency_local_terms_ms']['probes'])} probe bundles served beside it)")
        print(line)
