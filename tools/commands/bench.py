"""``coformer bench``: CoFormer against the teacher alone, the baselines and the students, on the testbed."""

from __future__ import annotations

import argparse
from pathlib import Path

from coformer.runtime.errors import CoFormerError
from coformer.tools.commands.args import (add_compute_args, add_data_args, add_model_args, compute_from_args,
                                          data_from_args, teacher_from_args)


def bench_strategies() -> tuple[str, ...]:
    from coformer.tools.bench import STRATEGIES

    return STRATEGIES


def register(sub) -> None:
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
    add_compute_args(p)
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
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
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
    rates = bench.parse_bandwidths(args.bandwidth)  # a bad rate fails before any expensive preparation
    if args.no_testbed and len(rates) > 1:  # (so does a sweep without the testbed: not after the compiles)
        raise CoFormerError("a bandwidth sweep needs the testbed (root); without it links are loopback")
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
        compute = compute_from_args(args)
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
