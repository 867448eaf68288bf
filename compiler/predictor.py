"""Per-device latency predictor t1_n = f(C_n) (paper eq. 4, supplementary §A).

Two models, chosen per device by 5-fold cross-validation on the profile:

* ``mlp``: the paper's predictor, a three-layer perceptron (two hidden layers of
  600, ReLU) on (l, d, mean heads, mean MLP width), trained on standardised log
  latency (full-batch Adam; a profile holds tens of entries, not thousands);
* ``analytic``: a roofline-style baseline with a cache cliff,
  ``a*FLOPs + b*P + c*P*[P > P_c] + e*max(0, P - P_c) + f*l + g*l*h + k*l*D
  + m*l*d + n`` for P parameters: compute, weight traffic, the cliff where the
  weights stop fitting the last-level cache (then *every* weight is fetched
  from memory on every inference, LRU thrashing, hence the step in the cost per
  parameter and not only a hinge), per-layer, per-head and per-width dispatch,
  and a constant. On the machine it was designed on, the cost per parameter
  steps up where the weights leave the cache, and the step fits the profiles
  better than a hinge alone (docs/benchmarks.md, "Design measurements quoted
  by the code"). Coefficients are non-negative
  (non-negative least squares on relative error); P_c is chosen among the
  midpoints between the profile's own sizes (or none).

Served, a device idles between requests and the first run after an idle is
slower than back to back. The profiler measures that per kit entry
(``gap_ratio``); the slow-down is mostly a fixed cost (caches refilled, a vCPU
woken), so it is large for small sub-models and shrinks for large ones.
:meth:`LatencyPredictor.served_factor_at` therefore takes the median ratio of
the ``SERVED_NEIGHBOURS`` entries nearest in (log) back-to-back latency, not
one factor for every size: a single factor under-predicted the served compute
of the quickstart's small chosen sub-models (docs/benchmarks.md, "Design
measurements quoted by the code").

A language model's kit adds the sequence length T as a fifth feature
(``coformer.compiler.profile_kit``): the MLP takes it as one more input, and the
analytic model sees it through the FLOPs, which the kit counts at each entry's T.
Such a predictor is ``length_aware``; the search then asks it at the length
requests typically have.

A fitted predictor is plain JSON (the MLP's weights as lists) and predicts with
numpy alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from coformer.runtime.files import atomic_write_json, read_json
from coformer.runtime.errors import CoFormerError

KINDS = ("mlp", "analytic")
PREDICTOR_VERSION = 2  # 2: the analytic model's step at the cache cliff
SERVED_NEIGHBOURS = 7  # entries of about the same latency whose gap ratios give a served factor


def _paper_features(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    return np.asarray([r["config"] for r in rows], dtype=np.float64)


def _analytic_features(rows: Sequence[Mapping[str, Any]], cache_mparams: float) -> np.ndarray:
    out = []
    for r in rows:
        l, d, h, D = r["config"][:4]
        p = r["params"] / 1e6
        out.append([r["flops"] / 1e9, p, p * (p > cache_mparams), max(0.0, p - cache_mparams),
                    l, l * h, l * D / 1e3, l * d / 1e3, 1.0])
    return np.asarray(out, dtype=np.float64)


@dataclass
class LatencyPredictor:
    """Predicts a sub-model's latency (ms) on one device from its config, FLOPs and parameters."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    device: str = ""

    def predict(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        if self.kind == "analytic":
            return _analytic_features(rows, self.params["cache_mparams"]) @ np.asarray(self.params["coef"])
        if self.kind == "mlp":
            X = _paper_features(rows)
            if X.shape[1] != len(self.params["x_mean"]):
                raise CoFormerError(f"the latency predictor of {self.device or 'this device'} takes "
                                    f"{len(self.params['x_mean'])} features (fitted on a "
                                    f"{'language kit: l, d, h, D, tokens' if self.length_aware else 'kit: l, d, h, D'}), "
                                    f"asked with {X.shape[1]}")
            x = (X - self.params["x_mean"]) / self.params["x_std"]
            for i, (W, b) in enumerate(zip(self.params["coefs"], self.params["intercepts"])):
                x = x @ np.asarray(W) + np.asarray(b)
                if i < len(self.params["coefs"]) - 1:
                    x = np.maximum(x, 0.0)
            return np.exp(x[:, 0] * self.params["y_std"] + self.params["y_mean"])
        raise CoFormerError(f"predictor kind {self.kind!r} is not one of {KINDS}")

    def predict_one(self, config: Sequence[float], flops: int, params: int) -> float:
        return float(self.predict([{"config": list(config), "flops": flops, "params": params}])[0])

    @property
    def length_aware(self) -> bool:
        """Fitted on a language kit whose entries are timed at several sequence lengths."""
        return bool(self.params.get("length_axis"))

    @property
    def served_factor(self) -> float:
        """How much slower the device is when served (idling between requests) than when
        timed back to back, over the whole profile (median); 1.0 if unknown."""
        return float(self.params.get("served_factor", 1.0))

    def served_factor_at(self, latency_ms: float) -> float:
        """The served slow-down of a sub-model that takes ``latency_ms`` back to back: the
        median gap ratio of the profile entries nearest in log latency (see the module doc);
        the profile-wide factor where the predictor carries no per-entry ratios."""
        points = self.params.get("served_points")
        if not points:
            return self.served_factor
        lat = np.log(np.asarray([p[0] for p in points]))
        ratio = np.asarray([p[1] for p in points])
        near = np.argsort(np.abs(lat - math.log(max(latency_ms, 1e-6))), kind="stable")[:SERVED_NEIGHBOURS]
        return float(np.median(ratio[near]))

    def predict_served(self, config: Sequence[float], flops: int, params: int) -> float:
        """Latency (ms) when served: the back-to-back prediction times its served factor."""
        t = self.predict_one(config, flops, params)
        return t * self.served_factor_at(t)

    def to_dict(self) -> dict[str, Any]:
        p = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.params.items()}
        return {"version": PREDICTOR_VERSION, "kind": self.kind, "device": self.device, "params": p}

    def save(self, path: Path) -> None:
        atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "LatencyPredictor":
        path = Path(path)
        if not path.is_file():
            raise CoFormerError(f"predictor file {path} does not exist")
        d = json.loads(path.read_text())
        if d.get("version") != PREDICTOR_VERSION or d.get("kind") not in KINDS:
            raise CoFormerError(f"{path} is not a CoFormer latency predictor (version {PREDICTOR_VERSION}, "
                                f"kind in {KINDS}); fit it again with `coformer fit-predictor`")
        return cls(d["kind"], d["params"], d.get("device", ""))


