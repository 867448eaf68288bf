"""DeBo decomposer: Bayesian optimisation over decomposition policies
(paper §III-C-1, eq. 9-12, Algorithm 1 lines 1-11), with random search and
uniform decomposition as baselines (paper Fig. 11).

Encoding. A policy is a point of [0.05, 1]^(4N): for each device n, the
fractions of the teacher's layers, embedding channels, heads per layer and MLP
neurons per layer it keeps (uniform across its layers). Which units are kept
follows importance through the decomposition structure, as in the heuristic
policy (:mod:`coformer.compiler.decomposition`); a sub-model narrowed to fit its
budget keeps the most important of the units it was dealt.

Constraints. Infeasible points are *repaired*, not rejected: widths whose sum
over devices exceeds the teacher's (C2-C4) are scaled down in proportion, and
a sub-model over its FLOPs or memory budget (C5, C6) loses its least
important layers, then width, until it fits. Every evaluated policy therefore
satisfies C1-C6 (``policy_violations`` is asserted empty); the GP learns
Psi at the proposed point, which is the repaired policy's value.

Objective (eq. 8): Psi(C) = L_val(C) + delta * T(C), with
L_val the mean over sub-models of their validation cross-entropy (eq. 7; a
mean per sample rather than a sum, so delta does not depend on the size of
the validation set; each head refit in closed form first, see
``pipeline.validation_loss``), and T = max_n(t1_n + t2_n) + t3 (eq. 3): t1 from each
device's latency predictor, t2 = |X_n| / r_n (eq. 5; zero for the central
device's own features), t3 = 2 d_agg d_i / g (eq. 6) with g the central
device's measured FLOPs per ms.

Prior and acquisition: scikit-optimize's Gaussian process with a Matern
kernel, nu = 1.5 (eq. 9), Gaussian observation noise (eq. 10), expected
improvement (eq. 12); ``r`` initial policies, then ``iterations`` guided ones.

Warm start (a choice written down; Algorithm 1 draws all ``r`` initial policies at
random). The first initial policy of BO and of random search is the share point
(:meth:`Decoder.share_point`: all layers, every width in proportion to the
devices' CPU shares), the policy a compile without a search takes, and the other
``r - 1`` are random. The search then never returns a policy worse in Psi than the
heuristic one. Without it, L_val (a ridge probe on uncalibrated sub-models) could not
tell policies apart on a small teacher: on the ``--fast`` text quickstart, 2 runs of
6 chose three narrow sub-models (21-22 of 64 channels, one head each) whose
calibrated ensemble scored 72.5% against the teacher's 98.1%, at a Psi 0.04 above
the share point's. The kernel is isotropic (one length scale, fitted): eq. 9 does
not say, and on the quickstart (12 dimensions, 8 + 24 evaluations, the same
predictors and seeds 0-4) a length scale per coordinate reached best
objectives 0.541-0.642, no better than random search on one seed of five,
while one length scale reached 0.516-0.530, better than random (0.597-0.664)
on all five.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from coformer.compiler.cost import Cost, submodel_cost
from coformer.compiler.decomposition import check_decomposition, deal, most_important
from coformer.compiler.importance import Importance, top_k
from coformer.compiler.apportion import apportion
from coformer.compiler.policy import policy_violations
from coformer.compiler.profile_kit import spec_features
from coformer.compiler.specs import DeviceSpec, Policy, SubModelSpec, TransformerShape
from coformer.runtime.errors import CoFormerError
from coformer.runtime.protocol import features_header_bytes

LOW = 0.05
METHODS = ("bo", "random", "uniform")


@dataclass
class Evaluation:
    index: int
    method: str
    x: list[float]
    policy: Policy
    l_val: float
    t1_ms: list[float]
    t2_ms: list[float]
    t3_ms: float
    latency_ms: float
    psi: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "method": self.method, "x": self.x,
                "policy": [s.summary() for s in self.policy.submodels], "l_val": self.l_val,
                "t1_ms": self.t1_ms, "t2_ms": self.t2_ms, "t3_ms": self.t3_ms, "latency_ms": self.latency_ms,
                "psi": self.psi}


@dataclass
class SearchResult:
    method: str
    best: Evaluation
    evaluations: list[Evaluation] = field(default_factory=list)

    @property
    def best_objective(self) -> float:
        return self.best.psi


class Decoder:
    """Turns a point of the search space into a feasible policy (see the module doc)."""

    def __init__(self, shape: TransformerShape, importance: Importance, devices: Sequence[DeviceSpec],
                 cost: Callable[[SubModelSpec, TransformerShape], Cost] = submodel_cost,
                 decomposition: str = "nested") -> None:
        self.shape, self.imp, self.devices, self.cost = shape, importance.check(shape), list(devices), cost
        self.n = len(self.devices)
        self.decomposition = check_decomposition(decomposition)

    @property
    def dims(self) -> int:
        return 4 * self.n

    def _counts(self, total: int, fracs: Sequence[float], minimum: int = 1) -> list[int]:
        want = [max(minimum, int(round(f * total))) for f in fracs]
        if sum(want) > total:
            want = apportion(total, want, minimum)
        return want

    def decode(self, x: Sequence[float]) -> Policy:
        """The feasible policy of point ``x``. Widths are fractions of each stage's channels and
        of each layer's heads and neurons, so one point means the same on a teacher whose
        layers differ (Swin: 3 heads in the first stage, 24 in the last); on an isotropic
        teacher every kept layer of a device gets the same counts."""
        if len(x) != self.dims:
            raise CoFormerError(f"a policy point has {self.dims} coordinates, got {len(x)}")
        s = self.shape
        f = np.clip(np.asarray(x, dtype=float).reshape(self.n, 4), LOW, 1.0)
        d_n = [self._counts(w, f[:, 1]) for w in s.widths]  # per stage, per device
        h_n = {H: self._counts(H, f[:, 2]) for H in set(s.heads)}  # per teacher head count, per device
        D_n = {M: self._counts(M, f[:, 3]) for M in set(s.mlp_dims)}
        # per stage / layer, per device: the units each device is dealt (its width may shrink below)
        dealt = ([deal(sc, d_n[st], self.decomposition) for st, sc in enumerate(self.imp.all_channels)],
                 [deal(sc, h_n[s.heads[l]], self.decomposition) for l, sc in enumerate(self.imp.heads)],
                 [deal(sc, D_n[s.mlp_dims[l]], self.decomposition) for l, sc in enumerate(self.imp.neurons)])
        subs = []
        for n, dev in enumerate(self.devices):
            l = max(1, int(round(f[n, 0] * s.num_layers)))
            layers = sorted(top_k(self.imp.layers, l))
            d = [d_n[st][n] for st in range(len(s.widths))]
            h = [h_n[s.heads[i]][n] for i in range(s.num_layers)]
            D = [D_n[s.mlp_dims[i]][n] for i in range(s.num_layers)]
            while True:
                spec = self._spec([[u[n] for u in kind] for kind in dealt], layers, d, h, D)
                c = self.cost(spec, s)
                if c.flops <= dev.flops_budget and c.memory_bytes <= dev.memory_bytes:
                    break
                if len(layers) > 1:
                    layers.remove(min(layers, key=lambda i: (self.imp.layers[i], i)))
                elif max(d) > 1 or max(D) > 1:
                    d, D = [max(1, int(v * 0.9)) for v in d], [max(1, int(v * 0.9)) for v in D]
                else:
                    raise CoFormerError(f"device {dev.name!r} cannot hold the smallest sub-model "
                                        f"({c.flops} FLOPs, {c.memory_bytes} B)")
            subs.append(spec)
        policy = Policy(tuple(subs), tuple(d.name for d in self.devices), source="search",
                        decomposition=self.decomposition)
        bad = policy_violations(policy, s, self.devices, self.cost)
        assert not bad, bad  # the repair above guarantees C1-C6
        return policy

    def _spec(self, dealt: Sequence[Sequence[Sequence[int]]], layers: Sequence[int], d: Sequence[int],
              h: Sequence[int], D: Sequence[int]) -> SubModelSpec:
        """The most important of the device's ``dealt`` units (channels per stage, heads and neurons
        per layer): ``d`` channels per stage, ``h[l]`` heads and ``D[l]`` neurons of layer l."""
        chans, heads, neurons = dealt
        imp = self.imp
        kept = [most_important(c, sc, k) for c, sc, k in zip(chans, imp.all_channels, d)]
        return SubModelSpec(tuple(layers), kept[0],
                            tuple(most_important(heads[l], imp.heads[l], h[l]) for l in layers),
                            tuple(most_important(neurons[l], imp.neurons[l], D[l]) for l in layers), tuple(kept[1:]))

    def share_point(self) -> list[float]:
        """The heuristic policy's point: all layers, each width the device's share of the
        devices' total CPU share (:func:`coformer.compiler.policy.heuristic_policy`)."""
        total = sum(d.cpu_share for d in self.devices)
        return [v for d in self.devices for v in (1.0, *[max(LOW, d.cpu_share / total)] * 3)]

    def uniform_point(self) -> list[float]:
        """DeViT-style: every device the same 1/N of each width and all layers."""
        return [1.0, 1.0 / self.n, 1.0 / self.n, 1.0 / self.n] * self.n


