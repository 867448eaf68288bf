"""The aggregation module of paper eq. 2 and its training.

    X_agg = Pool(W . Concat(X_1, ..., X_N) + b),  logits = head(X_agg)

Each device sends its *pooled* feature X_n; since both mean pooling and
class-token selection commute with the linear map W, pooling before W (on the
device) equals eq. 2's pooling after it, and a device sends d_n numbers rather
than a token tensor. ``head`` is the teacher's own task head, kept frozen
(paper footnote 1: heads are inherited, not decomposed).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from coformer.calibration.compute import CPU, Compute


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

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return self.head(self.linear(torch.cat(features, dim=-1)))


def train_aggregator(
    agg: Aggregator,
    features: Sequence[torch.Tensor],
    teacher_decisions: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    epochs: int = 60,
    lr: float = 2e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
    compute: Compute = CPU,
) -> list[float]:
    """Fit W and b on cached sub-model features (the head stays frozen); returns per-epoch loss.

    The loss is eq. 14's with uniform weights: half cross-entropy to the labels,
    half to the teacher's hard decisions; without labels, the teacher's alone.
    Features and targets are moved to ``compute``'s device once (they are small:
    d_n numbers a sample); the aggregator is left on the CPU afterwards.
    """
    dev = compute.torch_device
    gen = torch.Generator().manual_seed(seed)
    for p in agg.head.parameters():
        p.requires_grad_(False)
    agg.to(dev)
    feats = [f.to(dev) for f in features]
    yt = teacher_decisions.to(dev)
    y = None if labels is None else labels.to(dev)
    opt = torch.optim.AdamW(agg.linear.parameters(), lr=lr, weight_decay=1e-4)
    M = teacher_decisions.shape[0]
    history = []
    for _ in tqdm(range(epochs), desc="aggregator", disable=not progress, leave=False, unit="epoch"):
        perm = torch.randperm(M, generator=gen).to(dev)
        total = 0.0
        for i in range(0, M, batch_size):
            idx = perm[i: i + batch_size]
            logits = agg(*[f[idx] for f in feats])
            loss = F.cross_entropy(logits, yt[idx])
            if y is not None:
                loss = 0.5 * (loss + F.cross_entropy(logits, y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / M)
    agg.to("cpu")
    return history
