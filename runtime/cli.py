"""``coformer-runtime``: run one role of a served bundle on a device (no torch needed).

  coformer-runtime central BUNDLE --front tcp://*:5555 --back tcp://*:5556
  coformer-runtime worker  BUNDLE --device jetson-nano --central tcp://10.0.0.2:5556
  coformer-runtime infer   BUNDLE --central tcp://10.0.0.2:5555 --input x.npy
  coformer-runtime infer   BUNDLE --central tcp://10.0.0.2:5555 --image photo.jpg --top-k 5
  coformer-runtime verify  BUNDLE
  coformer-runtime doctor  [BUNDLE]   (run first on a new device: what works, what to install)
  coformer-runtime keys    KEYS --bundle BUNDLE --clients laptop   (key folders per role; signs BUNDLE)
  coformer-runtime sign    BUNDLE --key KEYS/operator/operator.signing

Off loopback every link is authenticated and encrypted (ZeroMQ CURVE): give each
role its folder from `keys` with --keys, or --insecure to run plain TCP.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from coformer.runtime.commands import COMMANDS
from coformer.runtime.errors import CoFormerError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coformer-runtime", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:  # one module each (coformer.runtime.commands)
        command.register(sub)
    return parser


def run(args: argparse.Namespace) -> int:
    return args.run(args)


def cli_main(prog: str, parser: argparse.ArgumentParser, run_fn, argv: Optional[Sequence[str]] = None) -> int:
    """Parse, set up logging, run; a :class:`CoFormerError` becomes one line and exit code 2.

    Shared by ``coformer`` and ``coformer-runtime``. Other exceptions are bugs
    and keep their traceback.
    """
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        return run_fn(args)
    except CoFormerError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli_main("coformer-runtime", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
