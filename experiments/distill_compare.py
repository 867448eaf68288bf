"""Hard (paper eq. 14) against soft (KL to the temperature-softened logits) distillation, on the
built-in tasks, with everything else equal.

    python -m experiments.distill_compare [--tasks digits,sentiment] [--temperature 4] [--seeds 1]
        [--report-json PATH]

* ``digits``: the quickstart's ViT teacher (trained once and cached) on scikit-learn's
  digits, for the quickstart's three devices;
* ``sentiment``: the text quickstart's BERT (trained here, a minute) on the built-in
  reviews, for the same devices.

Each task is compiled twice per seed with the heuristic policy and the quickstart's
calibration settings, once per distillation; the test-split accuracy of the
ensemble, its agreement with the teacher and each sub-model's accuracy are
printed side by side (in PyTorch: the served bundle answers the same, see the
quickstart's checks).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from coformer.runtime.files import atomic_write_json
from coformer.runtime.errors import CoFormerError

TASKS = ("digits", "sentiment")


def _task(name: str, work: Path):
    """(teacher, devices, data, boost epochs, aggregator epochs) of a built-in task."""
    from coformer.compiler.cost import teacher_cost
    from coformer.compiler.families import adapter_for

    if name == "digits":
        from coformer.tools.quickstart import load_quickstart

        qs = load_quickstart()
        return qs.teacher, qs.devices, qs.data, qs.config.boost_epochs, qs.config.aggregator_epochs
    from coformer.calibration.text import SENTIMENT_LABELS, sentiment_records, text_dataset
    from coformer.compiler.hf import encoder_for, fit_head, load_hf
    from coformer.compiler.specs import DeviceSpec
    from coformer.tools.quickstart_text import TextQuickstartConfig, train_text_teacher

    cfg = TextQuickstartConfig()
    teacher = load_hf(train_text_teacher(cfg, work / "bert", progress=False), max_length=cfg.max_length)
    data = text_dataset(sentiment_records(cfg.examples, cfg.seed + 1), encoder_for(teacher, pair=False),
                        labels=SENTIMENT_LABELS)
    fit_head(teacher, data)
    flops = teacher_cost(adapter_for(teacher).read_shape(teacher)).flops
    devices = [DeviceSpec(f"edge-{chr(97 + i)}", 512 << 20, int(cfg.flops_fraction * s * flops), cpu_share=s)
               for i, s in enumerate(cfg.shares)]
    return teacher, devices, data, cfg.boost_epochs, cfg.aggregator_epochs


def compare(tasks: Sequence[str], temperature: float, seeds: int) -> list[dict[str, Any]]:
    import torch

    from coformer.calibration.booster import BoostConfig
    from coformer.compiler.job import CompileJob, run_job
    from coformer.compiler.inference import run_batched

    work = Path(tempfile.mkdtemp(prefix="coformer-distill-"))
    rows = []
    try:
        for name in tasks:
            teacher, devices, data, epochs, agg_epochs = _task(name, work)
            with torch.no_grad():
                teacher_test = run_batched(teacher, data.test.x).argmax(-1)
            for seed in range(seeds):
                for distill in ("hard", "soft"):
                    torch.manual_seed(seed)
                    res = run_job(CompileJob(teacher, devices, data, work / f"{name}-{distill}-{seed}",
                                             boost=BoostConfig(epochs=epochs, seed=seed, distill=distill,
                                                               temperature=temperature),
                                             aggregator_epochs=agg_epochs, progress=False, search="heuristic")).result
                    with torch.no_grad():
                        feats = [run_batched(s, data.test.x) for s in res.submodels]
                        pred = res.aggregator(*feats).argmax(-1)
                    acc = res.accuracy
                    rows.append({"task": name, "distill": distill, "seed": seed,
                                 "teacher_accuracy": acc["teacher_accuracy"],
                                 "ensemble_accuracy": acc["ensemble_accuracy"],
                                 "agreement_with_teacher": float((pred == teacher_test).float().mean()),
                                 "submodel_accuracies": acc["submodel_accuracies"], "temperature": temperature})
                    r = rows[-1]
                    print(f"{name:<10} {distill:<5} seed {seed}: ensemble {100 * r['ensemble_accuracy']:.1f}% "
                          f"(teacher {100 * r['teacher_accuracy']:.1f}%), agrees with the teacher "
                          f"{100 * r['agreement_with_teacher']:.1f}%, sub-models "
                          + ", ".join(f"{100 * a:.1f}%" for a in r["submodel_accuracies"]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.distill_compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--report-json", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise CoFormerError(f"--tasks {bad or args.tasks!r}: expected some of {list(TASKS)}")
        if args.seeds < 1:
            raise CoFormerError(f"--seeds {args.seeds} must be >= 1")
        rows = compare(tasks, args.temperature, args.seeds)
        if args.report_json:
            atomic_write_json(args.report_json, {"rows": rows})
        return 0
    except CoFormerError as e:
        print(f"distill_compare: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
