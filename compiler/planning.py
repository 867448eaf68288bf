"""Choosing a policy by search (paper §III-C): importance scores of the teacher's units, the
latency model over the devices' predictors (eq. 3-6), the search space DeBo decodes, and the
search itself (:mod:`coformer.compiler.search` holds DeBo's loop)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from torch import nn

from coformer.calibration.compute import CPU, Compute
from coformer.calibration.data import Dataset
from coformer.compiler.decomposition import DEFAULT_DECOMPOSITION
from coformer.compiler.evaluate import validation_loss
from coformer.compiler.families import adapter_for
from coformer.compiler.inference import model_device
from coformer.compiler.specs import DeviceSpec, Policy, SubModelSpec
from coformer.runtime.errors import CoFormerError


def importance_of(teacher: nn.Module, data: Dataset, compute: Compute = CPU, samples: int = 256):
    """Importance scores of the teacher's units on the first ``samples`` training inputs."""
    adapter = adapter_for(teacher)
    was = model_device(teacher)
    teacher.to(compute.torch_device)
    try:
        with compute.autocast():
            return adapter.importance(teacher, (x for _, x in data.train.batches(
                min(64, compute.batch_size), workers=compute.workers, limit=samples)))
    finally:
        teacher.to(was)


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
