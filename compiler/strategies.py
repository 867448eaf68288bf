"""Compiling, one plug-in per strategy (issue 40): the compiler side of
:mod:`coformer.runtime.strategies`.

Every compile goes through :func:`coformer.compiler.job.run_job` with a
:class:`~coformer.compiler.job.CompileJob`; the job's ``strategy`` picks the function that
writes its bundle, listed here by name:

* ``coformer``: decompose, calibrate, fuse and lower (:func:`coformer.compiler.job.compile_decomposed`);
  the students and the uniform decomposition are CoFormer bundles of other policies;
* ``prism``: the teacher's own weights (optionally fine-tuned) on every device, each on its share
  of the positions (:func:`coformer.compiler.prism_compile.compile_prism_job`);
* ``teacher``, ``pipeline``, ``tensor_parallel``: the bench's baselines
  (:func:`coformer.compiler.baselines.compile_baseline_job`).

A builder takes the job and returns a :class:`~coformer.compiler.job.JobResult` whose ``report``
says what it built. Settings only one strategy has travel in ``job.options`` (PRISM's
``compression_rate``, ``finetune_epochs``, ``finetune_lr``; a baseline's ``task``), and each
builder refuses the options it does not take. Adding a strategy: its builder, a line here, its
runtime plug-in, and its tests.

The table names modules instead of importing them, as the runtime's does: a builder imports
the job module, which looks builders up here.
"""

from __future__ import annotations

from coformer.runtime.errors import CoFormerError
from coformer.runtime.strategies import lookup

COMPILERS = {
    "coformer": "coformer.compiler.job:compile_decomposed",
    "prism": "coformer.compiler.prism_compile:compile_prism_job",
    "teacher": "coformer.compiler.baselines:compile_baseline_job",
    "pipeline": "coformer.compiler.baselines:compile_baseline_job",
    "tensor_parallel": "coformer.compiler.baselines:compile_baseline_job",
}


def compiler_for(name: str):
    """The function that compiles a job of strategy ``name`` (module doc)."""
    return lookup(COMPILERS, name)


def check_options(strategy: str, options, allowed) -> None:
    """Refuse, by name, options a strategy's builder does not take."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise CoFormerError(f"the {strategy} strategy takes no {', '.join(map(repr, unknown))} "
                            f"(it takes {sorted(allowed) or 'no options'})")
