"""float32 against float16 features on the quickstart's CoFormer policy, side by side on the
testbed: the same sub-models (the calibration does not depend on the wire), only what the
workers send differs.

    sudo python -m experiments.feature_dtype_compare [QUICKSTART_DIR] [--bandwidth 2mbit]
        [--samples 200] [--report-json PATH]

Compiles the quickstart bundle's policy twice with the quickstart's calibration settings
and seed, once per ``feature_dtype``, then serves both in interleaved passes (each alone
for its turn, inputs at every device) on the quickstart's devices at each link rate, and
reports per dtype: the served accuracy, the compile's scores (the ensemble on rounded
features and on float32 ones), the median latency, the bytes from the devices, and the
physical limit (:func:`coformer.tools.bench.report.physical_limit`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from coformer.runtime.files import atomic_write_json

DTYPES = ("float32", "float16")


def compare(qs_dir: Path, bandwidths: list[float], samples: int, progress: bool = True) -> dict[str, Any]:
    import torch

    from coformer.calibration.booster import BoostConfig
    from coformer.compiler.job import CompileJob, run_job
    from coformer.compiler.specs import Policy
    from coformer.runtime.manifest import load_manifest
    from coformer.tools import testbed as tb
    from coformer.tools.bench.options import bandwidth_name
    from coformer.tools.bench.report import physical_limit
    from coformer.tools.bench.runner import BENCH_MEMORY
    from coformer.tools.quickstart import load_quickstart
    from coformer.tools.served import measure_bundles

    tb.check_can_run()
    qs = load_quickstart(qs_dir, progress)
    cfg = qs.config
    policy = Policy.from_dict(load_manifest(Path(qs_dir) / "bundle").policy)
    work = Path(tempfile.mkdtemp(prefix="coformer-dtype-"))
    bundles, compiled = {}, {}
    for dtype in DTYPES:
        torch.manual_seed(cfg.seed)
        r = run_job(CompileJob(qs.teacher, qs.devices, qs.data, work / dtype, policy=policy,
                               boost=BoostConfig(epochs=cfg.boost_epochs, seed=cfg.seed),
                               aggregator_epochs=cfg.aggregator_epochs, progress=False, feature_dtype=dtype)).result
        bundles[dtype] = work / dtype
        compiled[dtype] = {k: v for k, v in r.accuracy.items() if k.startswith(("ensemble", "teacher"))}
    x, y = qs.data.test.head(len(qs.data.test)).numpy(), qs.data.test.y.numpy()
    np.save(work / "x.npy", x)
    devices = [replace(d, memory_bytes=m) for d, m in zip(qs.devices, BENCH_MEMORY)]
    rows = []
    for mbit in bandwidths:
        bed = tb.up([replace(d, link_mbit_s=mbit) for d in devices])
        try:
            out = measure_bundles(bundles, x, indices=range(min(samples, len(x))), passes=3, alone=True, warmup=5,
                                  bed=bed, local_inputs={k: work / "x.npy" for k in bundles}, timeout_s=120.0)
        finally:
            bed.down()
        for dtype, m in out.items():
            s = m.summary(y)
            row = {"feature_dtype": dtype, "bandwidth": bandwidth_name(mbit), "accuracy": s["accuracy"],
                   "median_ms": s["latency_ms"]["median"], "bytes_from_devices": s["bytes_from_devices"],
                   "samples": s["samples"], "compiled": compiled[dtype]}
            row.update({k: v for k, v in physical_limit(s, load_manifest(bundles[dtype]), mbit).items()
                        if k in ("limit_ms", "measured_over_limit")})
            rows.append(row)
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "policy": [p.summary() for p in policy.submodels]}


def main(argv: Optional[list[str]] = None) -> int:
    from coformer.runtime.errors import CoFormerError
    from coformer.tools.bench.options import parse_bandwidths

    p = argparse.ArgumentParser(prog="python -m experiments.feature_dtype_compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("quickstart", type=Path, nargs="?", default=Path("coformer-quickstart"))
    p.add_argument("--bandwidth", default="2mbit")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--report-json", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        report = compare(args.quickstart, parse_bandwidths(args.bandwidth), args.samples)
    except CoFormerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| features | link | served accuracy | compile: ensemble (float32 features) | median ms | limit ms "
          "| x limit | bytes from devices |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in report["rows"]:
        c = r["compiled"]
        f32 = c.get("ensemble_accuracy_float32_features", c["ensemble_accuracy"])
        print(f"| {r['feature_dtype']} | {r['bandwidth']} | {100 * r['accuracy']:.1f}% | "
              f"{100 * c['ensemble_accuracy']:.1f}% ({100 * f32:.1f}%) | {r['median_ms']:.2f} | {r['limit_ms']:.2f} | "
              f"{r['measured_over_limit']:.2f}x | {r['bytes_from_devices']} |")
    if args.report_json:
        atomic_write_json(args.report_json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
