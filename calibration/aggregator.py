"""The aggregation module of paper eq. 2 and its training.

    X_agg = Pool(W . Concat(X_1, ..., X_N) + b),  logits = head(X_agg)

Each device sends its *pooled* feature X_n; since both mean pooling and
class-token selection commute with the linear map W, pooling before W (on the
device) equals eq. 2's pooling after it, and a device sends d_n numbers rather
than a token tensor. ``head`` is the teacher's own task head, kept frozen
(paper footnote 1: heads are inherited, not decomposed).

An embedding bundle's aggregator has no task head: ``head`` is the identity, or
an L2 normalisation (:class:`Normalize`) where the teacher's pipeline normalises,
and the fused ``W . Concat(X_n) + b`` is the answer. Its W starts from the
closed-form ridge map from the concatenated features to the teacher's feature
(:meth:`Aggregator.init_ridge`), then is trained on the feature loss.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from coformer.calibration.compute import CPU, Compute
from coformer.calibration.loop import fit
from coformer.calibration.objectives import Objective


class Aggregator(nn.Module):
    """Concat -> Linear(sum d_n -> teacher feature dim) -> teacher head."""

    def __init__(self, feature_dims: Sequence[int], out_dim: int, head: nn.Module) -> None:
        super().__init__()
        self.feature_dims = list(feature_dims)
        self.linear = nn.Linear(sum(self.feature_dims), out_dim)
        self.head = head

    @torch.no_grad()
    def init_from_index(self, feature_index: Sequence[Sequence[int]]) -> None:
        """Start from W that puts each X_n entry back where the teacher had it, averaging overlaps."""
        W = torch.zeros_like(self.linear.weight)
        col = 0
        for idx in feature_index:
            for j, c in enumerate(idx):
                W[c, col + j] = 1.0
            col += len(idx)
        W /= W.sum(dim=1, keepdim=True).clamp_min(1.0)
        self.linear.weight.copy_(W)
        self.linear.bias.zero_()

    @torch.no_grad()
    def init_ridge(self, features: Sequence[torch.Tensor], targets: torch.Tensor) -> None:
        """Start from the best linear map (ridge, closed form) from the features to ``targets``."""
        from coformer.calibration.objectives import ridge_fit

        self.set_linear(*ridge_fit(torch.cat(list(features), dim=1), targets))

    @torch.no_grad()
    def set_linear(self, W: torch.Tensor, b: torch.Tensor) -> None:
        """Set the fused map to ``Concat(X_n) @ W + b`` (``W``: [sum d_n, D])."""
        self.linear.weight.copy_(W.T)
        self.linear.bias.copy_(b)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return self.head(self.linear(torch.cat(features, dim=-1)))


class Normalize(nn.Module):
    """L2 normalisation of the last axis (sentence-transformers' ``Normalize``); exports to ONNX."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=-1, eps=1e-12)


def train_aggregator(
    agg: Aggregator,
    features: Sequence[torch.Tensor],
    targets: Union[torch.Tensor, Objective],
    labels: Optional[torch.Tensor] = None,
    epochs: int = 60,
    lr: float = 2e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
    compute: Compute = CPU,
) -> list[float]:
    """Fit W and b on cached sub-model features (the head stays frozen); returns per-epoch loss.

    ``targets`` is the teacher's decisions (with ``labels``, eq. 14's loss with
    uniform weights: half cross-entropy to the labels, half to the decisions) or
    an :class:`~coformer.calibration.objectives.Objective` (soft logits, or the
    teacher's features for an embedding bundle). Features and targets are moved to
    ``compute``'s device once (they are small: d_n numbers a sample); the
    aggregator is left on the CPU afterwards.
    """
    objective = targets if isinstance(targets, Objective) else Objective("hard", targets, labels)
    dev = compute.torch_device
    gen = torch.Generator().manual_seed(seed)
    for p in agg.head.parameters():
        p.requires_grad_(False)
    agg.to(dev)
    feats = [f.to(dev) for f in features]
    M = len(objective)

    def batches():
        perm = torch.randperm(M, generator=gen)
        return (perm[i: i + batch_size] for i in range(0, M, batch_size))

    def loss_of(idx):
        return objective.per_sample(agg(*[f[idx.to(dev)] for f in feats]), idx).mean(), len(idx)

    # a constant rate: the map is one linear layer on cached features
    history = fit(agg.linear.parameters(), epochs, batches, loss_of, M, -(-M // batch_size), lr, 1e-4,
                  warmup_steps=None, progress=progress, desc="aggregator")
    agg.to("cpu")
    return history


class _Ensemble(nn.Module):
    """Every sub-model on the same input, fused by the aggregator: what the devices compute together."""

    def __init__(self, submodels: Sequence[nn.Module], agg: Aggregator) -> None:
        super().__init__()
        self.submodels, self.agg = nn.ModuleList(submodels), agg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.agg(*[s(x) for s in self.submodels])


def train_jointly(submodels: Sequence[nn.Module], agg: Aggregator, data, objective: Objective, epochs: int,
                  lr: float = 2e-4, batch_size: int = 64, seed: int = 0, progress: bool = True,
                  compute: Compute = CPU) -> list[float]:
    """Fine-tune the calibrated sub-models and the aggregator together on the fused answer's loss.

    Choice written down, beyond the paper: eq. 13-14 calibrate each sub-model alone and
    eq. 2's W after them, so sub-models distilled to the same teacher learn much of the
    same thing; a few epochs on the ensemble's own loss let them specialise where the
    others fall short (the devices still run apart when served). The teacher's task head
    stays frozen. Returns the loss of each epoch.
    """
    import math

    from coformer.calibration.booster import as_split

    split = as_split(data)
    dev = compute.torch_device
    model = _Ensemble(submodels, agg).to(dev).train()
    for p in agg.head.parameters():
        p.requires_grad_(False)
    M = len(split)
    gen = torch.Generator().manual_seed(seed + 7919)

    def loss_of(batch):
        idx, xb = batch
        with compute.autocast():
            out = model(xb.to(dev)).float()
        return objective.per_sample(out, idx).mean(), len(idx)

    history = fit([p for p in model.parameters() if p.requires_grad], epochs,
                  lambda: split.batches(batch_size, shuffle=True, generator=gen, workers=compute.workers), loss_of,
                  M, math.ceil(M / batch_size), lr, 0.01, warmup_steps=1, scaler=compute.scaler(), module=model,
                  progress=progress, desc="joint fine-tuning")
    model.to("cpu").eval()
    return history


def missing_sets(devices: Sequence[str], max_all_subsets: int = 3) -> list[tuple[str, ...]]:
    """The sets of worker devices a bundle gets a fallback aggregator for (issue 19).

    ``devices[0]`` is the central node: it is never missing (without it nothing answers).
    Choice written down: one small linear map per missing set, fitted on the features that
    remain, rather than one aggregator trained with feature dropout. The aggregator is linear
    (eq. 2), so a map refitted for each set is the best linear answer from those features,
    while a single map with dropped inputs zeroed has to compromise between all sets (and
    answers every set with the same weights). A map costs sum(d_n) x D floats and a few
    seconds of training on cached features. With up to ``max_all_subsets`` workers every
    non-empty set of them gets a map (2^W - 1, so 7 for three workers); beyond that, only
    each single worker missing (W maps): two devices down at once is then refused by name.
    """
    workers = list(devices[1:])
    if len(workers) <= max_all_subsets:
        import itertools

        return [c for r in range(1, len(workers) + 1) for c in itertools.combinations(workers, r)]
    return [(w,) for w in workers]


def train_fallbacks(
    agg: Aggregator,
    make: Callable[[Sequence[int]], Aggregator],
    features: Sequence[torch.Tensor],
    objective: Objective,
    devices: Sequence[str],
    epochs: int,
    seed: int = 0,
    progress: bool = False,
    compute: Compute = CPU,
    sets: Optional[Sequence[Sequence[str]]] = None,
) -> list[tuple[tuple[str, ...], list[int], Aggregator]]:
    """One aggregator per :func:`missing_sets` entry (or per set of missing devices in ``sets``):
    ``(missing names, present indices, map)``.

    Each map starts from the full aggregator's columns of the devices present (their share
    of eq. 2's W, and its bias) and is then trained on the same objective, with the head
    frozen as in :func:`train_aggregator`. ``make(dims)`` builds an empty aggregator over
    features of those widths (it carries the head)."""
    out = []
    W_full = agg.linear.weight.detach().T  # [sum d_n, D]
    starts = [0]
    for f in features:
        starts.append(starts[-1] + f.shape[1])
    for missing in (missing_sets(devices) if sets is None else sets):
        present = [i for i, name in enumerate(devices) if name not in missing]
        fb = make([features[i].shape[1] for i in present])
        rows = torch.cat([W_full[starts[i]: starts[i + 1]] for i in present])
        fb.set_linear(rows, agg.linear.bias.detach())
        train_aggregator(fb, [features[i] for i in present], objective, epochs=epochs, seed=seed,
                         progress=progress, compute=compute)
        fb.eval()
        out.append((tuple(missing), present, fb))
    return out


def single_device_sets(devices: Sequence[str]) -> list[tuple[str, ...]]:
    """For each device, the set of all the others: what is missing when it answers alone."""
    return [tuple(d for d in devices if d != keep) for keep in devices]


def collaboration(ensemble: float, single: dict[str, float]) -> dict[str, Any]:
    """The collaboration gain (issue 37): the ensemble's score minus the best single device's,
    each device alone answering through a map fitted on its own features as a fallback is
    (:func:`train_fallbacks`), so the gain is what the other devices add to the best one."""
    best = max(single, key=lambda d: (single[d], d))
    return {"gain": float(ensemble - single[best]), "best_single_device": best,
            "best_single_score": float(single[best]), "single_device": {d: float(v) for d, v in single.items()}}
