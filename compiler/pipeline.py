"""The compile pipeline: teacher + devices + data -> calibrated sub-models -> bundle.

shape -> importance -> policy (given, or the heuristic) -> decompose ->
calibrate (booster, then aggregator) -> lower (ONNX + parity) -> bundle.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from coformer.calibration.aggregator import Aggregator, train_aggregator
from coformer.calibration.booster import BoostConfig, BoostReport, calibrate
from coformer.calibration.data import Dataset, batches
from coformer.compiler.bundle import check_target, write_bundle
from coformer.compiler.cost import Cost, submodel_cost, teacher_cost
from coformer.compiler.families import adapter_for
from coformer.compiler.lower import check_parity, export_onnx
from coformer.compiler.policy import check_policy, heuristic_policy
from coformer.compiler.specs import DeviceSpec, Policy
from coformer.runtime.errors import CoFormerError
from coformer.runtime.manifest import DeviceArtifact, InputSpec, Manifest

log = logging.getLogger("coformer.compile")
FEATURE_OUTPUT = "features"


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


@torch.no_grad()
def run_batched(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    model.eval()
    return torch.cat([model(b) for b in batches(x, batch_size)])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == y).float().mean())


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
) -> CompileResult:
    """Decompose ``teacher`` for ``devices`` and write a served bundle to ``out_dir``.

    ``policy`` (e.g. from ``--policy FILE``) is checked against C1-C6; without
    one, the heuristic policy is built from importance scores on training
    data. ``use_labels=False`` calibrates from the teacher's decisions alone.
    The first device of the policy is the central node.
    """
    check_target(out_dir)
    teacher = teacher.eval()
    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher)
    by_name = {d.name: d for d in devices}
    if policy is None:
        log.info("scoring importance on %d calibration samples", min(256, len(data.train)))
        imp = adapter.importance(teacher, batches(data.train.x[:256], 64))
        policy = heuristic_policy(shape, imp, devices)
    else:
        check_policy(policy, shape, devices)
    specs = list(policy.submodels)
    subs = [adapter.slice(teacher, s) for s in specs]
    heads = [adapter.submodel_head(teacher, s) for s in specs]
    labels = data.train.y if use_labels else None

    teacher_train = run_batched(teacher, data.train.x)
    report = calibrate(subs, heads, data.train.x, teacher_train, labels, boost, progress=progress)

    feats_train = [run_batched(s, data.train.x) for s in subs]
    agg = Aggregator([f.shape[1] for f in feats_train], _teacher_feature_dim(adapter, teacher, data),
                     copy.deepcopy(adapter.teacher_head(teacher)))
    agg.init_from_index([adapter.feature_index(teacher, s) for s in specs])
    train_aggregator(agg, feats_train, teacher_train.argmax(-1), labels, epochs=aggregator_epochs,
                     seed=boost.seed, progress=progress)
    agg.eval()

    acc = evaluate(teacher, subs, heads, agg, data)
    costs = [submodel_cost(s, shape) for s in specs]
    t_cost = teacher_cost(shape)
    x_example = data.val.x[:3]

    def build(staging: Path) -> dict[str, Any]:
        arts, parity = [], {}
        for i, (name, sub, c) in enumerate(zip(policy.devices, subs, costs)):
            rel = f"submodels/{i}-{name}.onnx"
            export_onnx(sub, [x_example[:1]], staging / rel, [adapter.input_name], [FEATURE_OUTPUT])
            parity[rel] = check_parity(sub, staging / rel, [x_example], [adapter.input_name])
            dev = by_name[name]
            arts.append(DeviceArtifact(
                device=name, role="central" if i == 0 else "worker", artifact=rel,
                feature_dim=int(feats_train[i].shape[1]), flops=c.flops, params=c.params,
                backend=dev.backend, threads=1, cpu_share=dev.cpu_share,
            ))
        feats_example = [f[:3] for f in feats_train]
        names = [f"feature_{i}" for i in range(len(subs))]
        export_onnx(agg, [f[:1] for f in feats_example], staging / "aggregator.onnx", names, ["logits"])
        parity["aggregator.onnx"] = check_parity(agg, staging / "aggregator.onnx", feats_example, names)
        return dict(
            model={"name": model_name, "family": shape.family, "flops": t_cost.flops, "params": t_cost.params,
                   "shape": shape.to_dict()},
            task={"kind": "classification", "labels": list(data.labels)},
            input=InputSpec(adapter.input_name, "float32", tuple(adapter.input_shape(teacher)), 64,
                            dict(data.preprocessing)),
            devices=tuple(arts),
            aggregator="aggregator.onnx",
            parity=parity,
            expected=acc,
            policy=policy.to_dict(),
        )

    manifest = write_bundle(Path(out_dir), build)
    return CompileResult(manifest, Path(out_dir), policy, subs, agg, costs, t_cost, acc, report)


def _teacher_feature_dim(adapter, teacher: nn.Module, data: Dataset) -> int:
    with torch.no_grad():
        return int(adapter.teacher_features(teacher, data.train.x[:1]).shape[-1])


@torch.no_grad()
def evaluate(teacher: nn.Module, subs: Sequence[nn.Module], heads: Sequence[nn.Module],
             agg: nn.Module, data: Dataset) -> dict[str, Any]:
    """Test-split accuracy in PyTorch: teacher, each sub-model with its head, and the ensemble."""
    x, y = data.test.x, data.test.y
    if y is None:
        raise CoFormerError("the test split has no labels; accuracy cannot be measured")
    feats = [run_batched(s, x) for s in subs]
    return {
        "teacher_accuracy": accuracy(run_batched(teacher, x), y),
        "ensemble_accuracy": accuracy(agg.eval()(*feats), y),
        "submodel_accuracies": [accuracy(h.eval()(f), y) for h, f in zip(heads, feats)],
        "split": "test",
        "samples": int(x.shape[0]),
    }