def _fit(kind: str, rows: Sequence[Mapping[str, Any]], seed: int) -> LatencyPredictor:
    y = np.asarray([r["latency_ms"] for r in rows], dtype=np.float64)
    if kind == "analytic":
        from scipy.optimize import nnls

        w = 1.0 / y  # least squares on relative error
        best = None
        sizes = sorted({r["params"] / 1e6 for r in rows})
        for cache in [(a + b) / 2 for a, b in zip(sizes, sizes[1:])] + [sizes[-1] + 1.0]:
            X = _analytic_features(rows, cache)
            coef, resid = nnls(X * w[:, None], y * w)
            if best is None or resid < best[0] - 1e-12:
                best = (resid, cache, coef)
        return LatencyPredictor("analytic", {"coef": best[2].tolist(), "cache_mparams": best[1]})
    X = _paper_features(rows)
    x_mean, x_std = X.mean(0), X.std(0) + 1e-9
    ly = np.log(y)
    y_mean, y_std = float(ly.mean()), float(ly.std() + 1e-9)
    coefs, intercepts = _train_mlp((X - x_mean) / x_std, (ly - y_mean) / y_std, seed)
    return LatencyPredictor("mlp", {
        "x_mean": x_mean.tolist(), "x_std": x_std.tolist(), "y_mean": y_mean, "y_std": y_std,
        "coefs": coefs, "intercepts": intercepts,
    })


