"""Real English sentences that ship on every machine with Python: the interpreter's help
topics (``pydoc_data``) and the docstrings of the standard library and of installed
packages, for calibrating and judging sentence encoders offline.

    python -m coformer.tools.sample_text OUT.txt [--packages numpy,scipy,sklearn,matplotlib] [--seed 0]

Sentences are split at ``.!?`` before a capital, kept at 6-32 words without code
characters, deduplicated and shuffled (``--seed``); one per line, no labels (a
``.txt`` file: label-free calibration). Which sentences come out depends on the
installed versions; the count is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import pkgutil
import random
import re
import sys
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

from coformer.runtime.files import atomic_write_bytes

SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtledemo", "turtle"}


def _quiet_import(name: str):
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return importlib.import_module(name)
    except BaseException:  # a module may exit, need a display, or fail in many ways
        return None


def _docs(module, owner: str) -> Iterable[str]:
    for attr in dir(module):
        obj = getattr(module, attr, None)
        try:
            doc = inspect.getdoc(obj)
        except Exception:
            doc = None
        if doc and getattr(obj, "__module__", owner) == owner:
            yield doc


def collect(packages: Sequence[str], per_package: int = 400) -> list[str]:
    """The raw texts: help topics, standard-library docstrings, then each package's modules'."""
    from pydoc_data.topics import topics

    texts = list(topics.values())
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP:
            continue
        mod = _quiet_import(name)
        if mod is not None:
            texts += [inspect.getdoc(mod) or ""] + list(_docs(mod, name))
    for root in packages:
        pkg = _quiet_import(root)
        if pkg is None or not hasattr(pkg, "__path__"):
            continue
        names = [root] + [m.name for m in pkgutil.walk_packages(pkg.__path__, root + ".", onerror=lambda n: None)
                          if "test" not in m.name and "._" not in m.name]
        for name in names[:per_package]:
            mod = _quiet_import(name)
            if mod is not None:
                texts += list(_docs(mod, name))
    return texts


def sentences(texts: Iterable[str], seed: int = 0) -> list[str]:
    text = re.sub(r"\s+", " ", " ".join(texts))
    out, seen = [], set()
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
        s = s.strip()
        words = s.split()
        if 6 <= len(words) <= 32 and not any(c in s for c in "{}[]<>|\\=_#@$`~^") and s not in seen \
                and s[0].isalpha() and s[-1] in ".!?":
            out.append(s)
            seen.add(s)
    random.Random(seed).shuffle(out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coformer.tools.sample_text", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--packages", default="numpy,scipy,sklearn,matplotlib,PIL,onnx,zmq,yaml")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    found = sentences(collect([x for x in args.packages.split(",") if x]), args.seed)
    atomic_write_bytes(args.out, ("\n".join(found) + "\n").encode())
    print(f"{args.out}: {len(found)} sentences")
    return 0


if __name__ == "__main__":
    sys.exit(main())
