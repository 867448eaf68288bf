"""What sub-models and the aggregator are distilled to: the per-sample losses of eq. 14
and the two variants beside it.

* ``hard`` (the paper's eq. 14): cross-entropy to the teacher's decision, averaged
  with cross-entropy to the label where there is one.
* ``soft``: the Kullback-Leibler divergence from the teacher's temperature-softened
  distribution, ``T^2 KL(softmax(t / T) || softmax(s / T))`` (Hinton et al., 2015;
  the ``T^2`` keeps gradients comparable across temperatures), averaged with the
  label's cross-entropy as eq. 14 averages its two terms.
* ``feature``: for an embedding bundle, the teacher's pooled feature t is the
  target: ``(1 - cos(p - mu, t - mu)) + ||p - t||^2 / s^2``, with ``mu`` the mean
  target and ``s^2`` the targets' variance (mean ``||t - mu||^2``). Choice written
  down: both terms are taken about the mean, because encoder features are
  anisotropic (mean-pooled BERT states share one large direction: pairwise
  cosines of 0.99 between unrelated sentences of a small BERT here), so a plain
  cosine and a squared error scaled by ``||t||^2`` are satisfied by that common
  direction and barely see what tells sentences apart, which is what retrieval
  ranks by. The squared error is translation-invariant and pins the vector
  itself, so the served embedding is the teacher's, mean included.

Every objective gives a loss per sample (the booster's weights, eq. 13, are
updated from it) and its batch mean is what a step minimises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from coformer.runtime.errors import CoFormerError

KINDS = ("hard", "soft", "feature")


@dataclass
class Objective:
    """Per-sample distillation loss against the teacher's ``targets`` (see the module doc):
    ``hard``: class indices [M]; ``soft``: logits [M, C]; ``feature``: features [M, D]."""

    kind: str
    targets: torch.Tensor
    labels: Optional[torch.Tensor] = None
    temperature: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CoFormerError(f"distillation {self.kind!r} is not one of {KINDS}")
        if self.kind == "hard" and torch.is_floating_point(self.targets):
            self.targets = self.targets.argmax(dim=-1)
        if self.kind == "soft" and not torch.is_floating_point(self.targets):
            raise CoFormerError("soft distillation needs the teacher's logits, not its decisions")
        if self.kind != "hard" and not self.temperature > 0:
            raise CoFormerError(f"temperature {self.temperature} must be > 0")
        if self.kind == "feature":
            self.targets = self.targets.float()
            self.center, self.scale = feature_moments(self.targets)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    @property
    def decisions(self) -> torch.Tensor:
        """The teacher's class indices (classification objectives)."""
        return self.targets if self.kind == "hard" else self.targets.argmax(dim=-1)

    def per_sample(self, out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The loss of each sample ``idx`` of the training set, given the model's outputs ``out``."""
        dev = out.device
        t = self.targets[idx].to(dev)
        if self.kind == "feature":
            return feature_loss(out, t, self.center.to(dev), self.scale)
        if self.kind == "hard":
            loss = F.cross_entropy(out, t, reduction="none")
        else:
            T = self.temperature
            loss = (T * T) * F.kl_div(F.log_softmax(out / T, dim=-1), F.log_softmax(t / T, dim=-1),
                                      reduction="none", log_target=True).sum(-1)
        if self.labels is not None:
            loss = 0.5 * (loss + F.cross_entropy(out, self.labels[idx].to(dev), reduction="none"))
        return loss


def feature_moments(targets: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The targets' mean and variance (mean squared distance to the mean), for :func:`feature_loss`."""
    center = targets.float().mean(dim=0)
    return center, float((targets.float() - center).pow(2).sum(-1).mean().clamp_min(1e-12))


def feature_loss(pred: torch.Tensor, target: torch.Tensor, center: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-sample ``(1 - cos(pred - center, target - center)) + ||pred - target||^2 / scale``
    (see the module doc)."""
    cos = F.cosine_similarity(pred - center, target - center, dim=-1, eps=1e-8)
    return (1.0 - cos) + (pred - target).pow(2).sum(-1) / scale


def ridge_fit(x: torch.Tensor, y: torch.Tensor, reg: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression ``y ~ x W + b`` in float64 (``reg`` relative to the mean
    squared feature): the best linear map, used to start the embedding aggregator and as the
    reference a calibration must beat."""
    x64, y64 = x.double(), y.double()
    A = torch.cat([x64, torch.ones(len(x64), 1, dtype=torch.float64)], dim=1)
    lam = reg * float((A * A).sum()) / A.shape[1]
    sol = torch.linalg.solve(A.T @ A + lam * torch.eye(A.shape[1], dtype=torch.float64), A.T @ y64)
    return sol[:-1].float(), sol[-1].float()