def _train_mlp(X: np.ndarray, y: np.ndarray, seed: int, hidden: int = 600, steps: int = 400,
               lr: float = 3e-3) -> tuple[list, list]:
    """The paper's 3-layer MLP (4 -> 600 -> 600 -> 1, ReLU), full-batch Adam with cosine decay."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and deterministic
    try:
        g = torch.Generator().manual_seed(seed)
        layers = [torch.nn.Linear(X.shape[1], hidden), torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, 1)]
        with torch.no_grad():
            for lin in layers:
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * (2.0 / lin.in_features) ** 0.5)
                lin.bias.zero_()
        net = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), layers[2])
        # fused: one kernel for the whole update; on 360k parameters and a dozen rows the
        # per-tensor update dominates, and fused is 3x faster than the default here
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-5, fused=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        Xt = torch.tensor(X, dtype=torch.float32)
        yt = torch.tensor(y, dtype=torch.float32)[:, None]
        for _ in range(steps):
            loss = torch.mean((net(Xt) - yt) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    return ([lin.weight.detach().T.double().tolist() for lin in layers],
            [lin.bias.detach().double().tolist() for lin in layers])


def accuracy_report(pred: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """RMSE, MAPE and nn-Meter's share of predictions within +-5% and +-10%."""
    rel = np.abs(pred - actual) / actual
    return {
        "rmse_ms": float(np.sqrt(np.mean((pred - actual) ** 2))),
        "mape": float(rel.mean()),
        "within_5pct": float((rel <= 0.05).mean()),
        "within_10pct": float((rel <= 0.10).mean()),
    }


def entry_latency_ms(entry: Mapping[str, Any]) -> float:
    """An entry's latency: the estimate the profiler recorded (now the minimum of all
    its samples, see ``coformer.runtime.profile``; profiles taken before that carry
    the lower quartile of their round medians, and their ``gap_ratio`` is relative
    to it, so the recorded value is used as it is); in profiles from before the
    estimate was recorded, the median of its round medians, else its median."""
    if "latency_estimate_ms" in entry:
        return float(entry["latency_estimate_ms"])
    if entry.get("round_medians_ms"):
        return float(np.median(entry["round_medians_ms"]))
    return float(entry["latency_ms"]["median"])


