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
import hashlib
import io
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from coformer.calibration.aggregator import (Aggregator, collaboration, single_device_sets, train_aggregator,
                                             train_fallbacks, train_jointly)
from coformer.calibration.booster import BoostConfig, BoostReport, Checkpoints, as_split, calibrate
from coformer.calibration.compute import CPU, Compute
from coformer.calibration.data import Dataset, Split
from coformer.calibration.objectives import Objective, ridge_fit
from coformer.compiler import tasks
from coformer.compiler.bundle import StagedBundle, check_target
from coformer.compiler.cost import Cost, submodel_cost, teacher_cost
from coformer.compiler.decomposition import DEFAULT_DECOMPOSITION
from coformer.compiler.families import adapter_for
from coformer.compiler.lower import check_parity, export_onnx, lower_submodel, write_fp16_onnx
from coformer.compiler.policy import check_policy, heuristic_policy
from coformer.compiler.specs import DeviceSpec, Policy, SubModelSpec
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


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def run_many(models: Sequence[nn.Module], x: Union[torch.Tensor, Split], compute: Compute = CPU,
             progress: bool = False, desc: str = "",
             reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> list[torch.Tensor]:
    """Every model's outputs on every input of ``x``, in one pass (a streamed split's images are
    decoded once for all models); float32 on the CPU, or ``reduce(batch output)`` where only that
    is kept (the teacher's decisions). Models are returned to where they were."""
    data = as_split(x)
    dev = compute.torch_device
    was = [_device(m) for m in models]
    outs: list[list[torch.Tensor]] = [[] for _ in models]
    steps = -(-len(data) // compute.batch_size)
    try:
        for m in models:
            m.eval().to(dev)
        for _, xb in tqdm(data.batches(compute.batch_size, workers=compute.workers), total=steps, desc=desc,
                          disable=not progress, leave=False, unit="batch"):
            xb = xb.to(dev)
            with compute.autocast():
                for out, m in zip(outs, models):
                    y = m(xb).float()
                    out.append((reduce(y) if reduce is not None else y).cpu())
    finally:
        for m, d in zip(models, was):
            m.to(d)
    return [torch.cat(o) if o else torch.empty(0) for o in outs]


def run_batched(model: nn.Module, x: Union[torch.Tensor, Split], compute: Compute = CPU,
                progress: bool = False, desc: str = "",
                reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """``model``'s outputs on every input of ``x`` (see :func:`run_many`)."""
    return run_many([model], x, compute, progress, desc, reduce)[0]


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == y).float().mean())


def importance_of(teacher: nn.Module, data: Dataset, compute: Compute = CPU, samples: int = 256):
    """Importance scores of the teacher's units on the first ``samples`` training inputs."""
    adapter = adapter_for(teacher)
    was = _device(teacher)
    teacher.to(compute.torch_device)
    try:
        with compute.autocast():
            return adapter.importance(teacher, (x for _, x in data.train.batches(
                min(64, compute.batch_size), workers=compute.workers, limit=samples)))
    finally:
        teacher.to(was)


def hash_weights(h: Any, module: nn.Module) -> None:
    """Feed every byte of ``module``'s weights to the hash ``h`` (any dtype, bf16 included)."""
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def weights_digest(teacher: nn.Module) -> str:
    """SHA-256 of every weight of ``teacher`` (in the manifest: the bench and served_bench check
    that they rebuild the baselines from the teacher the bundle came from)."""
    h = hashlib.sha256()
    hash_weights(h, teacher)
    return h.hexdigest()


def hash_data(h: Any, data: Dataset) -> None:
    """Feed the training split to ``h``: its tensor, or for a streamed folder every file's path,
    size and modification time (an image replaced under its name changes it), and the labels
    and preprocessing."""
    import os

    tr = data.train
    if tr.streamed:
        files = [(str(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in tr.raw]
        h.update(json.dumps([files, dict(data.preprocessing)], sort_keys=True, default=str).encode())
    else:
        h.update(tr.x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if tr.y is not None:
        h.update(tr.y.numpy().tobytes())


def calibration_key(teacher: nn.Module, policy: Policy, data: Dataset, boost: BoostConfig, use_labels: bool,
                    aggregator_epochs: int) -> str:
    """What a calibration depends on: every byte of the teacher's weights, the policy, the
    training data and the settings; the checkpoints' validity key."""
    h = hashlib.sha256(b"coformer calibration v1")
    hash_weights(h, teacher)
    h.update(json.dumps([policy.to_dict(), boost.__dict__, use_labels, aggregator_epochs], sort_keys=True,
                        default=str).encode())
    hash_data(h, data)
    return h.hexdigest()[:16]


# Whether sub-models after the first are calibrated to the earlier ones' residual when the
# caller does not say (BoostConfig.residual None). On the real MiniLM it raised the ensemble's
# cosine in every decomposition tried (docs/benchmarks.md, "Collaboration"); on classifiers it
# is not measured yet, so they keep the paper's booster.
RESIDUAL_BY_DEFAULT = {"embedding": True, "classification": False}


def calibration_record(boost: BoostConfig, aggregator_epochs: int, use_labels: bool) -> dict[str, Any]:
    """The manifest's ``model.calibration_settings``: the settings a bundle was calibrated with (all but
    the batch size, which is the compute's), so that what it is compared with is calibrated
    alike (:func:`boost_from_record`)."""
    out = {k: v for k, v in dataclasses.asdict(boost).items() if k != "batch_size"}
    return {**out, "aggregator_epochs": int(aggregator_epochs), "use_labels": bool(use_labels)}


def boost_from_record(record: dict[str, Any], batch_size: int) -> tuple[BoostConfig, int, bool]:
    """``(boost, aggregator_epochs, use_labels)`` from a manifest's ``model.calibration_settings``;
    keys this version does not know are left out (a newer compiler's)."""
    known = {f.name for f in dataclasses.fields(BoostConfig)} - {"batch_size"}
    boost = BoostConfig(batch_size=batch_size, **{k: v for k, v in record.items() if k in known})
    return boost, int(record.get("aggregator_epochs", 60)), bool(record.get("use_labels", True))


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
    baseline = _ridge_probe(subs, target_model, targets, data, compute, progress) if embedding else None
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
        cal.kept = _keep_better(cal.target_model, cal.subs, agg, cal.baseline, data, compute, progress)
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


@dataclasses.dataclass
class RidgeProbe:
    """The sliced sub-models as they are, their concatenated features mapped to the teacher's
    feature by ridge regression fitted on the training split: the baseline an embedding
    calibration must beat. ``scores`` on the test split, ``val_cosine`` on the validation split."""

    W: torch.Tensor
    b: torch.Tensor
    scores: dict[str, float]
    val_cosine: float


def _ridge_probe(subs: Sequence[nn.Module], target_model: nn.Module, t: torch.Tensor, data: Dataset,
                 compute: Compute, progress: bool) -> RidgeProbe:
    """``t``: the teacher's features on the training split, computed once for calibration too."""
    feats = run_many(subs, data.train, compute, progress, "ridge probe (uncalibrated)")
    W, b = ridge_fit(torch.cat(feats, dim=1), t)
    normalize = isinstance(target_model, tasks.TeacherEmbedding) and target_model.normalize

    def predict(split: Split, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        *f, t_split = run_many([*subs, target_model], split, compute, progress, what)
        pred = torch.cat(f, dim=1) @ W + b
        return t_split, torch.nn.functional.normalize(pred, dim=-1) if normalize else pred

    val = tasks.embedding_scores(*predict(data.val, "ridge probe, validation split"))["mean_cosine"] \
        if len(data.val) else 0.0
    return RidgeProbe(W, b, tasks.embedding_scores(*predict(data.test, "ridge probe, test split")), val)


@torch.no_grad()
def _keep_better(target_model: nn.Module, subs: Sequence[nn.Module], agg: nn.Module, probe: RidgeProbe,
                 data: Dataset, compute: Compute, progress: bool) -> dict[str, Any]:
    """Which of the distilled ensemble and the ridge probe an embedding bundle serves.

    Choice written down, beyond the paper: feature distillation rewrites the sub-models, and
    on little data (a few hundred sentences) it can lose more of what the sliced teacher
    layers already carried than it adds; the uncalibrated slices with a ridge map are then
    closer to the teacher. The validation split's mean cosine decides (the test split stays
    untouched, for the report), so a bundle is never worse there than that baseline.
    """
    if len(data.val) == 0:
        return {"kept": "distilled", "val_cosine": {}}
    t, *feats = run_many([target_model, *subs], data.val, compute, progress, "calibrated, validation split")
    distilled = tasks.embedding_scores(t, agg.eval()(*feats))["mean_cosine"]
    return {"kept": "distilled" if distilled >= probe.val_cosine else "ridge",
            "val_cosine": {"distilled": distilled, "ridge": probe.val_cosine}}


@torch.no_grad()
def evaluate_embedding(target_model: nn.Module, subs: Sequence[nn.Module], heads: Sequence[nn.Module],
                       agg: nn.Module, data: Dataset, compute: Compute = CPU, progress: bool = False,
                       fallbacks: Sequence = (), singles: Sequence = ()) -> dict[str, Any]:
    """Test-split agreement with the teacher's embeddings: mean (and worst) cosine of the
    ensemble's vectors and nearest-neighbour agreement within the split; each sub-model alone
    through its head; the mean cosine of each fallback aggregator (``degraded``, keyed by
    the missing devices joined with ``+``); and, with ``singles`` (:func:`single_device_maps`),
    the collaboration gain in mean cosine (``collaboration``)."""
    t, *feats = run_many([target_model, *subs], data.test, compute, progress, "evaluate on the test split")
    out = {**tasks.embedding_scores(t, agg.eval()(*feats)), "split": "test", "samples": int(len(t)),
           "reference": "teacher"}
    out["submodel_cosines"] = [tasks.embedding_scores(t, h.eval()(f))["mean_cosine"] for h, f in zip(heads, feats)]
    with torch.no_grad():
        out["degraded"] = {"+".join(missing): tasks.embedding_scores(t, fb(*[feats[i] for i in present]))["mean_cosine"]
                           for missing, present, fb in fallbacks}
        if singles:
            alone = {name: tasks.embedding_scores(t, fb(feats[i]))["mean_cosine"]
                     for i, (name, fb) in enumerate(singles)}
            out["collaboration"] = collaboration(out["mean_cosine"], alone)
    return out


def _teacher_feature_dim(adapter, teacher: nn.Module, data: Dataset) -> int:
    with torch.no_grad():
        return int(adapter.teacher_features(teacher, data.train.head(1)).shape[-1])


def evaluate(teacher: nn.Module, subs: Sequence[nn.Module], heads: Sequence[nn.Module],
             agg: nn.Module, data: Dataset, compute: Compute = CPU, progress: bool = False,
             fallbacks: Sequence = (), feature_dtype: str = "float32", singles: Sequence = ()) -> dict[str, Any]:
    """Test-split accuracy in PyTorch: teacher, each sub-model with its head, the ensemble, and
    the ensemble answering without each set of devices in ``fallbacks`` (``degraded``, keyed by
    the missing devices joined with ``+``: what a degraded answer is worth).

    Without labels (label-free distillation) the reference is the teacher's own
    decisions: ``reference`` says which, and the teacher scores 1.0 against itself.

    With ``feature_dtype="float16"`` the ensemble and degraded scores take the workers'
    features (all but the first, the central node's own) rounded to float16, as they arrive
    over the wire; ``ensemble_accuracy_float32_features`` is the score without rounding.

    With ``singles`` (:func:`single_device_maps`), ``collaboration`` holds each device's
    accuracy alone and the collaboration gain: the ensemble's minus the best of them.
    """
    y = data.test.y
    t_logits, *feats = run_many([teacher, *subs], data.test, compute, progress, "evaluate on the test split")
    reference = "labels"
    if y is None:
        y, reference = t_logits.argmax(-1), "teacher"
    exact = list(feats)
    if feature_dtype != "float32":
        feats = [feats[0], *[f.to(getattr(torch, feature_dtype)).float() for f in feats[1:]]]
    with torch.no_grad():
        extra = {} if feature_dtype == "float32" else {
            "ensemble_accuracy_float32_features": accuracy(agg.eval()(*exact), y), "feature_dtype": feature_dtype}
        ensemble = accuracy(agg.eval()(*feats), y)
        if singles:
            extra["collaboration"] = collaboration(ensemble, {name: accuracy(fb(feats[i]), y)
                                                              for i, (name, fb) in enumerate(singles)})
        return {
            **extra,
            "teacher_accuracy": accuracy(t_logits, y),
            "ensemble_accuracy": ensemble,
            "submodel_accuracies": [accuracy(h.eval()(f), y) for h, f in zip(heads, feats)],
            "degraded": {"+".join(missing): accuracy(fb(*[feats[i] for i in present]), y)
                         for missing, present, fb in fallbacks},
            "split": "test",
            "samples": int(len(y)),
            "reference": reference,
        }


def validation_loss(teacher: nn.Module, data: Dataset, use_labels: bool = True, probe_samples: int = 512,
                    compute: Compute = CPU, val_samples: int = 512, task: str = "classification",
                    normalize: Optional[bool] = None):
    """L_val of eq. 7 for a policy: mean over sub-models of their validation cross-entropy.

    Choice written down: a freshly sliced sub-model with the teacher's head
    restricted to its channels is close to chance whatever its size, so its raw
    loss barely tells a large sub-model from a small one (we saw the search then
    pick near-empty sub-models). Each sub-model's head is therefore refit first,
    in closed form: ridge regression from its pooled features to the teacher's
    logits on ``probe_samples`` training inputs, a cheap stand-in for the
    calibration it will get. The loss is then measured on the first
    ``val_samples`` of the validation split. Both sets are decoded once and held
    in memory, since the search evaluates dozens of policies on them. For an
    embedding bundle the ridge map goes to the teacher's feature and the loss is
    the feature distillation's (:func:`coformer.calibration.objectives.feature_loss`).
    """
    import torch.nn.functional as F

    from coformer.calibration.objectives import feature_loss, feature_moments

    adapter = adapter_for(teacher)
    x_fit, x_val = data.train.head(probe_samples), data.val.head(val_samples)
    embedding = task == "embedding"
    reference = tasks.TeacherEmbedding(adapter, teacher, tasks.normalizes(teacher, normalize)) if embedding \
        else teacher
    t_fit, t_val = run_batched(reference, x_fit, compute), run_batched(reference, x_val, compute)
    t_fit = t_fit.double()
    y_val = None if data.val.y is None else data.val.y[:len(x_val)]
    target = y_val if (use_labels and y_val is not None) else t_val.argmax(-1)
    center, scale = feature_moments(t_fit) if embedding else (None, 0.0)

    @torch.no_grad()
    def l_val(policy: Policy) -> float:
        losses = []
        for spec in policy.submodels:
            sub = adapter.slice(teacher, spec)
            f_fit, f_val = (f.double() for f in (run_batched(sub, x_fit, compute), run_batched(sub, x_val, compute)))
            A = torch.cat([f_fit, torch.ones(len(f_fit), 1, dtype=torch.float64)], dim=1)
            ridge = 1e-3 * float((A * A).sum()) / A.shape[1]
            W = torch.linalg.solve(A.T @ A + ridge * torch.eye(A.shape[1], dtype=torch.float64), A.T @ t_fit)
            logits = torch.cat([f_val, torch.ones(len(f_val), 1, dtype=torch.float64)], dim=1) @ W
            if embedding:
                losses.append(float(feature_loss(logits.float(), t_val, center, scale).mean()))
            else:
                losses.append(float(F.cross_entropy(logits.float(), target)))
        return sum(losses) / len(losses)

    return l_val


def latency_tokens(teacher: nn.Module, data: Optional[Dataset] = None, tokens: Optional[int] = None) -> Optional[int]:
    """The sequence length a language teacher's latency is predicted at; None for an image teacher.

    Choice written down: ``tokens`` where given (``--latency-tokens``), else the median
    length (tokens, padding excluded) of the calibration data's training texts, the
    length of a typical request, else the bundle's maximum length. The FLOPs budgets
    are still checked at the maximum length: a device must hold the longest request.
    """
    from coformer.compiler.profile_kit import is_language

    shape = adapter_for(teacher).read_shape(teacher)
    if not is_language(shape):
        if tokens is not None:
            raise CoFormerError(f"--latency-tokens {tokens}: this teacher takes images, not tokens")
        return None
    if tokens is not None:
        if not 1 <= int(tokens) <= shape.num_tokens:
            raise CoFormerError(f"--latency-tokens {tokens} must be within 1..{shape.num_tokens} (--max-length)")
        return int(tokens)
    if data is None or data.train.streamed or data.train.x is None or data.train.x.ndim != 3:
        return shape.num_tokens
    lengths = data.train.x[:, 1].sum(-1)  # row 1 of a packed text is its attention mask
    return int(min(shape.num_tokens, max(1, int(np.ceil(float(np.median(lengths.numpy())))))))


def latency_model(teacher: nn.Module, devices: Sequence[DeviceSpec], predictors: Sequence[Any],
                  feature_dtype: str = "float32", tokens: Optional[int] = None):
    """The search's latency model (eq. 3-6 from the devices' predictors), charging each link
    its features at ``feature_dtype``'s width; a language teacher's latency at ``tokens``
    (:func:`latency_tokens`; None: the maximum length) where a predictor has a length axis.

    The central node's speed for t3 (eq. 6) is the teacher's FLOPs over the
    central device's predicted latency for the teacher (both at that length).
    """
    from coformer.compiler.profile_kit import is_language
    from coformer.compiler.search import LatencyModel, predictor_inputs

    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher)
    if tokens is None and is_language(shape):
        tokens = shape.num_tokens
    features, flops, params = predictor_inputs(SubModelSpec.full(shape), shape, predictors[0], tokens)
    g = flops / predictors[0].predict_one(features, flops, params)

    return LatencyModel(shape, devices, predictors, g, lambda s: len(adapter.feature_index(teacher, s)),
                        feature_bytes=np.dtype(feature_dtype).itemsize, tokens=tokens)


def search_space(teacher: nn.Module, devices: Sequence[DeviceSpec], predictors: Sequence[Any], data: Dataset,
                 compute: Compute = CPU, feature_dtype: str = "float32", tokens: Optional[int] = None,
                 decomposition: str = DEFAULT_DECOMPOSITION):
    """The search's decoder (points to feasible policies, ranked by importance on training
    data, the units dealt by ``decomposition``) and latency model (:func:`latency_model`, a language teacher's at
    :func:`latency_tokens`), as :func:`search_policy` uses them."""
    from coformer.compiler.search import Decoder

    adapter = adapter_for(teacher)
    imp = importance_of(teacher, data, compute)
    return Decoder(adapter.read_shape(teacher), imp, devices, decomposition=decomposition), latency_model(
        teacher, devices, predictors, feature_dtype, latency_tokens(teacher, data, tokens))


def search_policy(
    teacher: nn.Module,
    devices: Sequence[DeviceSpec],
    predictors: Sequence[Any],
    data: Dataset,
    *,
    methods: Sequence[str] = ("bo",),
    delta: float = 0.05,
    initial: int = 8,
    iterations: int = 24,
    seed: int = 0,
    log_path: Optional[Path] = None,
    use_labels: bool = True,
    progress: bool = True,
    space: Optional[tuple[Any, Any]] = None,
    compute: Compute = CPU,
    task: str = "classification",
    normalize: Optional[bool] = None,
) -> tuple[Policy, dict[str, Any]]:
    """Run DeBo (and any baselines in ``methods``); the policy of the first method wins.

    ``space``: the decoder and latency model of :func:`search_space`, when the
    caller has them already (importance takes a pass over calibration data).
    Returns the policy and a report: per method the best objective and its
    terms, the number of evaluations, and the chosen policy's predicted latency.
    """
    from tqdm.auto import tqdm

    from coformer.compiler.search import run_search

    decoder, latency = space or search_space(teacher, devices, predictors, data, compute)
    l_val = validation_loss(teacher, data, use_labels, compute=compute, task=task, normalize=normalize)
    results: dict[str, Any] = {}
    chosen = None
    for method in methods:
        total = 1 if method == "uniform" else initial + iterations
        bar = tqdm(total=total, desc=f"search {method}", disable=not progress, leave=False)

        def tick(ev, bar=bar):
            bar.update(1)
            bar.set_postfix(psi=f"{ev.psi:.3f}")

        res = run_search(method, decoder, latency, l_val, delta, initial, iterations, seed,
                         None if log_path is None else Path(f"{log_path}.{method}.jsonl"), tick)
        bar.close()
        b = res.best
        results[method] = {"best_objective": b.psi, "l_val": b.l_val, "predicted_latency_ms": b.latency_ms,
                           "t1_ms": b.t1_ms, "t2_ms": b.t2_ms, "t3_ms": b.t3_ms, "evaluations": len(res.evaluations),
                           "policy": [s.summary() for s in b.policy.submodels]}
        if chosen is None:
            chosen = b
    results["evaluations"] = results[methods[0]]["evaluations"]
    results["delta"] = delta
    results["central_flops_per_ms"] = latency.g
    return chosen.policy, results
