"""The compile pipeline: teacher + devices + data -> calibrated sub-models -> bundle.

shape -> importance -> policy (given, or the heuristic) -> decompose ->
calibrate (booster, then aggregator) -> lower (ONNX + parity) -> bundle.

Every pass over data runs on a :class:`~coformer.calibration.compute.Compute`
(the CPU, or a GPU with mixed precision); the teacher stays on the CPU between
passes and lowering is always on the CPU in float32.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from coformer.calibration.aggregator import (Aggregator, single_device_sets, train_aggregator, train_fallbacks,
                                             train_jointly)
from coformer.calibration.booster import BoostConfig, BoostReport, Checkpoints, calibrate
from coformer.calibration.compute import CPU, Compute
from coformer.calibration.data import Dataset
from coformer.calibration.objectives import Objective
from coformer.compiler import tasks
from coformer.compiler.bundle import StagedBundle, check_target
from coformer.compiler.cost import Cost, submodel_cost, teacher_cost
from coformer.compiler.decomposition import DEFAULT_DECOMPOSITION
from coformer.compiler.evaluate import RidgeProbe, evaluate, evaluate_embedding, keep_better, ridge_probe
from coformer.compiler.families import adapter_for
from coformer.compiler.fingerprint import calibration_key, calibration_record, weights_digest
from coformer.compiler.inference import run_batched, run_many
from coformer.compiler.lower import check_parity, export_onnx, lower_submodel, write_fp16_onnx
from coformer.compiler.planning import importance_of
from coformer.compiler.policy import check_policy, heuristic_policy
from coformer.compiler.specs import DeviceSpec, Policy
from coformer.runtime.files import public_mode
from coformer.runtime.errors import CoFormerError
from coformer.runtime.manifest import DeviceArtifact, InputSpec, Manifest

log = logging.getLogger("coformer.compile")


@dataclass
class CompileResult:
    manifest: Manifest
    bundle_dir: Path
    policy: Policy
    submodels: list[nn.Module]
    aggregator: Aggregator
    costs: list[Cost]
    teacher_cost: Cost
    accuracy: dict[str, Any] = field(default_factory=dict)
    boost: Optional[BoostReport] = None
    heads: list[nn.Module] = field(default_factory=list)  # each sub-model's own head, as calibrated with it


# Whether sub-models after the first are calibrated to the earlier ones' residual when the
# caller does not say (BoostConfig.residual None). On the real MiniLM it raised the ensemble's
# cosine in every decomposition tried (docs/benchmarks.md, "Collaboration"); on classifiers it
# is not measured yet, so they keep the paper's booster.
RESIDUAL_BY_DEFAULT = {"embedding": True, "classification": False}


def compile_bundle(
    teacher: nn.Module,
    devices: Sequence[DeviceSpec],
    data: Dataset,
    out_dir: Path,
    policy: Optional[Policy] = None,
    boost: BoostConfig = BoostConfig(),
    aggregator_epochs: int = 60,
    use_labels: bool = True,
    model_name: str = "teacher",
    progress: bool = True,
    compute: Compute = CPU,
    checkpoint_dir: Optional[Path] = None,
    model_info: Optional[dict[str, Any]] = None,
    task: str = "classification",
    normalize: Optional[bool] = None,
    fallback_aggregators: bool = True,
    feature_dtype: str = "float32",
    onnx_precision: str = "fp32",
    decomposition: str = DEFAULT_DECOMPOSITION,
) -> CompileResult:
    """Decompose ``teacher`` for ``devices`` and write a served bundle to ``out_dir``.

    ``policy`` (e.g. from ``--policy FILE``) is checked against C1-C6; without
    one, the heuristic policy is built from importance scores on training
    data, its units dealt by ``decomposition`` (:mod:`coformer.compiler.decomposition`).
    ``use_labels=False`` calibrates from the teacher's decisions alone.
    The first device of the policy is the central node. ``compute`` says where
    the passes over data run. With ``checkpoint_dir``, the teacher's outputs and
    every calibrated sub-model are kept there as they finish, so a run stopped
    part-way resumes where it stopped (:class:`~coformer.calibration.booster.Checkpoints`);
    the folder is removed once the bundle is written. ``model_info`` adds to the
    manifest's ``model`` record (where the teacher came from).

    ``task="embedding"`` (:mod:`coformer.compiler.tasks`) distils to the teacher's
    pooled feature and serves the fused vector, L2-normalised when ``normalize``
    (default: as the teacher's own pipeline does); ``boost.distill`` is then
    ``feature``, and the report adds a ridge probe of the uncalibrated sub-models
    as the baseline calibration has to beat.

    ``fallback_aggregators``: also ship one aggregator per set of workers that may be missing
    (:func:`~coformer.calibration.aggregator.missing_sets`), scored, for degraded answers.

    ``feature_dtype="float16"``: workers send their features at half the bytes. The
    aggregator is trained on float32 features, as calibrated; every test score (the
    ensemble, the degraded answers) is then taken on workers' features rounded to float16,
    as the central node will receive them, and ``ensemble_accuracy_float32_features`` keeps
    the score without the rounding, so the report shows what the halving costs.

    Every bundle carries validation inputs (``checks/inputs.npz``) on which a device checks its
    TensorRT engines against ONNX Runtime. ``onnx_precision="fp16"`` adds an fp16 ONNX beside
    each sub-model (TensorRT 11 builds fp16 from it; :func:`~coformer.compiler.lower.write_fp16_onnx`).
    """
    boost = _settings(boost, task, feature_dtype, onnx_precision)
    check_target(out_dir)
    teacher = teacher.eval()
    shape = adapter_for(teacher).read_shape(teacher)
    if policy is None:
        log.info("scoring importance on %d calibration samples", min(256, len(data.train)))
        policy = heuristic_policy(shape, importance_of(teacher, data, compute), devices,
                                  decomposition=decomposition)
    else:
        check_policy(policy, shape, devices)
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = Checkpoints(checkpoint_dir, calibration_key(teacher, policy, data, boost, use_labels, aggregator_epochs)
                           + task + str(tasks.normalizes(teacher, normalize)))
    cal = _calibrate(teacher, policy, data, boost, use_labels, task, normalize, compute, ckpt, progress)
    _fuse(cal, data, aggregator_epochs, fallback_aggregators, compute, progress)
    acc = _score(cal, teacher, data, feature_dtype, compute, progress)
    costs = [submodel_cost(s, shape) for s in policy.submodels]
    with StagedBundle(out_dir) as staged:
        manifest = staged.publish(_bundle_contents(
            staged.dir, cal, teacher, data, {d.name: d for d in devices}, acc, costs, aggregator_epochs, use_labels,
            model_name, model_info, feature_dtype, onnx_precision))
    if ckpt is not None:
        ckpt.remove()
    return CompileResult(manifest, Path(out_dir), policy, cal.subs, cal.agg, costs, teacher_cost(shape), acc,
                         cal.report, list(cal.heads))


def _settings(boost: BoostConfig, task: str, feature_dtype: str, onnx_precision: str) -> BoostConfig:
    """Refuse, by name, settings a compile cannot take, before any work; returns ``boost``
    settled for ``task`` (feature distillation for embeddings; residual calibration where
    measured to help)."""
    from coformer.runtime.manifest import FEATURE_DTYPES

    if onnx_precision not in ("fp32", "fp16"):
        raise CoFormerError(f"--precision {onnx_precision!r} is not one of ['fp32', 'fp16']")
    if feature_dtype not in FEATURE_DTYPES:
        raise CoFormerError(f"--feature-dtype {feature_dtype!r} is not one of {list(FEATURE_DTYPES)}")
    if task == "embedding" and feature_dtype != "float32":
        raise CoFormerError(f"--feature-dtype {feature_dtype} is scored on classification bundles only; an "
                            "embedding bundle sends float32 features")
    if boost.residual is None:  # measured on embeddings (docs/benchmarks.md, issue 37); classifiers not yet
        boost = dataclasses.replace(boost, residual=RESIDUAL_BY_DEFAULT.get(task, False))
    if task == "embedding":
        return dataclasses.replace(boost, distill="feature")
    if boost.distill == "feature":
        raise CoFormerError("feature distillation is for embedding bundles (--task embedding)")
    return boost


@dataclass
class _Calibrated:
    """A compile's state between its steps: the decomposed and calibrated sub-models, then
    their aggregator and fallback maps (:func:`_calibrate`, then :func:`_fuse`)."""

    teacher: nn.Module
    adapter: Any
    policy: Policy
    subs: list[nn.Module]
    heads: list[nn.Module]
    boost: BoostConfig
    task: str
    norm: bool
    dim: int
    target_model: nn.Module
    targets: torch.Tensor
    labels: Optional[torch.Tensor]
    report: BoostReport
    baseline: Optional["RidgeProbe"]  # embeddings: the uncalibrated slices with a ridge map
    sliced: list[nn.Module]  # embeddings: the slices before calibration, kept if calibration does not pay
    feats_train: list[torch.Tensor]
    agg: Optional[Aggregator] = None
    objective: Optional[Objective] = None
    fallbacks: list = field(default_factory=list)
    singles: list = field(default_factory=list)
    kept: Optional[dict[str, Any]] = None

    @property
    def embedding(self) -> bool:
        return self.task == "embedding"


def _calibrate(teacher: nn.Module, policy: Policy, data: Dataset, boost: BoostConfig, use_labels: bool, task: str,
               normalize: Optional[bool], compute: Compute, ckpt: Optional[Checkpoints],
               progress: bool) -> _Calibrated:
    """Decompose (slice each device's sub-model) and calibrate the sub-models (eq. 13-14, or
    feature distillation for an embedding bundle), from the teacher's outputs on the
    calibration data (kept in ``ckpt``, so a resumed compile does not run the teacher again)."""
    adapter = adapter_for(teacher)
    specs = list(policy.submodels)
    subs = [adapter.slice(teacher, s) for s in specs]
    embedding = task == "embedding"
    norm = tasks.normalizes(teacher, normalize)
    dim = _teacher_feature_dim(adapter, teacher, data)
    if embedding:
        heads = tasks.feature_heads(adapter, teacher, specs, dim)
        target_model: nn.Module = tasks.TeacherEmbedding(adapter, teacher, norm)
    else:
        heads = [adapter.submodel_head(teacher, s) for s in specs]
        target_model = teacher
    labels = data.train.y if use_labels and not embedding else None
    sliced = [copy.deepcopy(s) for s in subs] if embedding else []  # the fallback if calibration does not pay
    cached = ckpt.load("teacher") if ckpt else None
    if cached is not None:
        targets = cached["targets"]
    else:  # hard distillation (eq. 14) needs the teacher's decisions alone: M class indices are all that is kept
        targets = run_batched(target_model, data.train, compute, progress, "teacher on calibration data",
                              reduce=(lambda logits: logits.argmax(-1)) if boost.distill == "hard" else None)
        if ckpt:
            ckpt.save("teacher", {"targets": targets})
    baseline = ridge_probe(subs, target_model, targets, data, compute, progress) if embedding else None
    report = calibrate(subs, heads, data.train, targets, labels, boost, progress=progress, compute=compute,
                       checkpoints=ckpt)
    feats_train = report.features or run_many(subs, data.train, compute, progress, "sub-model features")
    return _Calibrated(teacher, adapter, policy, subs, heads, boost, task, norm, dim, target_model, targets, labels,
                       report, baseline, sliced, feats_train)


def _fuse(cal: _Calibrated, data: Dataset, aggregator_epochs: int, fallback_aggregators: bool, compute: Compute,
          progress: bool) -> None:
    """The aggregator of eq. 2 on the sub-models' cached features (then, with ``joint_epochs``,
    everything fine-tuned together), a fallback map for each set of workers that may be missing,
    and each device's map alone for the collaboration gain; fills ``cal`` in."""
    adapter, teacher, boost = cal.adapter, cal.teacher, cal.boost
    specs = list(cal.policy.submodels)
    feats_train = cal.feats_train
    if cal.embedding:
        agg = tasks.embedding_aggregator([f.shape[1] for f in feats_train], cal.dim, cal.norm)
        agg.init_ridge(feats_train, cal.targets)
        objective = Objective("feature", cal.targets)
    else:
        agg = Aggregator([f.shape[1] for f in feats_train], cal.dim, copy.deepcopy(adapter.teacher_head(teacher)))
        agg.init_from_index([adapter.feature_index(teacher, s) for s in specs])
        objective = Objective(boost.distill, cal.targets, cal.labels, boost.temperature)
    train_aggregator(agg, feats_train, objective, epochs=aggregator_epochs, seed=boost.seed, progress=progress,
                     compute=compute)
    changed = False  # the sub-models changed after feats_train was computed
    if boost.joint_epochs > 0:
        train_jointly(cal.subs, agg, data.train, objective, boost.joint_epochs, lr=boost.lr * 0.5,
                      batch_size=boost.batch_size, seed=boost.seed, progress=progress, compute=compute)
        changed = True
    agg.eval()
    if cal.embedding:
        cal.kept = keep_better(cal.target_model, cal.subs, agg, cal.baseline, data, compute, progress)
        if cal.kept["kept"] == "ridge":
            cal.subs, cal.heads = cal.sliced, tasks.feature_heads(adapter, teacher, specs, cal.dim)
            agg = tasks.embedding_aggregator([f.shape[1] for f in feats_train], cal.dim, cal.norm)
            agg.set_linear(cal.baseline.W, cal.baseline.b)
            changed = True
    if changed:  # fresh features: the fallbacks and single-device maps train on them, the export takes examples
        feats_train = (run_many(cal.subs, data.train, compute, progress, "sub-model features")
                       if fallback_aggregators or len(cal.subs) > 1 else run_many(cal.subs, data.train.head(3), compute))
    # Degraded answers (issue 19): a fallback aggregator for each set of workers that may be missing.
    if cal.embedding:
        def make(dims):
            return tasks.embedding_aggregator(dims, cal.dim, cal.norm)
    else:
        def make(dims):
            return Aggregator(dims, cal.dim, copy.deepcopy(adapter.teacher_head(teacher)))
    devices = cal.policy.devices
    cal.fallbacks = train_fallbacks(agg, make, feats_train, objective, devices, aggregator_epochs, seed=boost.seed,
                                    progress=progress, compute=compute) if fallback_aggregators else []
    cal.singles = single_device_maps(agg, make, feats_train, objective, devices, cal.fallbacks, aggregator_epochs,
                                     boost.seed, compute)
    cal.agg, cal.objective, cal.feats_train = agg, objective, feats_train