def profile_rows(profile: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A profile's entries as the rows a predictor fits: config, FLOPs, parameters, latency (ms)."""
    return [{"config": e["config"], "flops": e["flops"], "params": e["params"],
             "latency_ms": entry_latency_ms(e)} for e in profile["entries"]]


def fit_predictor(profile: Mapping[str, Any], test_fraction: float = 0.2, seed: int = 0,
                  kinds: Sequence[str] = KINDS, all_entries: bool = False) -> tuple[LatencyPredictor, dict[str, Any]]:
    """Fit on a device profile; hold out ``test_fraction`` of entries for the report.

    The kind is chosen by 5-fold cross-validated MAPE on the training entries,
    then refitted on all of them. Returns the predictor and the report
    (``within_10pct``, ``within_5pct``, ``mape``, ``rmse_ms``, ``n_train``,
    ``n_test``, ``chosen``, ``cv_mape``; with ``all_entries``, also ``all_entries``:
    :func:`all_entries_report`, every entry predicted by a fit that did not see it).
    """
    rows = profile_rows(profile)
    n = len(rows)
    n_test = max(1, int(round(n * test_fraction)))
    if n - n_test < 5:
        raise CoFormerError(f"profile has {n} entries; at least {5 + n_test} are needed to fit and test")
    order = np.random.default_rng(seed).permutation(n)
    test = [rows[i] for i in order[:n_test]]
    train = [rows[i] for i in order[n_test:]]
    cv = {kind: float(np.mean(np.abs(cross_validate(train, kind, 5, seed)))) for kind in kinds}
    chosen = min(cv, key=lambda k: (cv[k], k))
    predictor = _fit(chosen, train, seed)
    predictor.device = str(profile.get("device", ""))
    predictor.params["served_factor"] = float(profile.get("served_factor", 1.0))
    predictor.params["length_axis"] = all("tokens" in e for e in profile["entries"])
    if predictor.params["length_axis"]:
        predictor.params["tokens_range"] = [min(e["tokens"] for e in profile["entries"]),
                                            max(e["tokens"] for e in profile["entries"])]
    predictor.params["served_points"] = [[entry_latency_ms(e), float(e["gap_ratio"])]
                                         for e in profile["entries"] if "gap_ratio" in e]
    actual = np.asarray([r["latency_ms"] for r in test])
    report = {**accuracy_report(predictor.predict(test), actual), "n_train": len(train), "n_test": len(test),
              "chosen": chosen, "cv_mape": cv}
    if all_entries:
        report["all_entries"] = all_entries_report(profile, chosen, seed)
    if not all(math.isfinite(v) for v in (report["mape"], report["rmse_ms"])):
        raise CoFormerError("the predictor produced non-finite predictions; the profile may be degenerate")
    return predictor, report


def cross_validate(rows: Sequence[Mapping[str, Any]], kind: str, folds: Optional[int] = None,
                   seed: int = 0) -> np.ndarray:
    """Relative error (predicted / measured - 1) of every row, each predicted by a ``kind``
    fit on the other folds (contiguous folds, in ``rows``' order; ``folds=None``: one per
    row, leave-one-out)."""
    parts = np.array_split(np.arange(len(rows)), folds or len(rows))
    err = np.empty(len(rows))
    for f in parts:
        held = set(f.tolist())
        p = _fit(kind, [rows[i] for i in range(len(rows)) if i not in held], seed)
        val = [rows[i] for i in f]
        actual = np.asarray([r["latency_ms"] for r in val])
        err[f] = p.predict(val) / actual - 1
    return err


LOO_KINDS = ("analytic",)  # kinds cheap enough to refit once per entry (the MLP takes seconds a fit)


def all_entries_report(profile: Mapping[str, Any], kind: str, seed: int = 0, worst: int = 5,
                       keep_errors: bool = False) -> dict[str, Any]:
    """Accuracy over every entry of ``profile``, each predicted by a ``kind`` fit on the
    others: leave-one-out for the analytic model, 10-fold for the MLP (``folds`` says
    which). A held-out split of a 60-entry kit tests 12 entries, where one miss is 8
    points; this tests all of them, and ``worst`` lists the entries it gets most wrong
    (id, config, relative error) so that a systematic miss can be told from noise by
    comparing profiles (``coformer profile-stats``); ``keep_errors`` adds every entry's
    error (``errors``, in profile order)."""
    rows = profile_rows(profile)
    folds = None if kind in LOO_KINDS else min(10, len(rows))
    err = cross_validate(rows, kind, folds, seed)
    actual = np.asarray([r["latency_ms"] for r in rows])
    order = np.argsort(-np.abs(err), kind="stable")[:worst]
    return {**accuracy_report(actual * (1 + err), actual), "kind": kind, "folds": folds or len(rows),
            "n": len(rows),
            "worst": [{"id": profile["entries"][i].get("id", int(i)), "config": list(rows[i]["config"]),
                       "error": float(err[i])} for i in order],
            **({"errors": err.tolist()} if keep_errors else {})}


def worst_configs(predictor: LatencyPredictor, profile: Mapping[str, Any], count: int) -> list[tuple[int, ...]]:
    """The profile entries the predictor gets most wrong (for kit refinement)."""
    rows = profile_rows(profile)
    actual = np.asarray([r["latency_ms"] for r in rows])
    rel = np.abs(predictor.predict(rows) - actual) / actual
    entries = profile["entries"]
    return [tuple(entries[i].get("sample", rows[i]["config"])) for i in np.argsort(-rel)[:count]]


def predictor_for(path: Path, seed: int = 0) -> tuple[LatencyPredictor, Optional[dict[str, Any]]]:
    """A predictor from a fitted predictor file, or fitted now from a device profile."""
    d = read_json(path, f"profile or predictor file {path} does not exist")
    if isinstance(d, dict) and "entries" in d:
        return fit_predictor(d, seed=seed)
    return LatencyPredictor.load(path), None
