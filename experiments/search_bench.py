"""Compare DeBo with random search and uniform decomposition (paper Fig. 11), over fresh
profile sets as well as seeds.

    python -m experiments.search_bench --quickstart-dir coformer-quickstart --seeds 5 --profile-sets 3

Uses the quickstart's teacher (from the cache) and its three emulated devices. The first
profile set is the latency predictors the quickstart fitted (``profiles/*.predictor.json``);
each further one (``--profile-sets N`` in all) profiles the devices afresh, as the
quickstart does (its kit size, rounds and placements, a new kit drawn with another seed),
and fits new predictors: a search that wins only on one profile set's noise does not win
here. On every set, every method gets the same number of evaluations per seed; the
uniform decomposition is a single policy. The validation loss (eq. 7) does not depend on
the profiles, so it is computed once per policy over all sets.

Reports the win rate over every (profile set, seed) pair, ``BO < random`` strictly and
``BO <= random``, and the mean best objective of each method. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from coformer.runtime.files import atomic_write_json
from coformer.runtime.errors import CoFormerError


def fresh_predictors(qs, index: int, throttle: str = "auto") -> list:
    """The quickstart's devices profiled afresh (a kit drawn with seed ``1000 + index``) and a
    predictor fitted to each, as :func:`coformer.tools.quickstart.run_quickstart` does."""
    from coformer.tools.cluster import place_devices
    from coformer.tools.quickstart import profile_and_fit

    work = Path(tempfile.mkdtemp(prefix="coformer-search-bench-"))
    try:
        placements = place_devices([(d.name, d.cpu_share) for d in qs.devices])
        _, fitted = profile_and_fit(qs.config, qs.teacher, qs.devices, placements, work, throttle,
                                    kit_seed=1000 + index, progress=False)
        return [fitted[d.name][0] for d in qs.devices]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compare(qs, predictor_sets: Sequence[Sequence], seeds: int, initial: int, iterations: int, delta: float,
            say=print) -> dict:
    """DeBo, random search and uniform decomposition on each predictor set (module doc)."""
    from coformer.compiler.evaluate import validation_loss
    from coformer.compiler.planning import search_space
    from coformer.compiler.search import run_search

    cache: dict = {}
    l_val_raw = validation_loss(qs.teacher, qs.data)

    def l_val(policy):
        key = tuple((s.layers, s.embed_dim, s.head_counts, s.mlp_dims) for s in policy.submodels)
        if key not in cache:
            cache[key] = l_val_raw(policy)
        return cache[key]

    rows, uniforms = [], []
    for i, preds in enumerate(predictor_sets):
        decoder, latency = search_space(qs.teacher, qs.devices, preds, qs.data)
        uniform = run_search("uniform", decoder, latency, l_val, delta).best_objective
        uniforms.append(uniform)
        for seed in range(seeds):
            bo = run_search("bo", decoder, latency, l_val, delta, initial, iterations, seed)
            rnd = run_search("random", decoder, latency, l_val, delta, initial, iterations, seed)
            rows.append({"profile_set": i, "seed": seed, "bo": bo.best_objective, "random": rnd.best_objective,
                         "uniform": uniform, "bo_latency_ms": bo.best.latency_ms,
                         "random_latency_ms": rnd.best.latency_ms, "bo_l_val": bo.best.l_val,
                         "random_l_val": rnd.best.l_val})
            say(f"profile set {i}, seed {seed}: bo {bo.best_objective:.4f}  random {rnd.best_objective:.4f}  "
                f"uniform {uniform:.4f}")
    n = len(rows)
    mean = lambda k: sum(r[k] for r in rows) / n  # noqa: E731
    return {"rows": rows, "uniform": uniforms, "pairs": n, "profile_sets": len(predictor_sets),
            "bo_better": sum(r["bo"] < r["random"] for r in rows),
            "bo_no_worse": sum(r["bo"] <= r["random"] for r in rows),
            "bo_better_than_uniform": sum(r["bo"] < r["uniform"] for r in rows),
            "per_set_bo_better": [sum(r["bo"] < r["random"] for r in rows if r["profile_set"] == i)
                                  for i in range(len(predictor_sets))],
            "mean_best_objective": {"bo": mean("bo"), "random": mean("random"), "uniform": mean("uniform")},
            "evaluations": initial + iterations, "delta": delta, "policies_scored": len(cache)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.search_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quickstart-dir", type=Path, default=Path("coformer-quickstart"))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--profile-sets", type=int, default=1,
                   help="the quickstart's predictors, then this many less one fresh profilings of its devices")
    p.add_argument("--throttle", default="auto", help="how the fresh profilings enforce device shares")
    p.add_argument("--initial", type=int, default=8)
    p.add_argument("--iterations", type=int, default=24)
    p.add_argument("--delta", type=float, default=0.05)
    p.add_argument("--report-json", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        if args.seeds < 1 or args.profile_sets < 1:
            raise CoFormerError(f"--seeds {args.seeds} and --profile-sets {args.profile_sets} must be >= 1")
        from coformer.compiler.predictor import LatencyPredictor
        from coformer.tools.quickstart import load_quickstart

        qs = load_quickstart(args.quickstart_dir)
        own = []
        for d in qs.devices:
            path = args.quickstart_dir / "profiles" / f"{d.name}.predictor.json"
            if not path.is_file():
                raise CoFormerError(f"{path} is missing: run `coformer quickstart --out {args.quickstart_dir}` first")
            own.append(LatencyPredictor.load(path))
        sets = [own]
        for i in range(1, args.profile_sets):
            print(f"profile set {i}: profiling the {len(qs.devices)} devices afresh", flush=True)
            sets.append(fresh_predictors(qs, i, args.throttle))
        r = compare(qs, sets, args.seeds, args.initial, args.iterations, args.delta,
                    say=lambda m: print(m, flush=True))
        m = r["mean_best_objective"]
        print(f"\nevaluations per method, set and seed: {r['evaluations']}; delta {r['delta']}")
        print(f"BO better than random on {r['bo_better']} of {r['pairs']} (profile set, seed) pairs "
              f"(no worse on {r['bo_no_worse']}); per profile set {r['per_set_bo_better']} of {args.seeds}; "
              f"better than uniform on {r['bo_better_than_uniform']} of {r['pairs']}")
        print(f"mean best objective: bo {m['bo']:.4f}, random {m['random']:.4f}, uniform {m['uniform']:.4f}")
        if args.report_json:
            atomic_write_json(args.report_json, r)
        return 0
    except CoFormerError as e:
        print(f"search_bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
