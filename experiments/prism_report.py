"""PRISM's trade-off on a quickstart run (issue 23): accuracy and agreement with the teacher
against the compression rate, and the bytes an inference exchanges against it.

    python -m experiments.prism_report --quickstart coformer-quickstart --out prism-vision
    python -m experiments.prism_report --quickstart coformer-quickstart-text --out prism-text

Accuracy is PRISM's PyTorch forward on the run's whole test split, on its three devices'
shares of the positions; the served bundle reproduces that forward within 1e-4
(``coformer.compiler.prism_bundle.PARITY_TOLERANCE``), so this needs no serving. Bytes are
what the served bundle exchanges through the central node (``plan_communication``), beside
what the paper's setting (every device to every other, all layers) exchanges; the paper's
figure is a 99.2% reduction for BERT at CR = 128. Writes ``prism.json``, ``prism.md`` and
``prism.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from coformer.runtime.errors import CoFormerError
from coformer.runtime.files import atomic_write_bytes, atomic_write_json

DEFAULT_CRS = (1, 2, 4, 8, 16, 32)


def quickstart_task(qs_dir: Path):
    """The run's teacher, devices and data, vision or text."""
    from coformer.tools.bench.runner import is_text_quickstart, quickstart_inputs, text_quickstart_inputs

    if is_text_quickstart(qs_dir):
        teacher, devices, data, _ = text_quickstart_inputs(qs_dir)
        return "text", teacher, devices, data
    teacher, devices, data, _, _ = quickstart_inputs(qs_dir, progress=False)
    return "vision", teacher, devices, data


def prism_report(qs_dir: Path, crs: Sequence[int] = DEFAULT_CRS, finetune_epochs: int = 0,
                 lr: Optional[float] = None) -> dict[str, Any]:
    """The sweep (module doc); with ``finetune_epochs``, each CR > 1 is also fine-tuned
    (:func:`coformer.compiler.prism_finetune.finetune_prism`) and scored with the tuned weights,
    whether or not the validation split would keep them (``finetuned``, beside ``kept``)."""
    from coformer.compiler import prism as P
    from coformer.compiler.prism_bundle import prism_family, plan_communication, prism_scores

    task, teacher, devices, data = quickstart_task(Path(qs_dir))
    fam = prism_family(teacher.eval())
    shares = P.share_positions(fam.tokens(), [d.cpu_share for d in devices])
    scores = prism_scores(teacher, data, shares, crs)
    tuned_scores: dict[int, dict[str, Any]] = {}
    for cr in (c for c in crs if finetune_epochs and c > 1):
        from coformer.compiler.prism_finetune import DEFAULT_LR, finetune_prism

        tuned, info = finetune_prism(teacher, data, shares, cr, finetune_epochs, lr or DEFAULT_LR)
        at = prism_scores(teacher, data, shares, [cr], weights={cr: tuned})["by_cr"][cr]
        tuned_scores[cr] = {**at, **{k: info[k] for k in ("kept", "validation", "seconds", "epochs", "lr")}}
        print(f"CR {cr}: fine-tuned {finetune_epochs} epochs in {info['seconds']:.0f} s, test accuracy "
              f"{scores['by_cr'][cr]['accuracy'] * 100:.1f}% -> {at['accuracy'] * 100:.1f}%", file=sys.stderr)
    rows = []
    for cr in crs:
        served = plan_communication(teacher, devices, cr)
        paper = P.communication(shares, cr, fam.heads * fam.head_dim, len(fam.blocks), via="direct")
        rows.append({"compression_rate": cr, **scores["by_cr"][cr],
                     "bytes_per_inference": served["bytes_per_inference"], "reduction": served["reduction"],
                     "rounds_per_inference": served["rounds_per_inference"],
                     "all_to_all_bytes": paper["bytes_per_inference"], "all_to_all_reduction": paper["reduction"],
                     "finetuned": tuned_scores.get(cr)})
    return {"task": task, "quickstart": str(qs_dir), "family": fam.name, "positions": fam.tokens(),
            "layers": len(fam.blocks), "width": fam.heads * fam.head_dim, "devices": [d.name for d in devices],
            "shares": shares, "samples": scores["samples"], "teacher_accuracy": scores["teacher_accuracy"],
            "rows": rows}