class LatencyModel:
    """T(C) of eq. 3 from per-device predictors, link rates and the central node's speed.

    t1_n is the predictor's back-to-back latency times the served factor of a
    sub-model of that latency (the device's measured slow-down when idling
    between requests, see ``coformer.compiler.predictor``), so T is a served
    latency, not a benchmark's.
    """

    def __init__(self, shape: TransformerShape, devices: Sequence[DeviceSpec], predictors: Sequence[Any],
                 central_flops_per_ms: float, feature_dim: Callable[[SubModelSpec], int],
                 cost: Callable[[SubModelSpec, TransformerShape], Cost] = submodel_cost,
                 feature_bytes: int = 4, tokens: Optional[int] = None) -> None:
        self.shape, self.devices, self.predictors = shape, list(devices), list(predictors)
        self.g, self.feature_dim, self.cost = central_flops_per_ms, feature_dim, cost
        self.feature_bytes = feature_bytes  # a channel on the wire: 4 (float32) or 2 (float16 features)
        self.tokens = tokens  # a language model's latency is predicted at this length (None: full length)

    def predict_served(self, spec: SubModelSpec, pred: Any) -> float:
        """t1 of one sub-model: at ``tokens`` where the predictor has a length axis (its
        features and FLOPs at that length), else as its kit was timed (full length)."""
        return pred.predict_served(*predictor_inputs(spec, self.shape, pred, self.tokens, self.cost))

    def terms(self, policy: Policy) -> tuple[list[float], list[float], float, float]:
        t1, t2 = [], []
        for n, (spec, dev, pred) in enumerate(zip(policy.submodels, self.devices, self.predictors)):
            t1.append(self.predict_served(spec, pred))
            d = self.feature_dim(spec)
            nbytes = 0 if n == 0 else self.feature_bytes * d + features_header_bytes(dev.name, d)
            t2.append(nbytes * 8 / (dev.link_mbit_s * 1e3))  # bits / (bits per ms)
        d_agg = sum(self.feature_dim(s) for s in policy.submodels)
        d_i = self.feature_dim(SubModelSpec.full(self.shape))
        t3 = (2 * d_agg * d_i + 2 * d_i * self.shape.num_classes) / self.g
        total = max(a + b for a, b in zip(t1, t2)) + t3
        return t1, t2, t3, total


