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
import sys
from typing import Optional, Sequence

from coformer.tools.commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coformer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:  # one module each (coformer.tools.commands)
        command.register(sub)
    return parser


def run(args: argparse.Namespace) -> int:
    return args.run(args)


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
