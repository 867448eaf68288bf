"""One-off experiments and report scripts, kept out of the installed package.

Each runs from the repository root, as docs/benchmarks.md gives its command:
``python -m experiments.NAME --help``. They use the installed ``coformer`` package and
nothing here is imported by it.
"""
