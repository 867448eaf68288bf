"""How well the latency predicted for this machine matches served bundles.

    python -m coformer.tools.served_bench QUICKSTART_DIR [QUICKSTART_DIR ...] --repeats 3
    python -m coformer.tools.served_bench BUNDLE [BUNDLE ...] --model timm:NAME --checkpoint W.pth \
        --devices devices.yaml --data DIR --repeats 3

Each QUICKSTART_DIR is the output of a ``coformer quickstart`` run (its bundle
and the predictors it fitted). With ``--model``, the arguments are bundles
compiled from that teacher for the devices of ``--devices``, whose ``profile:``
entries give the predictors (as ``coformer compile --search bo`` used them),
with test inputs from ``--data``. The probe bundles of
:func:`coformer.tools.measure.build_probe_bundles` are built once, then every
repeat serves each bundle beside them and compares its measured median round
trip with two predictions:

* calibrated, as ``coformer quickstart`` and ``coformer compile --measure``
  report it, on the probes (``predict_served_here``);
* uncalibrated: the small probe's runtime cost (round trip less the compute on
  its critical path) plus the policy's predicted compute.

Prints one row per measurement and a summary; writes JSON with ``--report-json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from coformer.runtime.files import atomic_write_json
from coformer.runtime.errors import CoFormerError


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coformer.tools.served_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", type=Path, nargs="+", metavar="DIR",
                   help="quickstart output folders, or (with --model) bundles")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--report-json", type=Path, default=None)
    p.add_argument("--samples", type=int, default=200, help="with --model: test samples sent to each bundle")
    from coformer.tools.commands.args import add_data_args, add_model_args

    add_model_args(p, required=False)
    add_data_args(p)
    p.add_argument("--devices", type=Path, default=None, help="with --model: the devices file, with profiles")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        if args.repeats < 1:
            raise CoFormerError(f"--repeats {args.repeats} must be >= 1")
        rows = run_model(args) if args.model else run(args.dirs, args.repeats)
        summary = {}
        for kind in ("calibrated", "uncalibrated"):
            err = np.abs([r[f"{kind}_error"] for r in rows])
            summary[kind] = {"mean_abs_error": float(err.mean()), "max_abs_error": float(err.max()),
                             "within_15pct": float(np.mean(err <= 0.15))}
            print(f"{kind:>12}: mean |error| {err.mean():.1%}, worst {err.max():.1%}, "
                  f"within 15% in {int(np.sum(err <= 0.15))} of {len(err)}")
        if args.report_json:
            atomic_write_json(args.report_json, {"rows": rows, "summary": summary})
        return 0
    except CoFormerError as e:
        print(f"served_bench: error: {e}", file=sys.stderr)
        return 2


def run(dirs: Sequence[Path], repeats: int) -> list[dict]:
    """Quickstart outputs: the built-in teacher, its devices, each folder's own predictors."""
    from coformer.compiler.planning import latency_model
    from coformer.compiler.predictor import LatencyPredictor
    from coformer.compiler.specs import Policy
    from coformer.tools.quickstart import load_quickstart, quickstart_config

    for d in dirs:  # before the teacher is loaded (or trained, without a cache)
        missing = [str(x) for x in (d / "bundle" / "manifest.json", d / "profiles") if not x.exists()]
        if missing:
            raise CoFormerError(f"{d} is not a quickstart output: {', '.join(missing)} missing")
    configs = [quickstart_config(d) for d in dirs]
    if any(c.teacher != configs[0].teacher or c.shares != configs[0].shares for c in configs):
        raise CoFormerError(f"{', '.join(map(str, dirs))} were made with different teachers or devices; "
                            "compare quickstart outputs of one config")
    qs = load_quickstart(dirs[0])
    teacher, devices, data = qs.teacher, qs.devices, qs.data
    runs = []
    for d in dirs:
        paths = [d / "profiles" / f"{dev.name}.predictor.json" for dev in devices] + [d / "bundle" / "manifest.json"]
        missing = [str(x) for x in paths if not x.is_file()]
        if missing:
            raise CoFormerError(f"{d} is not a quickstart output: {', '.join(missing)} missing")
        runs.append((d / "bundle", latency_model(teacher, devices, [LatencyPredictor.load(x) for x in paths[:-1]]),
                     Policy.from_dict(json.loads(paths[-1].read_text())["policy"])))
    return measure_runs(teacher, devices, data, runs, data.test.x.numpy(), repeats)


