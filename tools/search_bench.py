"""Compare DeBo with random search and uniform decomposition (paper Fig. 11).

    python -m coformer.tools.search_bench --quickstart-dir coformer-quickstart --seeds 5

Uses the quickstart's teacher (from the cache), its three emulated devices and
the latency predictors the quickstart fitted (``profiles/*.predictor.json``).
Every method gets the same number of evaluations per seed; the uniform
decomposition is a single policy. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from coformer.runtime.files import atomic_write_json
from coformer.runtime.errors import CoFormerError


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coformer.tools.search_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quickstart-dir", type=Path, default=Path("coformer-quickstart"))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--initial", type=int, default=8)
    p.add_argument("--iterations", type=int, default=24)
    p.add_argument("--delta", type=float, default=0.05)
    p.add_argument("--report-json", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        from coformer.compiler.predictor import LatencyPredictor
        from coformer.compiler.search import run_search
        from coformer.compiler.pipeline import search_space, validation_loss
        from coformer.tools.quickstart import load_quickstart

        qs = load_quickstart(args.quickstart_dir)
        teacher, data, devices = qs.teacher, qs.data, qs.devices
        preds = []
        for d in devices:
            path = args.quickstart_dir / "profiles" / f"{d.name}.predictor.json"
            if not path.is_file():
                raise CoFormerError(f"{path} is missing: run `coformer quickstart --out {args.quickstart_dir}` first")
            preds.append(LatencyPredictor.load(path))
        decoder, latency = search_space(teacher, devices, preds, data)
        cache: dict = {}
        l_val_raw = validation_loss(teacher, data)

        def l_val(policy):
            key = tuple((s.layers, s.embed_dim, s.head_counts, s.mlp_dims) for s in policy.submodels)
            if key not in cache:
                cache[key] = l_val_raw(policy)
            return cache[key]

        rows = []
        uniform = run_search("uniform", decoder, latency, l_val, args.delta).best_objective
        for seed in range(args.seeds):
            bo = run_search("bo", decoder, latency, l_val, args.delta, args.initial, args.iterations, seed)
            rnd = run_search("random", decoder, latency, l_val, args.delta, args.initial, args.iterations, seed)
            rows.append({"seed": seed, "bo": bo.best_objective, "random": rnd.best_objective,
                         "bo_latency_ms": bo.best.latency_ms, "random_latency_ms": rnd.best.latency_ms,
                         "bo_l_val": bo.best.l_val, "random_l_val": rnd.best.l_val})
            print(f"seed {seed}: bo {bo.best_objective:.4f}  random {rnd.best_objective:.4f}  uniform {uniform:.4f}",
                  flush=True)
        wins = sum(r["bo"] <= r["random"] for r in rows)
        print(f"\nevaluations per method and seed: {args.initial + args.iterations}; delta {args.delta}")
        print(f"BO no worse than random on {wins} of {len(rows)} seeds; "
              f"BO better than uniform on {sum(r['bo'] < uniform for r in rows)} of {len(rows)}")
        if args.report_json:
            atomic_write_json(args.report_json, {"rows": rows, "uniform": uniform, "bo_wins": wins,
                                                 "evaluations": args.initial + args.iterations,
                                                 "delta": args.delta})
        return 0
    except CoFormerError as e:
        print(f"search_bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
