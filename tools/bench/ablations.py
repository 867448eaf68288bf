"""``coformer bench --ablations``: the paper's ablations (Table III, Table IV, Fig. 11) on
the quickstart's teacher, devices and CoFormer policy, everything else held equal.

Three tables, each row compiled from the same teacher, data and calibration settings
(the quickstart's), scored on the test split in PyTorch (the served bundle answers the
same to 1e-4: the quickstart checks its parity):

1. **Calibration** (Table III's "aggregate" row, split): the quickstart's CoFormer policy
   calibrated by progressive boosting distillation (eq. 13-14) against each sub-model
   distilled independently (uniform sample weights, eq. 14 without eq. 13), and against
   no calibration at all (the sliced sub-models as they are, only the aggregator trained
   on their concatenated features).
2. **Aggregation** (Table IV): on the same boosted sub-models, the learned aggregator
   (eq. 2) against averaging the sub-models' logits (each with its own calibrated head)
   and majority voting over their decisions. The sub-models are the same, so only the
   aggregation step differs; its cost is in FLOPs (``aggregation_mflops``).
3. **Policy** (Fig. 11, "at equal latency"): DeBo against the heuristic policy. The
   heuristic's predicted latency T (eq. 3) is the cap; DeBo's choice is, among the
   policies its search evaluated (the quickstart's search budget and delta, the same
   predictors) whose predicted T is within that cap, the one with the lowest validation
   loss (eq. 7): at equal latency the accuracy term of eq. 8 decides. Both are then
   calibrated alike. The quickstart's own CoFormer policy (DeBo's best objective, which
   trades accuracy for latency) is the calibration table's policy.

Choices written down: the rows use the quickstart's settings (boost epochs, aggregator
epochs, search budget, seed), one seed unless ``--seeds`` asks for more (the mean and
every seed's score are reported); the paper's attention and SENet aggregators are
not built (they are not CoFormer's, and Table IV places the learned aggregator between
them and averaging).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from coformer.runtime.files import atomic_write_bytes, atomic_write_json
from coformer.tools.progress import Progress


def _compile(qs, policy, boost, out_dir: Path, progress: bool):
    """One ablation's bundle, through the compile job like every other: the given policy and
    calibration, no fallback aggregators (the ablations compare calibrations alone)."""
    from coformer.compiler.job import CompileJob, run_job

    return run_job(CompileJob(qs.teacher, qs.devices, qs.data, out_dir, policy=policy, boost=boost,
                              aggregator_epochs=qs.config.aggregator_epochs, progress=progress,
                              fallback_aggregators=False)).result


def _voting(result, data) -> dict[str, float]:
    """Average of the sub-models' logits and majority vote, on the test split."""
    import torch

    from coformer.compiler.inference import run_many

    feats = run_many(result.submodels, data.test)
    with torch.no_grad():
        logits = [h.eval()(f) for h, f in zip(result.heads, feats)]
    y = data.test.y
    mean = torch.stack(logits).mean(0).argmax(-1)
    votes = torch.stack([lg.argmax(-1) for lg in logits])  # [N, samples]
    k = logits[0].shape[-1]
    counts = torch.nn.functional.one_hot(votes, k).sum(0)  # ties go to the first sub-model's choice
    first = torch.nn.functional.one_hot(votes[0], k) * 0.5
    majority = (counts + first).argmax(-1)
    return {"average": float((mean == y).float().mean()), "majority_voting": float((majority == y).float().mean())}


def _predicted(latency, policy) -> float:
    return float(latency.terms(policy)[3])