def predictor_inputs(spec: SubModelSpec, shape: TransformerShape, pred: Any, tokens: Optional[int],
                     cost: Callable[[SubModelSpec, TransformerShape], Cost] = submodel_cost) -> tuple[list, int, int]:
    """What a device's predictor is asked about ``spec``: its features, FLOPs and parameters.

    A length-aware predictor (fitted on a language kit) is asked at ``tokens`` (its FLOPs
    counted at that length too); any other at the shape's own length, as its kit was timed.
    """
    if getattr(pred, "length_aware", False):
        if tokens is None:
            raise CoFormerError(f"the latency predictor of {pred.device or 'a device'} was fitted on a language "
                                "kit (with a length axis); this teacher takes no tokens: profile an image kit")
        c = cost(spec, dataclasses.replace(shape, num_tokens=int(tokens)))
        return spec_features(spec, int(tokens)), c.flops, c.params
    c = cost(spec, shape)
    return spec_features(spec), c.flops, c.params


def _log_key(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _bayesian(decoder: Decoder, evaluate: Callable[[int, Sequence[float]], Evaluation], initial: int,
              iterations: int, seed: int) -> list[Evaluation]:
    """DeBo's loop: a Gaussian process over the decoder's unit cube, expected improvement, the
    warm start told first."""
    from skopt import Optimizer
    from skopt.learning import GaussianProcessRegressor
    from skopt.learning.gaussian_process.kernels import ConstantKernel, Matern

    # One length scale for all coordinates: with a few dozen points in 4N dimensions, a
    # length scale per coordinate (ARD) overfits the GP (see the module doc).
    kernel = ConstantKernel(1.0, (0.01, 1000.0)) * Matern(length_scale=1.0, length_scale_bounds=(0.01, 100.0),
                                                          nu=1.5)
    gp = GaussianProcessRegressor(kernel=kernel, normalize_y=True, noise="gaussian",
                                  n_restarts_optimizer=2, random_state=seed)
    opt = Optimizer([(LOW, 1.0)] * decoder.dims, base_estimator=gp, acq_func="EI",
                    n_initial_points=initial, initial_point_generator="random", random_state=seed)
    evals = []
    for i in range(initial + iterations):
        # the warm start (module doc): told first, it counts as one of the initial points
        x = decoder.share_point() if i == 0 else [float(v) for v in opt.ask()]
        ev = evaluate(i, x)
        opt.tell(x, ev.psi)
        evals.append(ev)
    return evals


def run_search(
    method: str,
    decoder: Decoder,
    latency: LatencyModel,
    l_val: Callable[[Policy], float],
    delta: float,
    initial: int = 8,
    iterations: int = 24,
    seed: int = 0,
    log_path: Optional[Path] = None,
    progress: Optional[Callable[[Evaluation], None]] = None,
) -> SearchResult:
    """Search with ``method`` (bo, random or uniform); every evaluation is logged.

    With ``log_path``, evaluations are appended as JSON lines; a search started
    again with the same settings replays the logged points (no re-evaluation)
    and continues where it stopped.
    """
    if method not in METHODS:
        raise CoFormerError(f"search method {method!r} is not one of {METHODS}")
    if delta < 0:
        raise CoFormerError(f"delta {delta} must be >= 0")
    # The key covers everything an evaluation depends on, predictors included: a log
    # written under other profiles is not replayed.
    key = _log_key({"method": method, "seed": seed, "delta": delta, "initial": initial, "warm": "share",
                    "devices": [d.to_dict() for d in decoder.devices], "shape": decoder.shape.to_dict(),
                    **({} if decoder.decomposition == "nested" else {"decomposition": decoder.decomposition}),
                    "predictors": [p.to_dict() if hasattr(p, "to_dict") else repr(p) for p in latency.predictors],
                    "central_flops_per_ms": latency.g})
    done: list[dict[str, Any]] = []
    if log_path is not None and Path(log_path).is_file():
        for line in Path(log_path).read_text().splitlines():
            rec = json.loads(line)
            if rec.get("key") == key:
                done.append(rec)

    def evaluate(i: int, x: Sequence[float]) -> Evaluation:
        x = [float(v) for v in x]
        policy = dataclasses.replace(decoder.decode(x), source=method)
        if i < len(done):
            r = done[i]
            ev = Evaluation(i, method, x, policy, r["l_val"], r["t1_ms"], r["t2_ms"], r["t3_ms"],
                            r["latency_ms"], r["psi"])
        else:
            lv = float(l_val(policy))
            t1, t2, t3, total = latency.terms(policy)
            ev = Evaluation(i, method, x, policy, lv, t1, t2, t3, total, lv + delta * total)
            if log_path is not None:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"key": key, **ev.to_dict()}) + "\n")
        if progress:
            progress(ev)
        return ev

    if method == "uniform":
        evals = [evaluate(0, decoder.uniform_point())]
    elif method == "random":
        rng = random.Random(seed)
        evals = [evaluate(0, decoder.share_point())]  # the warm start (module doc)
        for i in range(1, initial + iterations):
            evals.append(evaluate(i, [rng.uniform(LOW, 1.0) for _ in range(decoder.dims)]))
    else:
        evals = _bayesian(decoder, evaluate, initial, iterations, seed)
    best = min(evals, key=lambda e: (e.psi, e.index))
    if not all(math.isfinite(e.psi) for e in evals):
        raise CoFormerError("the search produced a non-finite objective; check the predictors and delta")
    return SearchResult(method, best, evals)
