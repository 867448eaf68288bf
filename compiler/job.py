"""One compile, start to end: the orchestration ``coformer compile``, ``coformer
quickstart`` and ``coformer bench`` share. :func:`run_job` is the one way in: it hands the job
to its strategy's builder (:mod:`coformer.compiler.strategies`). CoFormer's is here:

    importance -> policy (given; DeBo, random or uniform over the devices'
    latency predictors; or the heuristic) -> decompose -> calibrate -> lower
    -> bundle

Loading the teacher and the data comes before (:mod:`coformer.compiler.sources`).
Measuring the bundle as served comes after, and is the tools' (it needs processes and
sockets: :func:`coformer.tools.measure.measure_job`): the compiler neither imports the
tools nor calls back into them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from coformer.calibration.booster import BoostConfig
from coformer.calibration.compute import CPU, Compute
from coformer.calibration.data import Dataset
from coformer.compiler.specs import DeviceSpec, Policy
from coformer.runtime.errors import CoFormerError

SEARCHES = ("auto", "bo", "random", "uniform", "heuristic")


@dataclass
class CompileJob:
    """Everything one compile takes.

    Args:
        teacher, devices, data: what to decompose, for which devices, calibrated on what.
        out_dir: the bundle folder to write.
        policy: a given policy (``--policy``): no search.
        search: ``bo``, ``random`` or ``uniform`` (search methods over the devices'
            ``predictors``; ``uniform`` needs none), ``heuristic``, or ``auto``: ``bo``
            when every device has a predictor, else ``heuristic``.
        predictors: one latency predictor per device, in device order.
        compare: also run the other search methods, for the report.
        delta, initial, iterations, seed: the search's (eq. 8's delta, r, I_s).
        search_log: where evaluations are logged (and a rerun resumes from).
        boost, aggregator_epochs, use_labels: calibration (eq. 13-14, eq. 2).
        compute: where the passes over data run.
        checkpoint_dir: calibration checkpoints (resume an interrupted compile).
        model_name, model_info: for the manifest.
        task, normalize: ``classification`` or ``embedding`` (:mod:`coformer.compiler.tasks`),
            and whether embeddings are L2-normalised (None: as the teacher's pipeline does).
        feature_dtype: what workers send their features as, ``float32`` or ``float16`` (half
            the bytes; the search charges the links that, and the scores are taken on rounded features).
        onnx_precision: ``fp16`` also writes every sub-model as an fp16 ONNX (for TensorRT 11).
        fallback_aggregators: also fit one aggregator per set of workers that may be missing
            (degraded answers); the paper's ablations leave them out, to compare calibrations alone.
        latency_tokens: the length a language teacher's latency is searched at (None: the
            calibration texts' median, :func:`coformer.compiler.planning.latency_tokens`).
        decomposition: how the sub-models share the teacher's units
            (:mod:`coformer.compiler.decomposition`); None: a given policy's own, else the default.
        strategy: which builder writes the bundle (:mod:`coformer.compiler.strategies`):
            ``coformer`` (the default), ``prism``, or a baseline.
        options: settings only that strategy has (PRISM's ``compression_rate``,
            ``finetune_epochs``, ``finetune_lr``; a baseline's ``task``).
    """

    teacher: nn.Module
    devices: Sequence[DeviceSpec]
    data: Dataset
    out_dir: Path
    policy: Optional[Policy] = None
    search: str = "auto"
    predictors: Optional[Sequence[Any]] = None
    compare: bool = False
    delta: float = 0.05
    initial: int = 8
    iterations: int = 24
    seed: int = 0
    search_log: Optional[Path] = None
    boost: BoostConfig = BoostConfig()
    aggregator_epochs: int = 60
    use_labels: bool = True
    compute: Compute = CPU
    checkpoint_dir: Optional[Path] = None
    model_name: str = "teacher"
    model_info: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    task: str = "classification"
    normalize: Optional[bool] = None
    feature_dtype: str = "float32"
    latency_tokens: Optional[int] = None
    onnx_precision: str = "fp32"
    fallback_aggregators: bool = True
    decomposition: Optional[str] = None
    strategy: str = "coformer"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def structure(self) -> str:
        """The decomposition the job deals units by."""
        from coformer.compiler.decomposition import DEFAULT_DECOMPOSITION

        return self.decomposition or DEFAULT_DECOMPOSITION


@dataclass
class JobResult:
    result: Any  # pipeline.CompileResult
    report: dict[str, Any]
    method: str
    space: Optional[tuple[Any, Any]] = None  # the search's decoder and latency model, when it searched


def resolve_search(job: CompileJob) -> str:
    """The search method the job runs (see :class:`CompileJob`); errors say what is missing."""
    if job.search not in SEARCHES:
        raise CoFormerError(f"--search {job.search!r} is not one of {list(SEARCHES)}")
    if job.policy is not None:
        return "policy"
    have = job.predictors is not None and len(job.predictors) == len(job.devices)
    if job.search == "auto":
        return "bo" if have else "heuristic"
    if job.search in ("bo", "random") and not have:
        raise CoFormerError(f"--search {job.search} needs a latency predictor (a profile) for every device")
    return job.search


def choose_policy(job: CompileJob, method: str, report: dict[str, Any]) -> tuple[Optional[Policy], Any]:
    """The policy for ``method`` (None: the heuristic, built by compile_bundle) and the search space."""
    from coformer.compiler.planning import importance_of, search_policy, search_space

    if method == "policy":  # --decomposition, where given, says what the policy must satisfy
        return (job.policy if job.decomposition is None
                else dataclasses.replace(job.policy, decomposition=job.decomposition)), None
    if method == "heuristic":
        return None, None
    if method == "uniform" and job.predictors is None:  # DeViT-style: no latency model needed
        from coformer.compiler.families import adapter_for
        from coformer.compiler.search import Decoder

        decoder = Decoder(adapter_for(job.teacher).read_shape(job.teacher),
                          importance_of(job.teacher, job.data, job.compute), job.devices,
                          decomposition=job.structure)
        return dataclasses.replace(decoder.decode(decoder.uniform_point()), source="uniform"), None
    methods = [method] + ([m for m in ("bo", "random", "uniform") if m != method] if job.compare else [])
    space = search_space(job.teacher, job.devices, job.predictors, job.data, job.compute, job.feature_dtype,
                         job.latency_tokens, job.structure)
    policy, found = search_policy(job.teacher, job.devices, job.predictors, job.data, methods=methods,
                                  delta=job.delta, initial=job.initial, iterations=job.iterations, seed=job.seed,
                                  log_path=job.search_log, use_labels=job.use_labels, progress=job.progress,
                                  space=space, compute=job.compute, task=job.task, normalize=job.normalize)
    report["search"] = found
    report["predicted_latency_ms"] = found[method]["predicted_latency_ms"]
    if space[1].tokens is not None:  # a language teacher: the length that latency is predicted at
        report["latency_tokens"] = space[1].tokens
        report["length_aware_predictors"] = [bool(getattr(p, "length_aware", False)) for p in job.predictors]
    return policy, space


def run_job(job: CompileJob) -> JobResult:
    """Compile ``job`` into its bundle with its strategy's builder and report what it did.
    Serving the bundle to measure it is the caller's (``coformer compile --measure``:
    :func:`coformer.tools.measure.measure_job`)."""
    from coformer.compiler.strategies import compiler_for

    build = compiler_for(job.strategy)
    start = time.perf_counter()
    out = build(job)
    out.report.setdefault("strategy", job.strategy)
    out.report["wall_time_s"] = time.perf_counter() - start  # load excluded
    return out


def compile_decomposed(job: CompileJob) -> JobResult:
    """CoFormer's builder: the policy (given, searched or the heuristic), then the decomposed,
    calibrated and lowered bundle (:func:`coformer.compiler.pipeline.compile_bundle`)."""
    from coformer.compiler.pipeline import compile_bundle, memory_report
    from coformer.compiler.strategies import check_options

    check_options(job.strategy, job.options, ())
    method = resolve_search(job)
    report: dict[str, Any] = {"compute": job.compute.to_dict()}
    policy, space = choose_policy(job, method, report)
    result = compile_bundle(job.teacher, job.devices, job.data, job.out_dir, policy=policy, boost=job.boost,
                            aggregator_epochs=job.aggregator_epochs, use_labels=job.use_labels,
                            model_name=job.model_name, progress=job.progress, compute=job.compute,
                            checkpoint_dir=job.checkpoint_dir, model_info=job.model_info, task=job.task,
                            normalize=job.normalize, feature_dtype=job.feature_dtype,
                            onnx_precision=job.onnx_precision, decomposition=job.structure,
                            fallback_aggregators=job.fallback_aggregators)
    acc = result.accuracy
    report.update(task=job.task, distill=acc["distill"], accuracy_reference=acc["reference"],
                  policy_source=result.policy.source, memory=memory_report(result, job.devices),
                  resumed_submodels=list(result.boost.resumed) if result.boost else [],
                  decomposition=result.policy.decomposition, residual=acc["residual"])
    if "collaboration" in acc:  # what the other devices add to the best one alone (issue 37)
        report["collaboration"] = acc["collaboration"]
    if job.task == "embedding":
        report.update(mean_cosine=acc["mean_cosine"], nn_agreement=acc["nn_agreement"],
                      submodel_cosines=acc["submodel_cosines"], ridge_probe=acc["ridge_probe"],
                      calibration=acc["calibration"], test_samples=acc["samples"])
    else:
        report.update(teacher_accuracy=acc["teacher_accuracy"], ensemble_accuracy=acc["ensemble_accuracy"],
                      submodel_accuracies=acc["submodel_accuracies"])
        if "ensemble_accuracy_float32_features" in acc:
            report.update(feature_dtype=job.feature_dtype,
                          ensemble_accuracy_float32_features=acc["ensemble_accuracy_float32_features"])
    return JobResult(result, report, method, space)


def matched_student_flops(manifest) -> int:
    """The FLOPs of a student on the central device that computes as long as the slowest
    device of the CoFormer bundle ``manifest``: ``share_central * max_n(flops_n / share_n)``.

    Choice written down: the match is made on the cost model, not on a measurement, so the
    student can be built before anything is served; a device's time is taken as its
    sub-model's FLOPs over its CPU share (how the emulated devices differ). ``coformer
    bench`` then measures both side by side, so how close the match came is in its rows.
    """
    central = manifest.central
    return int(central.cpu_share * max(d.flops / d.cpu_share for d in manifest.devices))


def student_job(job: CompileJob, flops_budget: int, out_dir: Path, name: str = "student") -> CompileJob:
    """The obvious alternative to ``job``'s collaboration: one sub-model on its central
    (first, strongest) device alone, within ``flops_budget`` (capped at that device's own),
    searched and calibrated as ``job``'s sub-models are.

    With a predictor for the central device it is searched by DeBo over that one device,
    with the same objective (eq. 8: validation loss plus delta times predicted latency),
    so it may be smaller than its budget where that pays; without one it is the decoding
    of the full point under the budget (the least important layers dropped, then
    narrowed, until it fits): the largest that fits.
    """
    central = job.devices[0]
    predictors = None if job.predictors is None else [job.predictors[0]]
    return dataclasses.replace(
        job, devices=[dataclasses.replace(central, flops_budget=int(min(flops_budget, central.flops_budget)))],
        out_dir=Path(out_dir), policy=None, search="bo" if predictors else "uniform", predictors=predictors,
        compare=False, search_log=None, checkpoint_dir=None, model_name=name)


def student_summary(out: JobResult, flops_budget: int) -> dict[str, Any]:
    """What a compile report says of a student (:func:`student_job`) built beside a bundle."""
    d = out.result.manifest.central
    acc = out.result.accuracy
    return {"bundle": str(out.result.bundle_dir), "device": d.device, "flops_budget": int(flops_budget),
            "flops": d.flops, "params": d.params, "policy_source": out.result.policy.source,
            "accuracy": acc.get("ensemble_accuracy"), "teacher_accuracy": acc.get("teacher_accuracy"),
            # an embedding student's agreement with the teacher (issue 37: the ensemble against it)
            "mean_cosine": acc.get("mean_cosine"), "nn_agreement": acc.get("nn_agreement"),
            "predicted_latency_ms": out.report.get("predicted_latency_ms"),
            "submodel": out.result.policy.submodels[0].summary(), "wall_time_s": out.report["wall_time_s"]}
