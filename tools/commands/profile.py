"""``coformer profile-kit``, ``fit-predictor`` and ``profile-stats``: the devices' latency profiles and predictors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from coformer.tools.commands.args import add_model_args, teacher_from_args


def register(sub) -> None:
    p = sub.add_parser("profile-kit", help="ONNX sub-models spanning the search space, to time on each device")
    add_model_args(p)
    p.add_argument("--out", type=Path, required=True, help="kit folder to write")
    p.add_argument("--count", type=int, default=40, help="number of sub-models")
    p.add_argument("--refine", type=Path, default=None,
                   help="a DEVICE.json of this kit: add --count entries next to the worst-predicted ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=profile_kit)

    p = sub.add_parser("fit-predictor", help="fit a device's latency predictor from its profile")
    p.add_argument("profile", type=Path, help="DEVICE.json from coformer-runtime profile")
    p.add_argument("--out", type=Path, default=None, help="predictor JSON to write")
    p.add_argument("--report-json", type=Path, default=None, help="accuracy on held-out kit entries")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=fit_predictor)

    p = sub.add_parser("profile-stats", help="how far device profiles can be trusted: leave-one-out accuracy, "
                       "and over profiles of one kit, the predictor's systematic error against the noise")
    p.add_argument("profiles", type=Path, nargs="+", help="DEVICE.json files from coformer-runtime profile")
    p.add_argument("--report-json", type=Path, default=None, help="the report as JSON")
    p.set_defaults(run=profile_stats)


def profile_kit(args: argparse.Namespace) -> int:
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


def fit_predictor(args: argparse.Namespace) -> int:
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


def profile_stats(args: argparse.Namespace) -> int:
    from coformer.tools.profile_stats import main

    return main(args.profiles, args.report_json)
