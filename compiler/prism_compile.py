"""PRISM's builder (:mod:`coformer.compiler.strategies`): fine-tune where asked
(:mod:`coformer.compiler.prism_finetune`), then write the bundle (:mod:`coformer.compiler.prism_bundle`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from torch import nn

from coformer.compiler.prism_bundle import build_prism
from coformer.runtime.errors import CoFormerError


@dataclasses.dataclass
class PrismBuild:
    """What :func:`compile_prism_job` built: the bundle's manifest, and the fine-tuned weights
    (None: the teacher's own) with the fine-tuning's report."""

    manifest: Any
    tuned: Optional[nn.Module] = None
    finetune: Optional[dict[str, Any]] = None


PRISM_OPTIONS = ("compression_rate", "finetune_epochs", "finetune_lr")


def compile_prism_job(job) -> Any:
    """PRISM's builder (:mod:`coformer.compiler.strategies`): at ``job.options["compression_rate"]``
    (default 4), first fine-tuned under PRISM's forward for ``finetune_epochs`` (default 0) at
    ``finetune_lr`` (default ``prism_finetune.DEFAULT_LR``) where asked, then :func:`~coformer.compiler.prism_bundle.build_prism`. The job's policy, search
    and calibration settings do not apply: PRISM runs the teacher's weights."""
    from coformer.compiler.job import JobResult
    from coformer.compiler.strategies import check_options

    check_options("prism", job.options, PRISM_OPTIONS)
    cr = job.options.get("compression_rate", 4)
    epochs = int(job.options.get("finetune_epochs", 0))
    if epochs < 0:
        raise CoFormerError(f"--finetune-epochs {epochs} must be >= 0")
    if epochs and int(cr) == 1:
        raise CoFormerError("--finetune-epochs needs --compression-rate > 1: at CR = 1 PRISM is the teacher")
    tuned, finetune = None, None
    if epochs:
        from coformer.compiler.prism_finetune import DEFAULT_LR, finetune_for_devices

        tuned, finetune = finetune_for_devices(job.teacher, job.devices, job.data, int(cr), epochs,
                                               float(job.options.get("finetune_lr", DEFAULT_LR)), job.compute,
                                               job.seed, progress=job.progress)
    data = job.data
    manifest = build_prism(job.teacher, job.devices, data.val.head(3), job.out_dir, data.labels,
                           dict(data.preprocessing), cr, model_name=job.model_name, tuned=tuned, finetune=finetune)
    return JobResult(PrismBuild(manifest, tuned, finetune), {"compression_rate": int(cr), "finetune": finetune},
                     "prism")