def markdown(r: dict[str, Any]) -> str:
    lines = [f"PRISM on the {r['task']} quickstart ({r['family']}, {r['positions']} positions, {r['layers']} layers, "
             f"width {r['width']}; shares {r['shares']} on {', '.join(r['devices'])}; {r['samples']} test samples; "
             f"teacher {100 * r['teacher_accuracy']:.1f}%):", "",
             "| CR | accuracy | agrees with teacher | kB per inference (served) | reduction | rounds | "
             "reduction, all-to-all |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for x in r["rows"]:
        lines.append(f"| {x['compression_rate']} | {100 * x['accuracy']:.1f}% | {100 * x['agreement_with_teacher']:.1f}% "
                     f"| {x['bytes_per_inference'] / 1e3:.1f} | {100 * x['reduction']:.1f}% | "
                     f"{x['rounds_per_inference']:.0f} | {100 * x['all_to_all_reduction']:.1f}% |")
    tuned = [x for x in r["rows"] if x.get("finetuned")]
    if tuned:
        f0 = tuned[0]["finetuned"]
        lines += ["", f"Fine-tuned under PRISM ({f0['epochs']} epochs, lr {f0['lr']:g}; kept when the validation "
                  "accuracy rises):", "",
                  "| CR | accuracy, untuned -> tuned | agrees with teacher, tuned | validation, untuned -> tuned | kept "
                  "| seconds |", "| --- | --- | --- | --- | --- | --- |"]
        for x in tuned:
            f, v = x["finetuned"], x["finetuned"]["validation"]
            lines.append(f"| {x['compression_rate']} | {100 * x['accuracy']:.1f}% -> {100 * f['accuracy']:.1f}% | "
                         f"{100 * f['agreement_with_teacher']:.1f}% | {100 * v['before']['accuracy']:.1f}% -> "
                         f"{100 * v['after']['accuracy']:.1f}% | {'yes' if f['kept'] else 'no'} | {f['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    crs = [x["compression_rate"] for x in r["rows"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(crs, [100 * x["accuracy"] for x in r["rows"]], "o-", label="accuracy")
    a.plot(crs, [100 * x["agreement_with_teacher"] for x in r["rows"]], "s--", label="agrees with teacher")
    tuned = [x for x in r["rows"] if x.get("finetuned")]
    if tuned:
        a.plot([x["compression_rate"] for x in tuned], [100 * x["finetuned"]["accuracy"] for x in tuned], "^-",
               label=f"accuracy, fine-tuned {tuned[0]['finetuned']['epochs']} epochs")
    a.axhline(100 * r["teacher_accuracy"], color="grey", lw=0.8, label="teacher")
    b.plot(crs, [x["bytes_per_inference"] / 1e3 for x in r["rows"]], "o-")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression rate CR (positions per mean)")
    a.set_ylabel("%")
    a.legend(fontsize=8)
    b.set_yscale("log")
    b.set_ylabel("kB per inference")
    fig.suptitle(f"PRISM, {r['task']} quickstart ({r['family']}, {len(r['devices'])} devices)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quickstart", type=Path, default=Path("coformer-quickstart"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--crs", default=",".join(map(str, DEFAULT_CRS)), help="compression rates, e.g. 1,4,16")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="also fine-tune each CR > 1 for this many epochs and score the tuned weights")
    p.add_argument("--finetune-lr", type=float, default=None, help="the fine-tuning's peak learning rate")
    args = p.parse_args(argv)
    try:
        from coformer.tools.bench.options import parse_crs

        if not (args.quickstart / "report.json").is_file():
            raise CoFormerError(f"{args.quickstart} holds no quickstart run (run coformer quickstart first)")
        r = prism_report(args.quickstart, parse_crs(args.crs), args.finetune_epochs, args.finetune_lr)
    except CoFormerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "prism.json", r)
    atomic_write_bytes(args.out / "prism.md", markdown(r).encode())
    plot(r, args.out / "prism.png")
    print(markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