def run_ablations(qs_dir: Path, out_dir: Optional[Path] = None, seeds: Sequence[int] = (0,),
                  progress: Union[bool, Progress] = True) -> dict[str, Any]:
    """The three ablation tables on the quickstart run in ``qs_dir`` (module doc); writes
    ``ablations.json`` and ``ablations.md`` to ``out_dir`` (default ``qs_dir/ablations``)."""
    import torch

    from coformer.calibration.booster import BoostConfig
    from coformer.compiler.cost import submodel_cost
    from coformer.compiler.evaluate import validation_loss
    from coformer.compiler.planning import search_space
    from coformer.compiler.policy import heuristic_policy
    from coformer.compiler.predictor import LatencyPredictor
    from coformer.compiler.search import run_search
    from coformer.compiler.specs import Policy
    from coformer.runtime.manifest import load_manifest
    from coformer.tools.quickstart import load_quickstart

    say = Progress.of(progress)
    qs_dir = Path(qs_dir)
    out_dir = Path(out_dir or qs_dir / "ablations")
    out_dir.mkdir(parents=True, exist_ok=True)
    qs = load_quickstart(qs_dir, bool(progress), say=say)
    cfg, devices, data = qs.config, qs.devices, qs.data
    coformer_policy = Policy.from_dict(load_manifest(qs_dir / "bundle").policy)
    predictors = [LatencyPredictor.load(qs_dir / "profiles" / f"{d.name}.predictor.json") for d in devices]
    decoder, latency = search_space(qs.teacher, devices, predictors, data)
    shape = latency.shape
    rows: dict[str, list[dict[str, Any]]] = {"calibration": [], "aggregation": [], "policy": []}
    per_seed: list[dict[str, float]] = []
    work = Path(tempfile.mkdtemp(prefix="coformer-ablations-", dir=out_dir))
    say = say or (lambda *_: None)
    teacher_acc = None
    # the same for every seed: the heuristic (on the search's own importance scores), its
    # predicted latency (the cap) and the search's validation loss
    heuristic = heuristic_policy(shape, decoder.imp, devices)
    cap = _predicted(latency, heuristic)
    l_val = validation_loss(qs.teacher, data)
    for seed in seeds:
        scores: dict[str, float] = {}
        boost = BoostConfig(epochs=cfg.boost_epochs, seed=seed)
        torch.manual_seed(seed)
        say(f"ablations (seed {seed}): progressive boosting distillation")
        boosted = _compile(qs, coformer_policy, boost, work / f"boosted-{seed}", False)
        teacher_acc = boosted.accuracy["teacher_accuracy"]
        scores["boosting"] = boosted.accuracy["ensemble_accuracy"]
        say(f"ablations (seed {seed}): each sub-model distilled independently")
        torch.manual_seed(seed)
        independent = _compile(qs, coformer_policy, dataclasses.replace(boost, boosting=False),
                               work / f"independent-{seed}", False)
        scores["independent"] = independent.accuracy["ensemble_accuracy"]
        say(f"ablations (seed {seed}): no calibration, the aggregator on the sliced sub-models' features")
        torch.manual_seed(seed)
        raw = _compile(qs, coformer_policy, dataclasses.replace(boost, epochs=0), work / f"raw-{seed}", False)
        scores["uncalibrated"] = raw.accuracy["ensemble_accuracy"]
        scores["learned"] = scores["boosting"]
        scores.update(_voting(boosted, data))
        say(f"ablations (seed {seed}): DeBo against the heuristic policy at the heuristic's predicted latency")
        res = run_search("bo", decoder, latency, l_val, cfg.delta, cfg.search_initial, cfg.search_iterations, seed)
        within = [e for e in res.evaluations if e.latency_ms <= cap]
        # at equal latency the accuracy term decides: the lowest validation loss within the cap
        pick = min(within, key=lambda e: e.l_val) if within else min(res.evaluations, key=lambda e: e.latency_ms)
        torch.manual_seed(seed)
        h = _compile(qs, heuristic, boost, work / f"heuristic-{seed}", False)
        torch.manual_seed(seed)
        d = _compile(qs, dataclasses.replace(pick.policy, source="bo"), boost, work / f"debo-{seed}", False)
        scores["heuristic"], scores["debo"] = h.accuracy["ensemble_accuracy"], d.accuracy["ensemble_accuracy"]
        scores["heuristic_latency_ms"], scores["debo_latency_ms"] = cap, pick.latency_ms
        scores["debo_within_cap"] = bool(within)
        scores["debo_evaluations_within_cap"] = len(within)
        per_seed.append(scores)
    shutil.rmtree(work, ignore_errors=True)

    def agg(key: str) -> dict[str, Any]:
        vals = [s[key] for s in per_seed]
        return {"mean": sum(vals) / len(vals), "per_seed": vals}

    d_feats = [s.embed_dim for s in coformer_policy.submodels]
    classes = shape.num_classes
    agg_flops = 2 * sum(d_feats) * shape.embed_dim + 2 * shape.embed_dim * classes
    avg_flops = 2 * sum(d_feats) * classes  # each sub-model's head, then the mean
    rows["calibration"] = [
        {"method": "progressive boosting distillation (eq. 13-14)", "key": "boosting", "accuracy": agg("boosting")},
        {"method": "independent distillation (uniform weights)", "key": "independent", "accuracy": agg("independent")},
        {"method": "no calibration (aggregator only)", "key": "uncalibrated", "accuracy": agg("uncalibrated")},
    ]
    rows["aggregation"] = [
        {"method": "learned aggregator (eq. 2)", "key": "learned", "accuracy": agg("learned"),
         "aggregation_mflops": agg_flops / 1e6},
        {"method": "average of the sub-models' logits", "key": "average", "accuracy": agg("average"),
         "aggregation_mflops": avg_flops / 1e6},
        {"method": "majority voting", "key": "majority_voting", "accuracy": agg("majority_voting"),
         "aggregation_mflops": avg_flops / 1e6},
    ]
    rows["policy"] = [
        {"method": "heuristic policy", "key": "heuristic", "accuracy": agg("heuristic"),
         "predicted_latency_ms": agg("heuristic_latency_ms")},
        {"method": "DeBo, within the heuristic's predicted latency", "key": "debo", "accuracy": agg("debo"),
         "predicted_latency_ms": agg("debo_latency_ms"),
         "within_cap": [s["debo_within_cap"] for s in per_seed],
         "evaluations_within_cap": [s["debo_evaluations_within_cap"] for s in per_seed]},
    ]
    m = lambda k: agg(k)["mean"]  # noqa: E731
    verdicts = {
        "calibration": "as the paper: boosting beats independent distillation" if m("boosting") > m("independent")
        else "unlike the paper's direction: independent distillation is as good or better than boosting here",
        "aggregation": "as the paper's Table IV: the learned aggregator beats averaging and voting"
        if m("learned") > max(m("average"), m("majority_voting"))
        else "unlike Table IV: averaging or voting is as good or better than the learned aggregator here",
        "policy": "as the paper: DeBo beats the heuristic at equal predicted latency" if m("debo") > m("heuristic")
        else "unlike the paper: DeBo does not beat the heuristic at equal predicted latency here",
    }
    report = {"teacher_accuracy": teacher_acc, "seeds": list(seeds), "tables": rows, "verdicts": verdicts,
              "policy": [s.summary() for s in coformer_policy.submodels],
              "costs_mflops": [submodel_cost(s, shape).flops / 1e6 for s in coformer_policy.submodels],
              "settings": {"boost_epochs": cfg.boost_epochs, "aggregator_epochs": cfg.aggregator_epochs,
                           "search_initial": cfg.search_initial, "search_iterations": cfg.search_iterations,
                           "delta": cfg.delta}}
    atomic_write_json(out_dir / "ablations.json", report)
    atomic_write_bytes(out_dir / "ablations.md", ablations_markdown(report).encode())
    return report


def ablations_markdown(report: dict[str, Any]) -> str:
    lines = [f"Teacher: {100 * report['teacher_accuracy']:.1f}% on the test split; seeds {report['seeds']}.", ""]
    titles = {"calibration": "Calibration (the quickstart's CoFormer policy)",
              "aggregation": "Aggregation (the same boosted sub-models)",
              "policy": "Policy (at the heuristic's predicted latency)"}
    for name, rows in report["tables"].items():
        extra = "aggregation MFLOPs" if name == "aggregation" else "predicted ms" if name == "policy" else ""
        lines += [f"**{titles[name]}**: {report['verdicts'][name]}.", "",
                  f"| method | accuracy |{' ' + extra + ' |' if extra else ''}",
                  "|---|---:|" + ("---:|" if extra else "")]
        for r in rows:
            cell = ""
            if name == "aggregation":
                cell = f" {r['aggregation_mflops']:.3f} |"
            elif name == "policy":
                cell = f" {r['predicted_latency_ms']['mean']:.2f} |"
            lines.append(f"| {r['method']} | {100 * r['accuracy']['mean']:.1f}% |{cell}")
        lines.append("")
    return "\n".join(lines)
