"""Where collaboration starts to pay for text: a language bundle against its teacher alone on
the strongest device, at several sequence lengths, served by the same runtime.

    python -m experiments.text_latency BUNDLE --model hf:PATH --devices devices.yaml \\
        [--lengths 32,128,256] [--testbed] [--bandwidth 2mbit] [--samples 40] [--out DIR]

A text request costs in proportion to its tokens (attention in their square), while the
features the workers send stay d_n numbers, so the balance moves with length. For each
length T the inputs are T tokens exactly (ids drawn within the vocabulary, a full
mask), and ``coformer bench``'s runner (:func:`coformer.tools.bench.run_bench`) serves
the bundle and the teacher's own bundle (built once beside BUNDLE) in interleaved
passes: on loopback (every device emulated on this machine), or with ``--testbed``
(root) in network namespaces with shaped links, the input either at every device
(``device``) or sent out by the central node (``central``). The bundle must have been
compiled with ``--max-length`` at least the longest T. Accuracy is not measured here
(random tokens): latency only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from coformer.runtime.files import atomic_write_json
from coformer.runtime.errors import CoFormerError


def tokens(manifest, length: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` packed token tensors ``[n, k, length]``: ids within the vocabulary (past the
    special ids), a full mask, zero token types."""
    pre = manifest.input.preprocessing
    k = int(manifest.input.shape[0])
    if length > int(manifest.input.shape[1]):
        raise CoFormerError(f"length {length} exceeds the bundle's {manifest.input.shape[1]} tokens; compile it with "
                            f"--max-length {length}")
    rng = np.random.default_rng(seed)
    x = np.zeros((n, k, length), dtype=np.int64)
    x[:, 0] = rng.integers(min(5, int(pre["vocab_size"]) - 1), int(pre["vocab_size"]), size=(n, length))
    x[:, 1] = 1
    return x


def run(bundle: Path, teacher, devices, lengths: Sequence[int], out_dir: Path, use_testbed: bool,
        bandwidth: str, samples: int, passes: int, progress: bool) -> dict[str, Any]:
    import torch

    from coformer.compiler.baselines import build_text_teacher
    from coformer.runtime.manifest import load_manifest
    from coformer.tools.bench import bundle_devices, parse_bandwidths, run_bench

    manifest = load_manifest(bundle)
    if not manifest.input.is_text:
        raise CoFormerError(f"{bundle} is not a language-model bundle; image bundles go to coformer bench")
    devices = bundle_devices(manifest, devices)
    teacher_dir = out_dir / "teacher-bundle"
    if not (teacher_dir / "manifest.json").is_file():
        example = torch.as_tensor(tokens(manifest, min(lengths), 3))
        build_text_teacher(teacher, devices[0], example, teacher_dir, manifest.labels,
                           dict(manifest.input.preprocessing), task=dict(manifest.task))
    rows = []
    for T in lengths:
        x = tokens(manifest, T, samples, seed=T)
        report = run_bench([(devices, {"coformer": Path(bundle), "teacher": teacher_dir})], x,
                           np.zeros(len(x), dtype=np.int64), out_dir / f"T{T}", parse_bandwidths(bandwidth),
                           ["device", "central"], use_testbed, samples, 120.0, progress=progress, passes=passes,
                           throughput=())
        for r in report["results"]:
            if r["status"] == "ok":
                rows.append({"tokens": T, "strategy": r["strategy"], "input_source": r["input_source"],
                             "bandwidth": r["bandwidth"], "median_ms": r["latency_ms"]["median"],
                             "p90_ms": r["latency_ms"]["p90"], "breakdown_ms": r["breakdown_ms"],
                             "bytes_per_inference": r["bytes_per_inference"], "samples": r["samples"]})
            else:
                rows.append({"tokens": T, "strategy": r["strategy"], "input_source": r["input_source"],
                             "status": r["status"]})
    for T in lengths:
        t = next((r for r in rows if r["tokens"] == T and r["strategy"] == "teacher" and "median_ms" in r), None)
        for r in rows:
            if r["tokens"] == T and t and "median_ms" in r and r["strategy"] == "coformer":
                r["speedup_vs_teacher"] = t["median_ms"] / r["median_ms"]
    return {"rows": rows, "testbed": use_testbed, "bandwidth": bandwidth if use_testbed else "loopback",
            "devices": [d.to_dict() for d in devices]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from coformer.tools.commands.args import add_model_args, teacher_from_args

    p = argparse.ArgumentParser(prog="python -m experiments.text_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    add_model_args(p)
    p.add_argument("--devices", type=Path, required=True)
    p.add_argument("--lengths", default="32,128,256")
    p.add_argument("--testbed", action="store_true", help="namespaces, shaped links and cgroups (root)")
    p.add_argument("--bandwidth", default="2mbit")
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="default: BUNDLE/../text-latency")
    p.add_argument("--report-json", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        from coformer.compiler.devices import load_devices

        lengths = [int(v) for v in args.lengths.split(",")]
        if not lengths or min(lengths) < 1:
            raise CoFormerError(f"--lengths {args.lengths!r}: give positive token counts, e.g. 32,128,256")
        if args.testbed:
            from coformer.tools.bench import check_testbed

            check_testbed()
        teacher = teacher_from_args(args)
        out = args.out or args.bundle.resolve().parent / "text-latency"
        report = run(args.bundle, teacher, load_devices(args.devices), lengths, out, args.testbed, args.bandwidth,
                     args.samples, args.passes, not args.no_progress)
        print(f"{'tokens':>6} {'strategy':<10} {'input from':<10} {'median ms':>10} {'p90 ms':>8} {'bytes':>8}  speedup")
        for r in report["rows"]:
            if "median_ms" not in r:
                print(f"{r['tokens']:>6} {r['strategy']:<10} {r['input_source']:<10} {r['status']}")
                continue
            speed = f"{r['speedup_vs_teacher']:.2f}x" if "speedup_vs_teacher" in r else ""
            print(f"{r['tokens']:>6} {r['strategy']:<10} {r['input_source']:<10} {r['median_ms']:>10.2f} "
                  f"{r['p90_ms']:>8.2f} {r['bytes_per_inference']:>8,}  {speed}")
        if args.report_json:
            atomic_write_json(args.report_json, report)
        return 0
    except CoFormerError as e:
        print(f"text_latency: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
