"""Progressive boosting distillation: the booster of paper §III-C-2 (eq. 13-14,
Algorithm 1 lines 12-15).

Sub-models are calibrated one after another. Sub-model n is distilled from the
teacher with per-sample weights W_n (eq. 14):

    L_Bo^n = sum_i w_i^n * 1/2 [CE(softmax(Y_s_n), y_i) + CE(softmax(Y_s_n), y_t,i)]

where y_t is the teacher's hard decision (DeiT-style hard distillation).
Without labels the first term is dropped and the teacher's decision is the
only target. After sub-model n, the weights are updated from each sample's
loss l_i under the calibrated sub-model (eq. 13).

Choice written down: eq. 13 as printed, ``w_i <- w_i * exp[(1/M - 1) l_i]``,
has a negative coefficient and would *lower* the weight of the samples the
previous sub-model got wrong, the opposite of boosting and of the paper's own
text ("adjusted based on the prediction errors"). We use the coefficient's
magnitude with the boosting sign, ``w_i <- w_i * exp[(1 - 1/M) l_i]``, then
renormalise to sum 1, and cap any weight at ``max_weight_ratio`` times the
mean so that one mislabelled sample cannot take over a sub-model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class BoostConfig:
    """Args:
    epochs: passes over the training set per sub-model.
    batch_size: samples per step.
    lr: AdamW peak learning rate (cosine decay, short warm-up).
    weight_decay: AdamW weight decay.
    max_weight_ratio: cap on a sample weight relative to the mean weight.
    seed: fixes shuffling, so a calibration is reproducible.
    """

    epochs: int = 4
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.01
    max_weight_ratio: float = 10.0
    seed: int = 0


@dataclass
class BoostReport:
    losses: list[list[float]] = field(default_factory=list)  # per sub-model, per epoch
    weights: list[torch.Tensor] = field(default_factory=list)  # W_n used for sub-model n


class _WithHead(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def boost_loss(logits: torch.Tensor, teacher_decision: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-sample eq. 14 loss (without the weights)."""
    loss = F.cross_entropy(logits, teacher_decision, reduction="none")
    if labels is not None:
        loss = 0.5 * (loss + F.cross_entropy(logits, labels, reduction="none"))
    return loss


def update_weights(w: torch.Tensor, losses: torch.Tensor, max_ratio: float) -> torch.Tensor:
    """Eq. 13 with the boosting sign (see module doc), renormalised, each weight capped
    at ``max_ratio / M`` (the excess is spread over the others in proportion)."""
    M = w.numel()
    if max_ratio < 1:
        raise ValueError(f"max_weight_ratio {max_ratio} must be >= 1")
    w = w * torch.exp((1.0 - 1.0 / M) * losses.clamp(max=30.0))
    w = w / w.sum()
    cap = max_ratio / M
    fixed = torch.zeros(M, dtype=torch.bool)
    for _ in range(M):
        over = (w > cap * (1 + 1e-9)) & ~fixed
        if not over.any():
            break
        fixed |= over
        w[fixed] = cap
        w[~fixed] = w[~fixed] / w[~fixed].sum() * (1.0 - cap * int(fixed.sum()))
    return w


@torch.no_grad()
def _per_sample_loss(model: nn.Module, x: torch.Tensor, yt: torch.Tensor, y: Optional[torch.Tensor], bs: int) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, x.shape[0], bs):
        out.append(boost_loss(model(x[i: i + bs]), yt[i: i + bs], None if y is None else y[i: i + bs]))
    return torch.cat(out)


def calibrate(
    submodels: Sequence[nn.Module],
    heads: Sequence[nn.Module],
    x: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    config: BoostConfig = BoostConfig(),
    progress: bool = True,
) -> BoostReport:
    """Calibrate ``submodels`` in order, in place (Algorithm 1, lines 12-15).

    ``heads[n]`` maps sub-model n's pooled feature to logits (the teacher's
    head sliced to its channels) and is trained with it. ``teacher_logits``
    are the teacher's outputs on ``x``, computed once.
    """
    gen = torch.Generator().manual_seed(config.seed)
    M = x.shape[0]
    yt = teacher_logits.argmax(dim=-1)
    w = torch.full((M,), 1.0 / M)
    report = BoostReport()
    steps_per_epoch = math.ceil(M / config.batch_size)
    for n, (body, head) in enumerate(zip(submodels, heads)):
        model = _WithHead(body, head)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        total_steps = max(1, config.epochs * steps_per_epoch)
        warmup = max(1, total_steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
        )
        report.weights.append(w.clone())
        epoch_losses = []
        bar = tqdm(range(config.epochs), desc=f"calibrate sub-model {n + 1}/{len(submodels)}",
                   disable=not progress, leave=False)
        for _ in bar:
            model.train()
            perm = torch.randperm(M, generator=gen)
            total = 0.0
            for i in range(0, M, config.batch_size):
                idx = perm[i: i + config.batch_size]
                per = boost_loss(model(x[idx]), yt[idx], None if labels is None else labels[idx])
                loss = (w[idx] * M * per).mean()  # weights rescaled to mean 1 keep the lr meaningful
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
            epoch_losses.append(total / M)
            bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
        report.losses.append(epoch_losses)
        model.eval()
        w = update_weights(w, _per_sample_loss(model, x, yt, labels, 256), config.max_weight_ratio)
    return report
