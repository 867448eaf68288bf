"""``coformer``: compile a transformer for a few unequal devices, serve it, try it.

  coformer quickstart [--fast] [--out DIR] [--report-json PATH]
  coformer compile --model quickstart --devices devices.yaml --out BUNDLE [--policy FILE]
  coformer serve BUNDLE [--front tcp://127.0.0.1:5555]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from coformer.runtime.errors import CoFormerError

THROTTLES = ["auto", "cgroup", "duty-cycle", "none"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coformer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quickstart", help="the whole pipeline on digits with three emulated devices")
    p.add_argument("--out", type=Path, default=None, help="folder for the bundle, teacher and report "
                   "(default: ./coformer-quickstart)")
    p.add_argument("--fast", action="store_true", help="a small teacher and short calibration (for tests)")
    p.add_argument("--report-json", type=Path, default=None, help="write the measured report here")
    p.add_argument("--throttle", default="auto", choices=THROTTLES,
                   help="how device shares are enforced (auto: cgroup quota where root allows, else duty cycle)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("compile", help="decompose, calibrate and lower a teacher into a bundle")
    p.add_argument("--model", required=True,
                   help="'quickstart' (the quickstart teacher) or 'timm:NAME' with --checkpoint")
    p.add_argument("--checkpoint", type=Path, default=None, help="local state_dict for a timm model")
    p.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for timm.create_model")
    p.add_argument("--devices", type=Path, required=True, help="devices file (YAML or JSON)")
    p.add_argument("--data", default="digits", choices=["digits"], help="calibration data set")
    p.add_argument("--policy", type=Path, default=None, help="use this policy (JSON) instead of the heuristic")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--epochs", type=int, default=5, help="calibration epochs per sub-model")
    p.add_argument("--unlabeled", action="store_true", help="calibrate from the teacher's decisions only")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("serve", help="serve a bundle on this machine: central node and workers as processes")
    p.add_argument("bundle", type=Path)
    p.add_argument("--front", default="tcp://127.0.0.1:5555", help="endpoint clients connect to")
    p.add_argument("--throttle", default="auto", choices=THROTTLES)
    return parser


def _load_teacher(args: argparse.Namespace):
    if args.model == "quickstart":
        from coformer.calibration.data import load_digits_dataset
        from coformer.tools.quickstart import QuickstartConfig, load_or_train_teacher

        cfg = QuickstartConfig()
        return load_or_train_teacher(cfg, load_digits_dataset(cfg.img_size), not args.no_progress)[0]
    if args.model.startswith("timm:"):
        import timm
        import torch

        if args.checkpoint is None or not args.checkpoint.is_file():
            raise CoFormerError(f"--model {args.model} needs --checkpoint pointing at a local state_dict "
                                f"(got {args.checkpoint}); weights are never downloaded")
        try:
            kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as e:
            raise CoFormerError(f"--model-kwargs is not JSON: {e}") from None
        try:
            model = timm.create_model(args.model[5:], pretrained=False, **kwargs)
        except RuntimeError as e:
            raise CoFormerError(f"timm cannot build {args.model[5:]!r}: {e}") from None
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except RuntimeError as e:
            raise CoFormerError(f"checkpoint {args.checkpoint} does not fit {args.model}: {str(e)[:500]}") from None
        return model.eval()
    raise CoFormerError(f"--model {args.model!r}: expected 'quickstart' or 'timm:NAME'")


def cmd_compile(args: argparse.Namespace) -> int:
    from coformer.calibration.booster import BoostConfig
    from coformer.calibration.data import load_digits_dataset
    from coformer.compiler.devices import load_devices
    from coformer.compiler.pipeline import compile_bundle
    from coformer.compiler.specs import Policy

    devices = load_devices(args.devices)
    policy = Policy.load(args.policy) if args.policy else None
    teacher = _load_teacher(args)
    in_chans, h, w = teacher.patch_embed.proj.in_channels, *teacher.patch_embed.img_size
    if in_chans != 1 or h != w:
        raise CoFormerError(f"the built-in digits data is 1-channel square; the model takes {in_chans}x{h}x{w}")
    result = compile_bundle(teacher, devices, load_digits_dataset(h), args.out, policy=policy,
                            boost=BoostConfig(epochs=args.epochs), use_labels=not args.unlabeled,
                            model_name=args.model, progress=not args.no_progress)
    acc = result.accuracy
    print(f"bundle: {args.out}")
    print(f"teacher accuracy {acc['teacher_accuracy'] * 100:.1f}%, ensemble {acc['ensemble_accuracy'] * 100:.1f}%, "
          f"sub-models {', '.join(f'{a * 100:.1f}%' for a in acc['submodel_accuracies'])}")
    for d in result.manifest.devices:
        print(f"  {d.device:<12} {d.role:<8} {d.flops / 1e6:9.1f} MFLOPs  {d.params / 1e6:7.2f} M params  "
              f"feature {d.feature_dim}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import threading

    from coformer.runtime.worker import install_stop_signals
    from coformer.tools.cluster import LocalCluster

    stop = threading.Event()
    install_stop_signals(stop)
    cluster = LocalCluster(args.bundle, throttle=args.throttle, front=args.front)
    endpoints = cluster.start()
    try:
        m = cluster.manifest
        print(f"serving {args.bundle} ({m.model.get('name')}): clients connect to {endpoints['front']}")
        for d in m.devices:
            p = cluster.placements[d.device]
            print(f"  {d.device:<12} {d.role:<8} cores {list(p.cores or [])} share {p.cpu_share:.2f}")
        print("press Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            for name, proc in cluster.procs.items():
                if proc.poll() is not None:
                    raise CoFormerError(f"{name} exited with code {proc.returncode}; see its log")
    finally:
        cluster.stop()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        if args.command == "quickstart":
            from coformer.tools.quickstart import run_quickstart

            run_quickstart(args.out, fast=args.fast, report_json=args.report_json, throttle=args.throttle,
                           progress=not args.no_progress)
            return 0
        if args.command == "compile":
            return cmd_compile(args)
        if args.command == "serve":
            return cmd_serve(args)
    except CoFormerError as e:
        print(f"coformer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