def _score(cal: _Calibrated, teacher: nn.Module, data: Dataset, feature_dtype: str, compute: Compute,
           progress: bool) -> dict[str, Any]:
    """The bundle's ``expected`` record: the test split's scores (the ensemble, each sub-model,
    each degraded answer, the collaboration gain) and what the runtime checks answers against."""
    if cal.embedding:
        acc = evaluate_embedding(cal.target_model, cal.subs, cal.heads, cal.agg, data, compute, progress,
                                 cal.fallbacks, cal.singles)
        acc["ridge_probe"], acc["calibration"] = cal.baseline.scores, cal.kept
    else:
        acc = evaluate(teacher, cal.subs, cal.heads, cal.agg, data, compute, progress, cal.fallbacks, feature_dtype,
                       cal.singles)
    # the largest feature each device sent on the calibration data: the central node leaves out a
    # worker whose answer is far beyond it (coformer.runtime.central, FEATURE_MARGIN)
    acc["feature_abs_max"] = {n: float(f.abs().max()) if f.numel() else 0.0
                              for n, f in zip(cal.policy.devices, cal.feats_train)}
    acc["decomposition"], acc["residual"] = cal.policy.decomposition, bool(cal.boost.residual)
    acc["distill"] = cal.boost.distill
    return acc