def run_model(args) -> list[dict]:
    """Bundles of one teacher (``--model``) for the devices of ``--devices`` (with profiles)."""
    from coformer.compiler.devices import load_devices
    from coformer.compiler.planning import latency_model
    from coformer.compiler.predictor import predictor_for
    from coformer.compiler.specs import Policy
    from coformer.runtime.manifest import load_manifest
    from coformer.tools.commands.args import data_from_args, teacher_from_args

    if args.devices is None:
        raise CoFormerError("--model needs --devices (the devices file the bundles were compiled for, with profiles)")
    devices = load_devices(args.devices)
    missing = [d.name for d in devices if not d.profile]
    if missing:
        raise CoFormerError(f"{args.devices}: no profile for {missing}; the prediction needs every device's")
    manifests = [load_manifest(b) for b in args.dirs]  # before the teacher is loaded
    for b, m in zip(args.dirs, manifests):
        if [d.device for d in m.devices] != [d.name for d in devices]:
            raise CoFormerError(f"{b} was compiled for {[d.device for d in m.devices]}, --devices names "
                                f"{[d.name for d in devices]}")
    teacher = teacher_from_args(args)
    data, _ = data_from_args(args, teacher)
    from coformer.tools.bench import check_bundle_matches

    for m in manifests:
        check_bundle_matches(m, teacher, data)
    latency = latency_model(teacher, devices, [predictor_for(Path(d.profile), args.seed)[0] for d in devices])
    runs = [(b, latency, Policy.from_dict(m.policy)) for b, m in zip(args.dirs, manifests)]
    return measure_runs(teacher, devices, data, runs, data.test.head(args.samples).numpy(), args.repeats)


def measure_runs(teacher, devices, data, runs, x, repeats: int) -> list[dict]:
    """Serve every ``(bundle, latency model, policy)`` of ``runs`` beside the probes, ``repeats`` times."""
    from coformer.compiler.planning import search_space
    from coformer.tools.measure import (build_probe_bundles, measure_with_probes, predict_served_here,
                                        probe_measurements, served_compute_ms)

    tmp = Path(tempfile.mkdtemp(prefix="coformer-served-bench-"))
    rows = []
    try:
        # the probes' sub-models do not depend on the predictors; their predicted terms do
        probes = build_probe_bundles(teacher, devices, data, tmp,
                                     *search_space(teacher, devices, runs[0][1].predictors, data))
        print(f"{'bundle':<28} {'measured':>9} {'calibrated':>11} {'uncalibrated':>13}")
        for rep in range(repeats):
            for d, latency, policy in runs:
                t1, _, t3, _ = latency.terms(policy)
                mine = {}
                for k, v in probes.items():
                    t1_k, _, t3_k, _ = latency.terms(v["policy"])
                    mine[k] = {**v, "t1_ms": t1_k, "t3_ms": t3_k}
                served, probed = measure_with_probes(d, mine, x)
                measured = served["latency_ms"]["median"]
                here = predict_served_here(t1, t3, devices, served["placements"],
                                           probe_measurements(mine, probed, devices))
                plain = (probed["small"]["runtime_ms_median"]
                         + served_compute_ms(t1, t3, devices, served["placements"])["compute_ms"])
                row = {"bundle": str(d), "repeat": rep, "measured_ms": measured,
                       "calibrated_ms": here["predicted_ms"], "calibrated_error": here["predicted_ms"] / measured - 1,
                       "uncalibrated_ms": plain, "uncalibrated_error": plain / measured - 1,
                       "terms_ms": here["terms_ms"], "breakdown_ms_median": served["breakdown_ms_median"],
                       "probe_breakdown_ms_median": {k: v["breakdown_ms_median"] for k, v in probed.items()}}
                rows.append(row)
                print(f"{str(d)[-28:]:<28} {measured:>7.2f}ms {here['predicted_ms']:>7.2f} {row['calibrated_error']:+4.0%}"
                      f" {plain:>8.2f} {row['uncalibrated_error']:+4.0%}",
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