def _bundle_contents(staging: Path, cal: _Calibrated, teacher: nn.Module, data: Dataset,
                     by_name: dict[str, DeviceSpec], acc: dict[str, Any], costs: Sequence[Cost],
                     aggregator_epochs: int, use_labels: bool, model_name: str,
                     model_info: Optional[dict[str, Any]], feature_dtype: str, onnx_precision: str) -> dict[str, Any]:
    """Lower every model into ``staging`` (the bundle writer's folder): each sub-model's ONNX
    (and fp16 ONNX), the aggregator and each fallback, the validation inputs devices check their
    engines on, the tokenizer; returns the manifest's fields (:class:`~coformer.compiler.bundle.StagedBundle`)."""
    adapter, policy, subs, feats_train = cal.adapter, cal.policy, cal.subs, cal.feats_train
    shape = adapter.read_shape(teacher)
    t_cost = teacher_cost(shape)
    x_example = data.val.head(3)
    arts, parity = [], {}
    names_in = adapter.input_names(teacher)
    text = data.preprocessing.get("kind") == "text"
    # by input name: a text sample is packed [k, T], one row per field
    checks = ({n: x_example[:, i].numpy() for i, n in enumerate(names_in)} if text
              else {names_in[0]: x_example.numpy()})
    (staging / "checks").mkdir()
    buf = io.BytesIO()
    np.savez(buf, **checks)
    (staging / "checks" / "inputs.npz").write_bytes(buf.getvalue())
    public_mode(staging / "checks" / "inputs.npz")
    for i, (name, sub, c) in enumerate(zip(policy.devices, subs, costs)):
        rel = f"submodels/{i}-{name}.onnx"
        parity[rel] = lower_submodel(adapter.export_module(sub), x_example, staging / rel, names_in, text=text)
        if onnx_precision == "fp16":
            half = rel[:-len(".onnx")] + ".fp16.onnx"
            parity[half] = write_fp16_onnx(staging / rel, staging / half, checks)
        dev = by_name[name]
        arts.append(DeviceArtifact(
            device=name, role="central" if i == 0 else "worker", artifact=rel,
            feature_dim=int(feats_train[i].shape[1]), flops=c.flops, params=c.params,
            backend=dev.backend, threads=1, cpu_share=dev.cpu_share,
        ))
    out_name = "embedding" if cal.embedding else "logits"
    feats_example = [f[:3] for f in feats_train]
    names = [f"feature_{i}" for i in range(len(subs))]
    export_onnx(cal.agg, [f[:1] for f in feats_example], staging / "aggregator.onnx", names, [out_name])
    parity["aggregator.onnx"] = check_parity(cal.agg, staging / "aggregator.onnx", feats_example, names)
    degraded = []
    for missing, present, fb in cal.fallbacks:
        rel = "fallbacks/without-" + "+".join(missing) + ".onnx"
        (staging / "fallbacks").mkdir(exist_ok=True)
        sub_names = [names[i] for i in present]
        export_onnx(fb, [feats_example[i][:1] for i in present], staging / rel, sub_names, [out_name])
        parity[rel] = check_parity(fb, staging / rel, [feats_example[i] for i in present], sub_names)
        degraded.append({"missing": list(missing), "aggregator": rel, "score": acc["degraded"]["+".join(missing)]})
    preprocessing = dict(data.preprocessing)
    if text:
        shutil.copyfile(teacher.tokenizer_file, staging / preprocessing["tokenizer"])
        public_mode(staging / preprocessing["tokenizer"])
    info = {"name": model_name, "family": shape.family, "flops": t_cost.flops, "params": t_cost.params,
            "shape": shape.to_dict(), "weights_sha256": weights_digest(teacher),
            # how it was calibrated: a bench builds its students and baselines alike (same data, epochs)
            "calibration_settings": calibration_record(cal.boost, aggregator_epochs, use_labels),
            **dict(model_info or {})}
    if text:
        info.setdefault("source", getattr(teacher, "source", ""))
    return dict(
        model=info,
        task=tasks.task_record(cal.task, data.labels, cal.dim, cal.norm, str(getattr(teacher, "pool_kind", None)
                                                                          or shape.extras.get("pool", ""))),
        input=InputSpec(
            "tokens" if text else names_in[0], "int64" if text else "float32",
            tuple(adapter.input_shape(teacher)), 64, preprocessing, dynamic_axes=(1,) if text else ()),
        devices=tuple(arts),
        aggregator="aggregator.onnx",
        fallbacks=tuple(degraded),
        parity=parity,
        expected=acc,
        policy=policy.to_dict(),
        feature_dtype=feature_dtype,
    )


def _teacher_feature_dim(adapter, teacher: nn.Module, data: Dataset) -> int:
    with torch.no_grad():
        return int(adapter.teacher_features(teacher, data.train.head(1)).shape[-1])


def single_device_maps(agg: nn.Module, make: Callable, feats: Sequence[torch.Tensor], objective: Objective,
                       devices: Sequence[str], fallbacks: Sequence, epochs: int, seed: int,
                       compute: Compute) -> list[tuple[str, nn.Module]]:
    """Each device answering alone, ``(name, map)`` in device order, for the collaboration gain:
    a map fitted on its own features as a fallback is; the central node's is its fallback where
    the bundle has one. Not shipped: a worker never answers without the central node. Empty for
    a single device."""
    if len(devices) < 2:
        return []
    have = {tuple(m): (m, p, fb) for m, p, fb in fallbacks}
    want = single_device_sets(devices)
    fresh = train_fallbacks(agg, make, feats, objective, devices, epochs, seed=seed, compute=compute,
                            sets=[m for m in want if m not in have])
    fresh_by = {m: (m, p, fb) for m, p, fb in fresh}
    return [(name, (have.get(m) or fresh_by[m])[2]) for name, m in zip(devices, want)]


def memory_report(result, devices) -> dict:
    """Parameter and peak memory (phi of C6) of the teacher and of each sub-model, against each budget."""
    budgets = {d.name: d.memory_bytes for d in devices}
    t = result.teacher_cost
    subs = [{"device": name, "param_bytes": c.param_bytes, "memory_bytes": c.memory_bytes,
             "budget_bytes": budgets[name], "param_fraction": c.param_bytes / t.param_bytes}
            for name, c in zip(result.policy.devices, result.costs)]
    largest = max(subs, key=lambda s: s["param_bytes"])
    return {
        "teacher_param_bytes": t.param_bytes, "teacher_memory_bytes": t.memory_bytes,
        "teacher_exceeds": [n for n, b in budgets.items() if t.memory_bytes > b],
        "submodels": subs, "largest_param_bytes": largest["param_bytes"],
        "largest_param_fraction": largest["param_fraction"],
        "flops_fraction_total": sum(c.flops for c in result.costs) / t.flops,
    }


